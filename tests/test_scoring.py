"""One-pass scoring in micro-batches (otalign.scoring and the RL trainers' step): no forward ever sees more rows than
a scoring chunk or an update micro-batch, each model runs once per chunk, each position is solved once, and the
chunk size changes nothing but memory."""

from __future__ import annotations

import math

import pytest
import torch

from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.regularizers import FDivergenceRegularizer, Regularizer, WassersteinRegularizer, embedding_matrix
from otalign.scoring import score_rollout
from otalign.trainers import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["write about the cat .", "tell you about my day .", "what is your friend ?", "how was the weekend ?"]


def characters(prompts, responses):
    return [len(r) / 20 for r in responses]


def grpo(tmp_path, **overrides) -> GRPOTrainer:
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_generations=2,
        response_length=6,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
        regularizer="wasserstein",
        wpr_top_k=8,
    )
    settings.update(overrides)
    return GRPOTrainer(
        GRPOConfig(**settings),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        reward=characters,
        prompts=PROMPTS,
    )


def record_forwards(model, calls: list, head_outputs: list) -> None:
    """Record (rows, sequence length, grad enabled) of every forward of ``model`` and the shape of every output of
    its LM head."""

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        calls.append((ids.shape[0], ids.shape[1], torch.is_grad_enabled()))

    model.register_forward_hook(hook, with_kwargs=True)
    model.get_output_embeddings().register_forward_hook(lambda m, i, output: head_outputs.append(output.shape))


