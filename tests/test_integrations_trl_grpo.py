"""WPRGRPOTrainer: with ``kl`` it is TRL's own GRPOTrainer (same seed: same completions, loss and gradients); with
``wasserstein`` in the loss its gradient is the full-logits support-gradient surrogate's (otalign's GRPO with
``--penalty_in loss --loss_potentials current``) and a finite difference of the distance; PEFT (reference =
adapters disabled) included."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_parity.parity import model_from, tiny_models  # noqa: E402

from otalign.integrations.trl import WPRGRPOTrainer  # noqa: E402
from otalign.integrations.trl.grpo import REF_HIDDEN  # noqa: E402
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from otalign.regularizers import build_regularizer  # noqa: E402

PROMPTS = ["the cat", "a dog is", "we are in the", "it was"]
BETA = 0.2


def reward_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=0.0,
        beta=BETA,
        loss_type="grpo",  # the oracles below average per sequence, then over sequences
        temperature=0.9,
        report_to=[],
        use_cpu=True,
        bf16=False,  # float32 passes, so that the full-logits oracle sees the same hidden states
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def models(folder, peft: bool):
    """The tokenizer, the policy (saved to ``folder``: TRL builds its reference model from the policy's path; moved
    away from the reference, so that the regularizer's term is not 0) and the distinct reference (None with PEFT)."""
    from transformers import AutoModelForCausalLM

    tokenizer, _, ref, path = tiny_models(folder)
    return tokenizer, AutoModelForCausalLM.from_pretrained(path), None if peft else model_from(tokenizer, ref)


def build(cls, tmp_path, *, peft=False, regularizer=None, penalty_in="loss", **overrides):
    tokenizer, policy, ref = models(tmp_path, peft)
    kwargs = {"regularizer": regularizer, "penalty_in": penalty_in} if cls is WPRGRPOTrainer else {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
    trainer = cls(
        policy,
        reward_funcs=reward_length,
        args=config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        **kwargs,
    )
    if ref is not None:  # TRL built the reference from the policy; make it the distinct reference model
        trainer.ref_model.load_state_dict(ref.state_dict())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which these tests stand in for
    return trainer


def batch(trainer):
    torch.manual_seed(1234)
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


def assert_same(got, want):
    (loss, grads), (loss_want, grads_want) = got, want
    torch.testing.assert_close(loss, loss_want, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_want.keys() and grads
    for name in grads_want:
        torch.testing.assert_close(grads[name], grads_want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("loss_type", "bias_correction"), [("grpo", False), ("grpo", True), ("dapo", True), ("dr_grpo", False)]
)
def test_kl_equals_trl_grpo_trainer(tmp_path, loss_type, bias_correction):
    overrides = {"loss_type": loss_type, "use_bias_correction_kl": bias_correction}
    ours = build(WPRGRPOTrainer, tmp_path / "ours", regularizer=build_regularizer("kl"), **overrides)
    theirs = build(GRPOTrainer, tmp_path / "theirs", **overrides)
    inputs, inputs_trl = batch(ours), batch(theirs)
    assert torch.equal(inputs["completion_ids"], inputs_trl["completion_ids"])
    got, want = loss_and_grads(ours, inputs), loss_and_grads(theirs, inputs_trl)
    assert_same(got, want)
    # the k3 term is really in both: without it the loss changes
    theirs.beta = 0.0
    assert abs(float(theirs.compute_loss(theirs.model, inputs_trl)) - float(want[0])) > 1e-6
    assert ours._metrics["train"]["regularizer/term"][-1] > 0


def wasserstein(embeddings, *, top_k=8, **kwargs):
    return build_regularizer("wasserstein", embeddings=embeddings, top_k=top_k, **kwargs)


def full_logits_term(trainer, inputs, regularizer, reference, dtype=torch.float32):
    """(B, T) the surrogate from full (B, T, V) logits of a plain forward of the policy and of ``reference``, and
    the (N,) distances: otalign's own penalty-in-loss path."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    steps = inputs["completion_ids"].shape[1]

    def log_probs(model):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -steps - 1 : -1].to(dtype)
        return torch.log_softmax(logits / trainer.temperature, dim=-1)

    policy = log_probs(trainer.model)
    with torch.no_grad():
        ref = log_probs(reference)
    mask = inputs["completion_mask"].bool()
    evaluation = regularizer.evaluate(
        policy.detach(), ref, inputs["completion_ids"], mask, support_gradient=True, normalized=True
    )
    term = torch.zeros(mask.shape, dtype=dtype).masked_scatter(mask, evaluation.gradient.surrogate(policy[mask]))
    return term, evaluation.gradient.value


class Adapterless(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


@pytest.mark.parametrize("peft", [False, True], ids=["ref-model", "peft"])
def test_wasserstein_in_the_loss_equals_the_full_logits_surrogate(tmp_path, peft):
    tokenizer = tiny_tokenizer()
    embeddings = tiny_causal_lm(tokenizer, seed=1).get_input_embeddings().weight.detach()
    # a chunk of 5 positions: the chunked head runs several times
    regularizer = wasserstein(embeddings, max_chunk_elements=5 * len(tokenizer), tol=1e-9, max_iter=500)
    ours = build(WPRGRPOTrainer, tmp_path, peft=peft, regularizer=regularizer)
    inputs = batch(ours)
    assert inputs[REF_HIDDEN].shape[:2] == inputs["completion_ids"].shape
    got = loss_and_grads(ours, inputs)

    reference = Adapterless(ours.model) if peft else ours.ref_model
    ours.model.zero_grad()
    ours.beta = 0.0
    policy_loss = GRPOTrainer._compute_loss(ours, ours.model, inputs)
    ours.beta = BETA
    term, _ = full_logits_term(ours, inputs, regularizer, reference)
    mask = inputs["completion_mask"]
    expected = policy_loss + BETA * ((term * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    expected.backward()
    want = expected.detach(), {n: p.grad.clone() for n, p in ours.model.named_parameters() if p.grad is not None}
    assert_same(got, want)
    assert float(term.abs().max()) > 0
    assert ours._metrics["train"]["wasserstein/value"]


@pytest.mark.parametrize("name", ["js", "fkl"])
def test_surrogate_gradient_is_the_distance_finite_difference(tmp_path, name):
    """With zero advantages the loss is beta times the mean over sequences of the per-token divergence (a smooth
    one: an f-divergence's surrogate covers the whole vocabulary); its directional derivative along the policy's LM
    head equals the central finite difference of that divergence, computed in float64 from full logits. (The
    Wasserstein distance is only piecewise smooth where the policy's and the reference's masses cross, so its
    check is the full-logits surrogate above, and its own surrogate-versus-finite-difference tests.)"""
    regularizer = build_regularizer(name)
    ours = build(WPRGRPOTrainer, tmp_path, regularizer=regularizer)
    inputs = batch(ours)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    _, grads = loss_and_grads(ours, inputs)
    head = ours.model.get_output_embeddings().weight
    direction = torch.randn(head.shape, generator=torch.Generator().manual_seed(7))
    direction /= direction.norm()
    analytic = float((grads["lm_head.weight"] * direction).sum())
    mask = inputs["completion_mask"].bool()

    def distance(step: float) -> float:
        with torch.no_grad():
            head.add_(step * direction)
            _, values = full_logits_term(ours, inputs, regularizer, ours.ref_model, torch.float64)
            head.sub_(step * direction)
        per_token = torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask, values)
        return float(BETA * (per_token.sum(-1) / mask.sum(-1)).mean())

    step = 1e-3
    numeric = (distance(step) - distance(-step)) / (2 * step)
    assert abs(numeric) > 1e-4
    assert analytic == pytest.approx(numeric, rel=1e-3)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        build(WPRGRPOTrainer, tmp_path, regularizer=build_regularizer("kl"), beta=0.0)
    with pytest.raises(ValueError, match="Regularizer"):
        build(WPRGRPOTrainer, tmp_path, regularizer="kl")


@pytest.mark.parametrize("name", ["kl", "wasserstein"])
def test_two_training_steps_through_trainer_train(tmp_path, name):
    """Trainer.train() as a TRL user runs it (gradient accumulation, logging): the weights move, the regularizer's
    term is logged and finite."""
    tokenizer = tiny_tokenizer()
    embeddings = tiny_causal_lm(tokenizer, seed=1).get_input_embeddings().weight.detach()
    regularizer = wasserstein(embeddings) if name == "wasserstein" else build_regularizer(name)
    trainer = build(
        WPRGRPOTrainer,
        tmp_path,
        regularizer=regularizer,
        max_steps=2,
        learning_rate=1e-2,
        gradient_accumulation_steps=2,
        loss_type="dapo",
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved
    logged = [entry for entry in trainer.state.log_history if "regularizer/term" in entry]
    assert len(logged) == 2
    assert all(torch.isfinite(torch.tensor(entry["regularizer/term"])) for entry in logged)
    assert all(entry["regularizer/term"] > 0 for entry in logged)


@pytest.mark.parametrize("name", ["kl", "wasserstein"])
def test_penalty_in_the_reward(tmp_path, name):
    """penalty_in='reward': each completion's reward loses beta times its summed penalty (the regularizer's
    full-logits penalty, otalign's PPO/GRPO reward), before TRL's group normalisation; the loss has no term."""
    tokenizer = tiny_tokenizer()
    embeddings = tiny_causal_lm(tokenizer, seed=1).get_input_embeddings().weight.detach()
    regularizer = wasserstein(embeddings) if name == "wasserstein" else build_regularizer(name)
    ours = build(WPRGRPOTrainer, tmp_path, regularizer=regularizer, penalty_in="reward", scale_rewards="none")
    generation = next(iter(ours.get_train_dataloader()))
    torch.manual_seed(1234)
    inputs = ours._generate_and_score_completions(generation)
    mask = inputs["completion_mask"].bool()

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    steps = mask.shape[1]
    with torch.no_grad():
        logits = [
            m(input_ids=ids, attention_mask=attention).logits[:, -steps - 1 : -1] / ours.temperature
            for m in (ours.model, ours.ref_model)
        ]
    penalty = regularizer.penalty(*logits, inputs["completion_ids"], mask).per_token.sum(1)
    completions = list(ours._logs["completion"])[-mask.shape[0] :]  # what the reward function saw
    rewards = torch.tensor(reward_length(completions)) - BETA * penalty
    grouped = rewards.view(-1, ours.num_generations)
    expected = (grouped - grouped.mean(1, keepdim=True)).flatten()
    torch.testing.assert_close(inputs["advantages"], expected, atol=1e-5, rtol=1e-5)
    assert float(penalty.abs().max()) > 1e-3
    assert REF_HIDDEN not in inputs
    # the loss is TRL's without the k3 term
    ours.beta = 0.0
    plain = GRPOTrainer._compute_loss(ours, ours.model, inputs)
    ours.beta = BETA
    torch.testing.assert_close(ours.compute_loss(ours.model, inputs), plain)


def test_the_lm_head_sees_one_chunk_of_positions_at_a_time(tmp_path):
    """No (B, T, V) logits: with max_chunk_elements = 2 V every call of an LM head (solve, surrogate, its
    recomputation in the backward pass) projects at most 2 positions."""
    tokenizer = tiny_tokenizer()
    embeddings = tiny_causal_lm(tokenizer, seed=1).get_input_embeddings().weight.detach()
    regularizer = wasserstein(embeddings, max_chunk_elements=2 * len(tokenizer))
    ours = build(WPRGRPOTrainer, tmp_path, regularizer=regularizer)
    inputs = batch(ours)
    rows = []
    hooks = [
        head.register_forward_hook(
            lambda module, args, output: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        )
        for head in dict.fromkeys(ours.heads)
    ]
    try:
        loss_and_grads(ours, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    positions = int(inputs["completion_mask"].sum())
    assert positions > 2
    assert max(rows) <= 2
    assert sum(rows) == 4 * positions  # policy and reference for the solve, the surrogate, its recomputation
