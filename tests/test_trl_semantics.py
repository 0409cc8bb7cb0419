"""Trainer options with TRL's meaning: accumulation multiplies the batch, gradient checkpointing changes nothing but
memory, DPO evaluates every ``eval_steps``, a used ``output_dir`` is not silently reused, and the SFT and DPO
metrics TRL logs (``num_tokens``, ``mean_token_accuracy``, ``entropy``, ``logits/*``) are computed as TRL does; the
RL trainers' bias-corrected k3 term, learning-rate schedule and GRPO/RLOO metric names are TRL 1.16's."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from otalign.config import ConfigError
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import PreferenceConfig, PreferenceTrainer, SFTConfig, SFTTrainer, read_metrics

FIXTURES = Path(__file__).parent / "fixtures"
PREFERENCE_PAIRS = str(FIXTURES / "preference_pairs.jsonl")
SFT_PAIRS = str(FIXTURES / "sft_pairs.jsonl")


def sft(tmp_path, **overrides) -> SFTTrainer:
    tokenizer = tiny_tokenizer()
    settings = dict(output_dir=str(tmp_path), dataset_name=SFT_PAIRS, max_steps=2, learning_rate=3e-3)
    settings.update(progress_bar=False, save_model=False, **overrides)
    return SFTTrainer(SFTConfig(**settings), model=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer)


def test_gradient_accumulation_multiplies_the_batch(tmp_path):
    accumulated = sft(tmp_path / "a", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    history = accumulated.train()
    assert accumulated.state.samples_seen == 2 * 2 * 2  # 2 steps x 2 micro-batches x 2 examples
    whole = sft(tmp_path / "b", per_device_train_batch_size=4).train()
    for a, b in zip(history, whole, strict=True):  # the same examples and the same token-mean loss
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = sft(tmp_path / "a", per_device_train_batch_size=4).train()
    trainer = sft(tmp_path / "b", per_device_train_batch_size=4, gradient_checkpointing=True)
    model = trainer.accelerator.unwrap_model(trainer.policy)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    for a, b in zip(plain, trainer.train(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_dpo_evaluates_every_eval_steps(tmp_path):
    tokenizer = tiny_tokenizer()
    config = PreferenceConfig(
        output_dir=str(tmp_path),
        dataset_name=PREFERENCE_PAIRS,
        eval_dataset_name=PREFERENCE_PAIRS,
        max_steps=3,
        eval_steps=1,
        per_device_train_batch_size=2,
        progress_bar=False,
        save_model=False,
    )
    PreferenceTrainer(
        config, policy=tiny_causal_lm(tokenizer), ref_model=tiny_causal_lm(tokenizer), tokenizer=tokenizer
    ).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "eval_rewards/accuracies" in r] == [1, 2, 3]


def test_sft_token_metrics_are_trls(tmp_path):
    """TRL's SFTTrainer: ``num_tokens`` counts the input tokens (prompts too) seen so far, ``mean_token_accuracy``
    the argmax hits on the trained tokens, ``entropy`` the mean entropy of the predictions of the trained tokens."""
    trainer = sft(tmp_path, per_device_train_batch_size=8, learning_rate=0.0)  # every row each step; weights stay
    model = trainer.accelerator.unwrap_model(trainer.policy)
    history = trainer.train()
    hits = trained = entropy = tokens = 0.0
    with torch.no_grad():
        for ids, labels in trainer.train_rows:  # one row at a time: no padding anywhere
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            scored = torch.tensor(labels[1:]) != -100
            hits += float((logits[:-1].argmax(-1) == torch.tensor(ids[1:]))[scored].sum())
            trained += float(scored.sum())
            entropy += float(torch.distributions.Categorical(logits=logits[:-1]).entropy()[scored].sum())
            tokens += len(ids)
    assert len(trainer.train_rows) == 8
    assert [row["num_tokens"] for row in history] == [tokens, 2 * tokens]
    for row in history:
        assert row["mean_token_accuracy"] == pytest.approx(hits / trained, rel=1e-6)
        assert row["entropy"] == pytest.approx(entropy / trained, rel=1e-5)


def test_dpo_logits_metrics_are_trls(tmp_path):
    """TRL's DPOTrainer: ``logits/chosen`` (``/rejected``) is the policy's mean logit over the vocabulary at the
    positions that predict the chosen (rejected) completion tokens, averaged over those tokens."""
    tokenizer = tiny_tokenizer()
    trainer = PreferenceTrainer(
        PreferenceConfig(output_dir=str(tmp_path), dataset_name=PREFERENCE_PAIRS, eval_dataset_name=PREFERENCE_PAIRS),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
    )
    model = trainer.accelerator.unwrap_model(trainer.policy)
    metrics = trainer.evaluate()
    for side in ("chosen", "rejected"):
        total = count = 0.0
        with torch.no_grad():
            for (split, _, name), (prompt, completion) in trainer.sequences.items():
                if split == "eval" and name == side:
                    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
                    total += float(logits[len(prompt) - 1 : -1].sum())
                    count += len(completion) * logits.shape[-1]
        assert metrics[f"eval_logits/{side}"] == pytest.approx(total / count, rel=1e-5)


def test_a_second_run_into_the_same_output_dir_needs_resume_or_overwrite(tmp_path):
    sft(tmp_path, per_device_train_batch_size=4, max_steps=1).train()
    with pytest.raises(ConfigError, match="already holds a run"):
        sft(tmp_path, per_device_train_batch_size=4, max_steps=1)
    sft(tmp_path, per_device_train_batch_size=4, max_steps=1, overwrite_output_dir=True).train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # replaced, not appended


def test_implicit_prompt_rows_are_split_as_trl_does():
    from otalign.data.preference import parse_pair

    user = {"role": "user", "content": "What color is the sky?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "It is blue."}],
        "rejected": [user, {"role": "assistant", "content": "It is green."}],
    }
    pair = parse_pair(row, "row 1")  # TRL's extract_prompt docstring example
    assert pair.prompt == [user]
    assert pair.chosen == [{"role": "assistant", "content": "It is blue."}]
    assert pair.rejected == [{"role": "assistant", "content": "It is green."}]
    pair = parse_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "row 2")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")
    pair = parse_pair({"prompt": "Q", "chosen": "a", "rejected": "b"}, "row 3")  # an explicit prompt stays
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "a", "b")
    with pytest.raises(ValueError, match="row 4, field 'prompt': empty text"):
        parse_pair({"chosen": "yes", "rejected": "no"}, "row 4")


def test_a_folder_saved_with_save_to_disk_loads_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from otalign.data.preference import load_preference_data, read_rows

    rows = read_rows(PREFERENCE_PAIRS)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    expected = load_preference_data(PREFERENCE_PAIRS)
    assert load_preference_data(str(tmp_path / "one")) == expected
    assert load_preference_data(str(tmp_path / "dict"), "train") == expected
    with pytest.raises(ValueError, match="no split 'test'"):
        load_preference_data(str(tmp_path / "dict"), "test")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preference_data(str(tmp_path / "missing"))


def test_a_text_prompt_beside_whole_conversations_is_implicit_too():
    from otalign.data.preference import parse_pair

    user = {"role": "user", "content": "Sky?"}
    row = {"prompt": "Sky?", "chosen": [user, {"role": "assistant", "content": "Blue."}], "rejected": [user]}
    pair = parse_pair({**row, "rejected": [user, {"role": "assistant", "content": "Green."}]}, "row 1")
    assert pair.prompt == [user] and pair.chosen == [{"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize("bias_correction", [True, False])
def test_the_k3_loss_term_with_and_without_trls_bias_correction(bias_correction):
    """``use_bias_correction_kl`` (TRL 1.16's default): the k3 term times exp(logp - logp_old). The value at the
    rollout policy is k3's, the gradient gains k3 itself: d/dl [k3 e^(l - l_old)] = (1 - e^(r - l) + k3) at l = l_old
    (r the reference log-probability), against 1 - e^(r - l) without it; with the policy moved, TRL's formula."""
    from otalign.regularizers import FDivergenceRegularizer
    from otalign.trainers.penalty import PenaltyInLoss

    placement = PenaltyInLoss(FDivergenceRegularizer("rkl"), "rollout", None, 1.0, bias_correction)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7], [-2.0, -2.5, 0.0]])
    scored = types.SimpleNamespace(mask=mask, old_logprobs=old, ref_logprobs=ref)
    rows, weights, beta, z = torch.arange(2), mask.float(), 0.3, 5.0
    for moved in (0.0, 0.2):  # at the rollout policy, then a moved one
        logprobs = (old + moved * mask).requires_grad_(True)
        loss = placement.loss(scored, rows, None, logprobs, weights, z, beta)
        loss.backward()
        lp = logprobs.detach().requires_grad_(True)
        per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1  # TRL 1.16 GRPOTrainer._compute_loss
        if bias_correction:
            per_token_kl = per_token_kl * torch.exp(lp - old)
        trl = beta * (per_token_kl * mask).sum() / z
        trl.backward()
        assert float(loss.detach()) == pytest.approx(float(trl.detach()), rel=1e-6)
        assert torch.allclose(logprobs.grad, lp.grad, rtol=1e-6, atol=1e-8)
        if moved == 0.0:
            k3 = torch.exp(ref - old) - (ref - old) - 1
            hand = (1 - torch.exp(ref - old) + (k3 if bias_correction else 0)) * mask * beta / z
            assert torch.allclose(logprobs.grad, hand, rtol=1e-6, atol=1e-8)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize(
    ("warmup_steps", "expected"), [(0, [0.01, 0.0075, 0.005, 0.0025]), (2, [0.0, 0.005, 0.01, 0.005])]
)
def test_the_rl_schedule_steps_per_optimizer_step_as_trl(tmp_path, warmup_steps, expected):
    """TRL steps the schedule once per optimizer step, over all of them: GRPO with num_iterations 2 and 2 rollouts
    takes 4 optimizer steps, at a linear schedule's 4 learning rates (warmup counted in optimizer steps too)."""
    from otalign.trainers import GRPOConfig, GRPOTrainer

    tokenizer = tiny_tokenizer()
    config = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        num_iterations=2,
        learning_rate=0.01,
        warmup_steps=warmup_steps,
        per_device_train_batch_size=4,
        num_generations=2,
        response_length=3,
        progress_bar=False,
        save_model=False,
    )
    trainer = GRPOTrainer(
        config,
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
        reward=lambda prompts, responses: [len(r) / 20 for r in responses],
        prompts=["a b", "c d"],
    )
    used, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    history = trainer.train()
    assert used == pytest.approx(expected)
    assert [row["learning_rate"] for row in history] == pytest.approx([sum(expected[:2]) / 2, sum(expected[2:]) / 2])


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_metrics_under_trls_names(tmp_path, algorithm):
    """TRL's GRPO/RLOO keys next to otalign's: ``reward``, ``reward_std``, ``rewards/<fn>/mean|std``,
    ``frac_reward_zero_std``, ``kl`` (GRPO: k3, RLOO: k1 at the rollout), ``entropy``, ``completions/*``,
    ``num_tokens`` (prompt + completion tokens so far) and ``clip_ratio/*``, recomputed from the scored rollouts."""
    from otalign.regularizers import k3
    from otalign.trainers import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[algorithm]
    tokenizer = tiny_tokenizer()
    config = config_class(
        output_dir=str(tmp_path),
        max_steps=3,
        learning_rate=3e-2,
        per_device_train_batch_size=8,
        num_generations=2,
        response_length=8,
        temperature=2.0,
        num_iterations=2,
        progress_bar=False,
        save_model=False,
    )  # a hot sampler hits EOS in some responses only; two iterations move the ratios off 1

    def characters(prompts, responses):
        return [float(len(r) % 3) for r in responses]

    trainer = trainer_class(
        config,
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer),
        tokenizer=tokenizer,
        reward=characters,
        prompts=["a b", "c d", "e f g", "h"],
    )
    captured, advantages = [], trainer.advantages
    trainer.advantages = lambda scored: captured.append(scored) or advantages(scored)
    history = trainer.train()
    tokens = 0.0
    for row, scored in zip(history, captured, strict=True):
        mask = scored.mask
        lengths = mask.sum(1).float()
        ended = ((scored.rollout.responses == tokenizer.eos_token_id) & mask).any(1)
        tokens += float(scored.rollout.attention_mask.sum())
        assert row["reward"] == row["reward/mean"] and row["reward_std"] == row["reward/std"]
        raw = scored.components["characters"].double()
        assert row["rewards/characters/mean"] == pytest.approx(float(raw.mean()))
        assert row["rewards/characters/std"] == pytest.approx(float(raw.std()), rel=1e-6)
        flat = trainer.sequence_rewards(scored).reshape(-1, 2).std(1)
        assert row["frac_reward_zero_std"] == pytest.approx(float(torch.isclose(flat, torch.zeros(4)).float().mean()))
        per_token = (
            k3(scored.old_logprobs, scored.ref_logprobs)
            if algorithm == "grpo"
            else (scored.old_logprobs - scored.ref_logprobs)
        )
        assert row["kl"] == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-5, abs=1e-7)
        assert row["entropy"] == row["policy/entropy"]
        assert row["num_tokens"] == tokens
        assert row["completions/mean_length"] == pytest.approx(float(lengths.mean()))
        assert (row["completions/min_length"], row["completions/max_length"]) == (lengths.min(), lengths.max())
        assert row["completions/clipped_ratio"] == pytest.approx(1 - float(ended.float().mean()))
        done = lengths[ended] if ended.any() else torch.zeros(1)
        assert row["completions/mean_terminated_length"] == pytest.approx(float(done.mean()))
        assert row["completions/min_terminated_length"] == float(done.min())
        assert row["completions/max_terminated_length"] == float(done.max())
        assert row["clip_ratio/region_mean"] == pytest.approx(row["clip_ratio/low_mean"] + row["clip_ratio/high_mean"])
        assert row["clip_ratio/region_mean"] == pytest.approx(row["policy/clipfrac"])
    assert any(0 < row["completions/clipped_ratio"] < 1 for row in history)  # some responses ended with EOS
    assert max(row["clip_ratio/region_mean"] for row in history) > 0