def test_a_grpo_step_runs_each_model_once_per_chunk_and_solves_each_position_once(tmp_path):
    trainer = grpo(tmp_path, scoring_batch_size=4)  # a rollout of 16 = 4 scoring chunks
    c = trainer.config
    assert c.step_batch_size == 16
    policy_calls, ref_calls, evaluations, head_outputs = [], [], [], []
    record_forwards(trainer.accelerator.unwrap_model(trainer.policy), policy_calls, head_outputs)
    record_forwards(trainer.ref_model, ref_calls, head_outputs)
    evaluate, solve, solved = trainer.regularizer.evaluate, trainer.regularizer.solve, []

    def counting(policy, ref, actions, mask=None, **options):
        evaluations.append((int(mask.sum()), options["support_gradient"]))
        return evaluate(policy, ref, actions, mask, **options)

    def counting_solve(problem):
        solved.append(problem.a.shape[0])
        return solve(problem)

    trainer.regularizer.evaluate, trainer.regularizer.solve = counting, counting_solve
    generated = []
    score = trainer.score_rollout
    trainer.score_rollout = lambda rollout, *args: (
        generated.append(int(rollout.response_mask.sum())) or score(rollout, *args)
    )
    trainer.train()

    chunk, micro = c.scoring_chunk, c.per_device_train_batch_size
    # the reference: one forward per scoring chunk, never with gradient, never over more rows than a chunk
    assert len(ref_calls) == c.step_batch_size // chunk
    assert all(rows <= chunk and not grad for rows, _, grad in ref_calls)
    # the policy: the same scoring forwards over whole sequences, then one per update micro-batch (with gradient);
    # generation's forwards see the prompt, then one position at a time
    full = ref_calls[0][1]
    scoring = [call for call in policy_calls if call[1] == full and not call[2]]
    update = [call for call in policy_calls if call[2]]
    assert len(scoring) == c.step_batch_size // chunk and all(rows <= chunk for rows, *_ in scoring)
    assert len(update) == c.gradient_accumulation_steps * c.num_mini_batches
    assert all(rows <= micro and length == full for rows, length, _ in update)
    # no LM head output ever holds more than a chunk's positions
    vocab = trainer.tokenizer.vocab_size
    assert max(shape.numel() for shape in head_outputs) <= chunk * (c.response_length + 1) * vocab
    # the regularizer: one call per chunk that returns the penalty and the potentials of the same solve; each
    # generated position is solved once in the step (none again for the loss)
    assert [flag for _, flag in evaluations] == [True] * (c.step_batch_size // chunk)
    assert sum(solved) == sum(generated) == sum(n for n, _ in evaluations)


@pytest.mark.parametrize("penalty_in", ["reward", "loss"])
def test_the_scoring_chunk_changes_no_metric(tmp_path, penalty_in):
    runs = []
    for chunk in (1, 16):
        trainer = grpo(tmp_path / str(chunk), scoring_batch_size=chunk, penalty_in=penalty_in, max_steps=2)
        runs.append(trainer.train())
    for whole, chunked in zip(*runs, strict=True):
        for key, value in whole.items():
            if not key.startswith("time/"):
                assert math.isclose(chunked[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, chunked[key], value)


def rollout_logits(vocab: int = 67, batch: int = 6, steps: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(batch, steps, vocab, generator=gen) * 2
    ref = policy + torch.randn(batch, steps, vocab, generator=gen) * 0.5
    actions = torch.randint(vocab, (batch, steps), generator=gen)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4, 1:] = False
    return policy, ref, actions, mask


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given (for scoring a rollout with known logits)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        rows = [self.index[tuple(ids.tolist())] for ids in input_ids]
        padded = torch.nn.functional.pad(self.logits[rows], (0, 0, 0, 1))  # the position after the last token
        return type("Output", (), {"logits": padded})()


@pytest.mark.parametrize("regularizer", ["rkl", "js", "wasserstein"])
def test_scoring_in_chunks_equals_the_regularizer_on_the_whole_rollout(regularizer):
    from otalign.generation import Rollout

    policy_logits, ref_logits, actions, mask = rollout_logits()
    batch, steps, vocab = policy_logits.shape
    sequences = torch.cat([torch.arange(batch)[:, None], actions], 1)  # a distinct prompt token per row
    rollout = Rollout(
        sequences,
        torch.ones_like(sequences, dtype=torch.bool),
        torch.arange(steps + 1).expand(batch, -1),
        1,
        actions,
        mask,
        [""] * batch,
        [""] * batch,
    )
    policy, ref = Fixed(policy_logits), Fixed(ref_logits)
    for model in (policy, ref):
        model.index = {tuple(ids.tolist()): i for i, ids in enumerate(sequences)}
    if regularizer == "wasserstein":
        reg = WassersteinRegularizer(torch.randn(vocab, 8, generator=torch.Generator().manual_seed(1)), top_k=6)
    else:
        reg = FDivergenceRegularizer(regularizer)
    temperature = 0.7
    whole = reg.evaluate(policy_logits / temperature, ref_logits / temperature, actions, mask, support_gradient=True)
    scores = score_rollout(policy, ref, rollout, reg, temperature=temperature, chunk_size=4, support_gradient=True)
    # the scoring pass's log-probabilities differ from the regularizer's own log-softmax in the last float32 bit;
    # Sinkhorn at its tolerance (1e-7 in mass) carries that to ~1e-6 in cost units
    assert torch.allclose(scores.penalty.per_token, whole.penalty.per_token, atol=1e-5)
    # the pass measures the KL per position itself, so the regularizer skips its kl/exact diagnostic
    assert set(whole.penalty.stats) - set(scores.penalty.stats) <= {"kl/exact"}
    for name, value in scores.penalty.stats.items():
        if name != "sinkhorn/marginal_err":
            assert math.isclose(scores.penalty.stats[name], value, rel_tol=1e-5, abs_tol=1e-6), name
    assert torch.allclose(scores.gradient.phi[mask][..., : whole.gradient.phi.shape[-1]], whole.gradient.phi, atol=1e-5)
    logp = torch.log_softmax(policy_logits / temperature, -1)
    ref_logp = torch.log_softmax(ref_logits / temperature, -1)
    assert torch.allclose(scores.old_logprobs, logp.gather(-1, actions[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(scores.ref_logprobs, ref_logp.gather(-1, actions[..., None])[..., 0], atol=1e-6)
    assert torch.allclose(scores.kl, (logp.exp() * (logp - ref_logp)).sum(-1), atol=1e-5)
    assert torch.allclose(scores.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)


@pytest.mark.parametrize("regularizer", ["rkl", "wasserstein"])
def test_the_lm_head_in_pieces_gives_the_full_logits_answer(regularizer):
    """Hidden states through the head a few positions at a time == the model's own (b, T, V) logits."""
    from otalign.generation import SamplingParams, generate, response_logits
    from otalign.scoring import output_head

    tokenizer = tiny_tokenizer()
    policy, ref = tiny_causal_lm(tokenizer, seed=1), tiny_causal_lm(tokenizer, seed=0)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    rollout = generate(policy, tokenizer, ids, PROMPTS, [1, 2, 3, 4], SamplingParams(7, 1.0, 0, 1.0))
    vocab = policy.get_output_embeddings().out_features
    if regularizer == "wasserstein":
        reg = WassersteinRegularizer(embedding_matrix(ref).float(), top_k=6)
    else:
        reg = FDivergenceRegularizer(regularizer)
    assert output_head(policy) is not None
    temperature = 0.8
    pieces = score_rollout(
        policy, ref, rollout, reg, temperature=temperature, chunk_size=3, support_gradient=True, max_elements=5 * vocab
    )
    with torch.no_grad():
        logp = torch.log_softmax(response_logits(policy, rollout) / temperature, -1)
        ref_logp = torch.log_softmax(response_logits(ref, rollout) / temperature, -1)
    mask, actions = rollout.response_mask, rollout.responses
    whole = reg.evaluate(logp, ref_logp, actions, mask, support_gradient=True)
    assert torch.allclose(pieces.penalty.per_token, whole.penalty.per_token, atol=1e-5)
    assert torch.allclose(pieces.old_logprobs, logp.gather(-1, actions[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(pieces.kl, (logp.exp() * (logp - ref_logp)).sum(-1), atol=1e-5)
    width = whole.gradient.phi.shape[-1]
    assert torch.allclose(pieces.gradient.phi[mask][:, :width], whole.gradient.phi, atol=1e-4)


def test_a_regularizer_registered_in_one_line_runs_in_ppo_and_grpo_from_the_command_line(tmp_path, monkeypatch):
    """The README's "Extending otalign": one class, one registry line, no trainer edited."""
    from otalign.cli import main
    from otalign.registry import Entry
    from otalign.regularizers import REGULARIZERS

    class SquaredLogRatio(Regularizer):
        """(log pi(y) - log pi_ref(y))^2 / 2 at the sampled token."""

        name = "squared_log_ratio"

        def _penalize(self, positions):
            from otalign.regularizers.base import StatAccumulator

            policy, ref = positions.log_probs(0, positions.count)
            y = positions.actions[:, None]
            return 0.5 * (policy.gather(1, y) - ref.gather(1, y))[:, 0] ** 2, StatAccumulator()

    entry = Entry("squared_log_ratio", SquaredLogRatio, "half the squared log-ratio", {}, {"beta": 0.3})
    monkeypatch.setitem(REGULARIZERS.entries, "squared_log_ratio", entry)
    model = tmp_path / "tiny"
    save_tiny_model(str(model))
    for command, extra in (("ppo", []), ("grpo", ["--num_generations", "2", "--penalty_in", "reward"])):
        out = tmp_path / command
        code = main(
            [command, "--model_name_or_path", str(model), "--regularizer", "squared_log_ratio", "--max_steps", "2",
             "--per_device_train_batch_size", "2", "--response_length", "4", "--output_dir", str(out),
             "--learning_rate", "1e-2", "--no_save_model", "--no_progress_bar", "--reward_fn", "sentiment",
             "--prompts", "builtin", *extra]
        )  # fmt: skip
        assert code == 0
        from otalign.trainers import read_metrics

        first, second = read_metrics(out)  # the reference is the policy's starting point: 0, then > 0
        assert first["penalty/mean"] == 0 and second["penalty/mean"] > 0 and second["beta"] == 0.3


def test_the_embedding_matrix_of_the_reference_defines_the_wasserstein_cost(tmp_path):
    trainer = grpo(tmp_path)
    reference = embedding_matrix(trainer.ref_model).float()
    assert torch.equal(trainer.regularizer.embeddings.cpu(), reference)


def test_held_out_evaluation_scores_in_chunks_with_the_same_values():
    """The held-out evaluation never runs the LM head over more responses than its scoring chunk, and the chunk
    changes neither the KL, the OT distance nor an extras measure (against scoring a whole generation batch)."""
    from otalign.eval.policy import evaluate_policy
    from otalign.generation import SamplingParams, encode_prompts
    from otalign.rewards import FunctionReward
    from otalign.sweep.evaluate import coherence_measure

    tokenizer = tiny_tokenizer()
    policy, reference = tiny_causal_lm(tokenizer, seed=1).eval(), tiny_causal_lm(tokenizer, seed=0).eval()
    texts = PROMPTS * 2
    ids = encode_prompts(tokenizer, texts, max_prompt_length=32)
    embeddings = embedding_matrix(reference)
    reg = WassersteinRegularizer(embeddings, lam=10.0, top_k=8)

    def evaluate(scoring_batch_size: int):
        head_outputs = []
        handles = [
            m.get_output_embeddings().register_forward_hook(lambda m, i, out: head_outputs.append(out.shape))
            for m in (policy, reference)
        ]
        try:
            result = evaluate_policy(
                policy,
                reference,
                tokenizer,
                texts,
                ids,
                FunctionReward(characters),
                params=SamplingParams(max_new_tokens=6),
                seed=3,
                batch_size=8,
                scoring_batch_size=scoring_batch_size,
                ot_regularizer=reg,
                extras={"coherence": coherence_measure(embeddings, 4)},
            )
        finally:
            for handle in handles:
                handle.remove()
        return result, head_outputs

    chunked, heads = evaluate(2)
    whole, _ = evaluate(8)
    # generation and the scoring forward run the head one position at a time; the scoring pieces are (n, V)
    pieces = [shape for shape in heads if len(shape) == 2]
    assert pieces and all(shape[0] <= 2 * 6 for shape in pieces), pieces
    assert all(shape[1] == 1 for shape in heads if len(shape) == 3), heads
    assert chunked.responses == whole.responses
    for name in ("kl", "ot"):
        torch.testing.assert_close(torch.tensor(getattr(chunked, name)), torch.tensor(getattr(whole, name)))
    torch.testing.assert_close(torch.tensor(chunked.extra["coherence"]), torch.tensor(whole.extra["coherence"]))
    assert all(value > 0 for value in chunked.kl)
