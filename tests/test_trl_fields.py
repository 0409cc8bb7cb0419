"""TRL 1.16 / transformers fields with their meaning: the RL trainers' held-out evaluation (``eval_strategy``,
``eval_steps``, ``per_device_eval_batch_size``, ``eval_dataset_name``), ``save_strategy`` and ``save_total_limit``,
``run_name``, ``bf16``/``fp16``, ``optim``, ``model_init_kwargs`` and ``attn_implementation``, GRPO/RLOO's
``clip_ratio/low_min`` and ``/high_max`` and ``scale_rewards``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_critic_free import PROMPTS, characters, make

from otalign.config import ConfigError, ConfigParser
from otalign.eval.policy import evaluate_policy
from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.rewards import build_reward
from otalign.trainers import (
    GRPOConfig,
    GRPOTrainer,
    RLOOConfig,
    checkpoint,
    read_metrics,
)
from otalign.trainers.checkpoint import CheckpointManager, list_checkpoints
from otalign.trainers.critic_free import group_advantages

pytestmark = pytest.mark.usefixtures("torch_single_thread")
FIXTURES = Path(__file__).parent / "fixtures"

HELD_OUT = ["the dog walks in the park .", "a friend writes about the sun .", "what is the rain ?"]


def rl(tmp_path, algorithm: str = "grpo", **overrides):
    """A tiny trainer of ``algorithm`` (:func:`test_critic_free.make`) whose policy starts away from the reference."""
    return make(tmp_path, algorithm, policy_seed=1, **overrides)


# ---------------------------------------------------------------------------------------------- RL evaluation
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rl_evaluates_held_out_prompts_every_eval_steps_and_at_the_end(tmp_path, algorithm):
    trainer = rl(tmp_path, algorithm, eval_prompts=HELD_OUT, max_steps=3, eval_strategy="steps", eval_steps=2)
    trainer.train()
    rows = read_metrics(tmp_path)
    evaluated = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evaluated] == [2, 3]  # every eval_steps, and after the last step (TRL's steps)
    for key in ("eval_reward_std", "eval_kl/exact", "eval_regularizer/distance", "eval_rkl/exact"):
        assert all(key in r for r in evaluated), key
    # the regularizer's exact KL (rkl/exact) is the KL the evaluation measures itself, per generated token
    assert evaluated[-1]["eval_rkl/exact"] == pytest.approx(evaluated[-1]["eval_kl/exact"], rel=1e-5)
    assert evaluated[-1]["eval_regularizer/distance"] == evaluated[-1]["eval_rkl/exact"]


def test_rl_evaluation_is_evaluate_policy_on_the_trained_policy(tmp_path):
    """The last step's eval metrics are those of ``evaluate_policy`` run afterwards on the trained policy, with one
    prompt per batch (``per_device_eval_batch_size`` changes the batching, not the samples)."""
    trainer = rl(tmp_path, eval_prompts=HELD_OUT, per_device_eval_batch_size=2, eval_strategy="steps")
    last = trainer.train()[-1]
    result = evaluate_policy(
        trainer.accelerator.unwrap_model(trainer.policy),
        trainer.ref_model,
        trainer.tokenizer,
        trainer.eval_set.texts,
        trainer.eval_set.ids,
        build_reward(characters),
        params=trainer.config.sampling,
        seed=trainer.config.seed,
        batch_size=1,
    )
    scores = torch.tensor(result.scores, dtype=torch.float64)
    assert last["eval_reward"] == pytest.approx(float(scores.mean()), rel=1e-6)
    assert last["eval_reward_std"] == pytest.approx(float(scores.std()), rel=1e-6)
    assert last["eval_kl/exact"] == pytest.approx(result.summary()["kl_per_token"], rel=1e-5)
    assert last["eval_completions/mean_length"] == pytest.approx(sum(result.lengths) / len(HELD_OUT))


def test_rl_wasserstein_distance_on_held_out_prompts(tmp_path):
    trainer = rl(tmp_path, eval_prompts=HELD_OUT, regularizer="wasserstein", max_steps=1)
    last = trainer.train()[-1]  # eval_strategy unset: evaluation data given, so after the last step
    assert last["eval_regularizer/distance"] == last["eval_wasserstein/value"] > 0


def test_rl_eval_strategy_no_never_evaluates(tmp_path):
    rl(tmp_path, eval_prompts=HELD_OUT, eval_strategy="no").train()
    assert not any("eval_reward" in r for r in read_metrics(tmp_path))


@pytest.mark.parametrize("settings", [dict(eval_steps=2), dict(eval_strategy="steps"), dict(eval_strategy="epoch")])
def test_evaluation_without_evaluation_data_is_one_config_error(tmp_path, settings):
    with pytest.raises(ConfigError, match=r"evaluates on held-out data: set eval_dataset_name$"):
        rl(tmp_path, **settings)


@pytest.mark.parametrize("command", ["grpo", "rloo", "ppo", "dpo", "sft", "reward"])
def test_command_line_refuses_eval_steps_without_eval_data(tmp_path, command, capsys):
    from otalign.cli import main

    data = {"dpo": "builtin", "reward": "builtin", "sft": str(FIXTURES / "sft_pairs.jsonl")}
    args = [command, "--eval_strategy", "steps", "--output_dir", str(tmp_path / "run")]
    args += ["--dataset_name", data[command]] if command in data else []
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "eval_strategy steps evaluates on held-out data: set eval_dataset_name" in err


# ---------------------------------------------------------------------------------------------- saving
def test_epoch_strategies_save_and_evaluate_where_a_pass_over_the_rows_ends(tmp_path):
    """8 training rows (4 prompts x 2 responses), 4 per step: passes end at steps 2 and 4; the run stops at 3, where
    both strategies act too (TRL's epoch end at the end of training)."""
    trainer = rl(
        tmp_path,
        eval_prompts=HELD_OUT,
        max_steps=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=None,
    )
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert [r["step"] for r in read_metrics(tmp_path) if "eval_reward" in r] == [2, 3]


def test_save_strategy_no_and_steps(tmp_path):
    rl(tmp_path / "no", max_steps=3, save_strategy="no").train()
    assert list_checkpoints(tmp_path / "no") == []
    rl(tmp_path / "steps", max_steps=3, save_steps=2, save_total_limit=None).train()
    assert [p.name for p in list_checkpoints(tmp_path / "steps")] == ["checkpoint-2", "checkpoint-3"]
    for strategy in ("no", "epoch"):  # an interval the strategy would ignore is refused
        with pytest.raises(ConfigError, match=f"save_steps needs save_strategy steps, got save_strategy {strategy}"):
            GRPOConfig(save_strategy=strategy, save_steps=2)
        with pytest.raises(ConfigError, match=f"eval_steps needs eval_strategy steps, got eval_strategy {strategy}"):
            GRPOConfig(eval_strategy=strategy, eval_steps=2)
    with pytest.raises(ConfigError, match="unknown save_strategy 'best'"):
        GRPOConfig(save_strategy="best")


def test_save_total_limit_removes_the_oldest_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters()))
    folder = tmp_path / "checkpoints"
    removed = []
    real_rmtree = checkpoint.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if checkpoint.PATTERN.match(path.name) and path.exists():  # an old one goes once the newest is complete
            newest = max(list_checkpoints(tmp_path), key=lambda p: int(p.name.split("-")[1]))
            removed.append((path.name, (newest / checkpoint.MANIFEST).is_file()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    manager = CheckpointManager(acc, tmp_path, total_limit=2)
    for step in (1, 2, 3):
        manager.save(step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert removed == [("checkpoint-1", True)]
    # a resumed run writes checkpoint-4 beside checkpoint-9 of an abandoned later run: the new one always stays
    real_rmtree(folder / "checkpoint-2")
    (folder / "checkpoint-9").mkdir()
    CheckpointManager(acc, tmp_path, total_limit=1).save(4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert checkpoint.verify_checkpoint(folder / "checkpoint-4") is None


# ---------------------------------------------------------------------------------------------- run, precision, model
def test_run_name_names_the_tensorboard_run_and_is_recorded(tmp_path):
    pytest.importorskip("tensorboard")
    rl(tmp_path, max_steps=1, report_to=["tensorboard"], run_name="trial-7").train()
    assert list((tmp_path / "otalign" / "trial-7").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["run_name"] == "trial-7"


def test_bf16_and_fp16_are_mixed_precision(tmp_path):
    assert GRPOConfig(bf16=True).mixed_precision == "bf16"
    assert GRPOConfig(fp16=True, mixed_precision="fp16").mixed_precision == "fp16"
    assert GRPOConfig(bf16=False).mixed_precision == "no"
    parser = ConfigParser(GRPOConfig, prog="otalign grpo")
    assert parser.parse(["--bf16"]).mixed_precision == "bf16"  # a bare flag, as TRL users write it
    assert parser.parse(["--fp16", "false"]).fp16 is False and parser.parse([]).bf16 is None
    for settings, message in [
        (dict(bf16=True, fp16=True), "bf16 and fp16 are both true"),
        (dict(bf16=True, mixed_precision="fp16"), "bf16 true contradicts mixed_precision fp16"),
        (dict(fp16=False, mixed_precision="fp16"), "fp16 false contradicts mixed_precision fp16"),
    ]:
        with pytest.raises(ConfigError, match=message):
            GRPOConfig(**settings)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one mixed precision per process
    try:
        assert rl(tmp_path, bf16=True).accelerator.mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(True)


def test_optim_adamw_torch_fused_runs_the_fused_kernel_with_the_same_updates(tmp_path):
    plain = rl(tmp_path / "plain", max_steps=2)
    fused = rl(tmp_path / "fused", max_steps=2, optim="adamw_torch_fused")
    assert fused.optimizer.param_groups[0]["fused"] and not plain.optimizer.param_groups[0].get("fused")
    for a, b in zip(plain.train(), fused.train(), strict=True):
        assert a["loss/policy"] == pytest.approx(b["loss/policy"], rel=1e-5, abs=1e-7)
    models = [t.accelerator.unwrap_model(t.policy).state_dict() for t in (plain, fused)]
    for key, value in models[0].items():
        torch.testing.assert_close(models[1][key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"unknown optim 'adafactor'; choose one of \['adamw_torch', 'adamw_torch_"):
        GRPOConfig(optim="adafactor")


def test_model_init_kwargs_and_attn_implementation_reach_from_pretrained(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    tokenizer = tiny_tokenizer()

    def loaded(**settings):
        config = GRPOConfig(
            output_dir=str(tmp_path / "run"),
            model_name_or_path=path,
            num_generations=2,
            per_device_train_batch_size=2,
            response_length=4,
            overwrite_output_dir=True,
            **settings,
        )
        trainer = GRPOTrainer(config, tokenizer=tokenizer, reward=characters, prompts=PROMPTS)
        return trainer.accelerator.unwrap_model(trainer.policy)

    model = loaded(model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    model = loaded(model_init_kwargs={"torch_dtype": "float16"}, attn_implementation="sdpa")
    assert model.dtype == torch.float16 and model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="model_init_kwargs dtype bfloat16 contradicts model_dtype float16"):
        GRPOConfig(model_dtype="float16", model_init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="attn_implementation eager contradicts attn_implementation sdpa"):
        GRPOConfig(attn_implementation="sdpa", model_init_kwargs={"attn_implementation": "eager"})


@pytest.mark.parametrize("command", ["grpo", "rloo", "ppo", "dpo", "sft", "reward"])
def test_help_lists_the_trl_fields(command, capsys):
    from otalign.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    fields = ["eval_strategy", "eval_steps", "per_device_eval_batch_size", "eval_dataset_name", "save_strategy"]
    fields += ["save_total_limit", "run_name", "bf16", "fp16", "optim", "model_init_kwargs", "attn_implementation"]
    for name in fields:
        assert f"--{name} " in text, name


# ---------------------------------------------------------------------------------------------- GRPO / RLOO
def trl_extremes(coef_1, advantages, mask, epsilon):
    """TRL 1.16 ``GRPOTrainer._compute_loss``'s lines for ``clip_ratio/low_min`` and ``/high_max`` of one
    micro-batch on one process (``coef_1`` (b, T) per token, or (b,) per sequence as ``RLOOTrainer``'s)."""
    from trl.trainer.utils import nanmax, nanmin

    is_low_clipped = (coef_1 < 1 - epsilon) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon) & (advantages > 0)
    if coef_1.dim() == 1:  # RLOOTrainer: gathered per sequence
        return nanmin(is_low_clipped.float()).item(), nanmax(is_high_clipped.float()).item()

    def masked_seq_mean(x):
        return (x * mask).sum(-1) / mask.sum(-1)

    return nanmin(masked_seq_mean(is_low_clipped.float())).item(), nanmax(
        masked_seq_mean(is_high_clipped.float())
    ).item()


@pytest.mark.parametrize(("algorithm", "loss_type"), [("grpo", "grpo"), ("rloo", "sequence"), ("rloo", "dapo")])
def test_clip_ratio_low_min_and_high_max_are_trls(tmp_path, monkeypatch, algorithm, loss_type):
    """Every micro-batch's ratios are recorded and fed to TRL's own lines; the logged value is their mean over the
    step's micro-batches (TRL averages the appended values of the logging window)."""
    pytest.importorskip("trl")
    from otalign.trainers import ppo_math as pm

    seen = []
    for name in ("policy_loss", "sequence_policy_loss"):
        original = getattr(pm, name)

        def recording(logprobs, old_logprobs, advantages, mask, *, original=original, name=name, **kwargs):
            log_ratio = (logprobs - old_logprobs).detach()
            if name == "sequence_policy_loss":  # TRL: exp(sum logp - sum old) per sequence, (b,) advantages
                coef_1 = torch.exp((log_ratio * mask).sum(1))
                seen.append(trl_extremes(coef_1, advantages, mask, kwargs["cliprange"]))
            else:  # TRL: per token, advantages (b, 1)
                seen.append(trl_extremes(torch.exp(log_ratio), advantages[:, :1], mask, kwargs["cliprange"]))
            return original(logprobs, old_logprobs, advantages, mask, **kwargs)

        monkeypatch.setattr(pm, name, recording)
    trainer = rl(
        tmp_path,
        algorithm,
        max_steps=1,
        loss_type=loss_type,
        num_iterations=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        cliprange=0.02,
    )
    metrics = trainer.train()[-1]
    assert len(seen) == 3 * 2  # iterations x micro-batches
    low = sum(s[0] for s in seen) / len(seen)
    high = sum(s[1] for s in seen) / len(seen)
    assert metrics["clip_ratio/low_min"] == pytest.approx(low, abs=1e-7)
    assert metrics["clip_ratio/high_max"] == pytest.approx(high, abs=1e-7)
    assert max(s[1] for s in seen) > 0 or max(s[0] for s in seen) > 0  # the clip binds somewhere


def test_scale_rewards_batch_divides_by_the_rollout_std_as_trl():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 5.0])
    centred = rewards - rewards.reshape(3, 2).mean(1).repeat_interleave(2)
    batch = group_advantages(rewards, 2, algorithm="grpo", scale="batch")
    torch.testing.assert_close(batch, centred / (rewards.std() + 1e-4))  # TRL: nanstd (unbiased) of all rewards
    group = group_advantages(rewards, 2, algorithm="grpo", scale="group")
    assert group[2] == group[3] == 0.0 and group[0] == pytest.approx(-1.0 / (2**0.5 + 1e-4), rel=1e-6)
    for old, new in [(True, "group"), (False, "none")]:  # the boolean configs of before keep their meaning
        torch.testing.assert_close(
            group_advantages(rewards, 2, algorithm="rloo", scale=old),
            group_advantages(rewards, 2, algorithm="rloo", scale=new),
        )
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group" == GRPOConfig().scale_rewards
    assert RLOOConfig().scale_rewards == "none"
    with pytest.raises(ConfigError, match="unknown scale_rewards 'batches'"):
        GRPOConfig(scale_rewards="batches")


def test_scale_rewards_batch_in_a_run(tmp_path, monkeypatch):
    trainer = rl(tmp_path, max_steps=1, scale_rewards="batch", per_device_train_batch_size=4)
    captured = []
    original = trainer.advantages

    def advantages(scored):
        batch = original(scored)
        captured.append((trainer.sequence_rewards(scored), batch.advantages))
        return batch

    monkeypatch.setattr(trainer, "advantages", advantages)
    trainer.train()
    rewards, got = captured[0]
    centred = rewards.double() - rewards.double().reshape(-1, 2).mean(1).repeat_interleave(2)
    torch.testing.assert_close(got.double(), centred / (rewards.double().std() + 1e-4), rtol=1e-5, atol=1e-6)
    # TRL: frac_reward_zero_std under batch scaling is whether the rollout's std is 0 (here it is not)
    assert read_metrics(tmp_path)[-1]["frac_reward_zero_std"] == 0.0


# ---------------------------------------------------------------------------------------------- dataset trainers
def dpo(tmp_path, **overrides):
    from otalign.trainers import PreferenceConfig, PreferenceTrainer

    tokenizer = tiny_tokenizer()
    pairs = str(FIXTURES / "preference_pairs.jsonl")
    settings = dict(output_dir=str(tmp_path), dataset_name=pairs, eval_dataset_name=pairs, max_steps=2)
    settings.update(per_device_train_batch_size=2, progress_bar=False, save_model=False, **overrides)
    return PreferenceTrainer(
        PreferenceConfig(**settings),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
    )


def test_dataset_trainers_take_eval_strategy_and_per_device_eval_batch_size(tmp_path):
    dpo(tmp_path / "no", eval_strategy="no").train()
    assert not any(key.startswith("eval_") for row in read_metrics(tmp_path / "no") for key in row)
    dpo(tmp_path / "steps", eval_strategy="steps").train()  # eval_steps 0: logging_steps (1), as TRL
    assert [r["step"] for r in read_metrics(tmp_path / "steps") if "eval_rewards/accuracies" in r] == [1, 2]
    one = dpo(tmp_path / "one", per_device_eval_batch_size=1)
    one.train()
    evaluated = [r for r in read_metrics(tmp_path / "one") if "eval_rewards/margins" in r]
    assert [r["step"] for r in evaluated] == [2]  # eval_strategy unset with evaluation data: after the last step
    one.config.per_device_eval_batch_size = 8  # the same policy, all pairs in one padded batch: the same metrics
    for key, value in one.evaluate().items():
        assert value == pytest.approx(evaluated[0][key], rel=1e-5, abs=1e-6), key


def test_rl_evaluate_without_held_out_prompts_says_so(tmp_path):
    with pytest.raises(
        ValueError, match="evaluation needs held-out prompts: set eval_dataset_name or pass eval_prompts"
    ):
        rl(tmp_path).evaluate()


# ---------------------------------------------------------------------------------------------- clip range, lengths
def trl_token_objective(logps, old_logps, advantages, mask, epsilon_low, epsilon_high):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (``loss_type dapo`` over one micro-batch, ``num_items_in_batch`` its
    token count) and its ``clip_ratio/*`` lines: per-token ratios, advantages (b, 1)."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    loss = (per_token_loss * mask).sum() / mask.sum()
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped

    def masked_seq_mean(x):
        return (x * mask).sum(-1) / mask.sum(-1)

    stats = {
        "clip_ratio/low_mean": (is_low_clipped.float() * mask).sum() / mask.sum(),
        "clip_ratio/high_mean": (is_high_clipped.float() * mask).sum() / mask.sum(),
        "clip_ratio/region_mean": (is_region_clipped.float() * mask).sum() / mask.sum(),
        "clip_ratio/low_min": masked_seq_mean(is_low_clipped.float()).min(),
        "clip_ratio/high_max": masked_seq_mean(is_high_clipped.float()).max(),
    }
    return loss, stats


def trl_sequence_objective(logps, old_logps, advantages, mask, epsilon_low, epsilon_high):
    """TRL 1.16 ``RLOOTrainer._compute_loss`` and its ``clip_ratio/*`` lines (one ratio per sequence)."""
    coef_1 = torch.exp((logps * mask).sum(1) - (old_logps * mask).sum(1))
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(coef_1 * advantages, coef_2 * advantages).mean()
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    return loss, {"low": is_low_clipped.float(), "high": is_high_clipped.float()}


# ratios per token: under 1 - 0.2, inside, in (1 + 0.2, 1 + 0.28) (clipped only by a symmetric range), above 1.28
LOG_RATIOS = torch.tensor([0.7, 0.95, 1.0, 1.25, 1.4]).log()


@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_epsilon_and_epsilon_high_clip_the_token_ratio_as_trl(epsilon_high):
    from otalign.trainers import ppo_math as pm

    old = -torch.arange(1, 21, dtype=torch.float32).reshape(4, 5).sqrt()
    moved = old + torch.stack([LOG_RATIOS.roll(k) for k in range(4)])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])[:, None].expand(4, 5)
    ours_in = moved.clone().requires_grad_(True)
    loss, stats = pm.policy_loss(
        ours_in, old, advantages, mask, cliprange=0.2, cliprange_high=epsilon_high, normalizer=float(mask.sum())
    )
    loss.backward()
    trl_in = moved.clone().requires_grad_(True)
    trl, trl_stats = trl_token_objective(trl_in, old, advantages[:, :1], mask, 0.2, epsilon_high)
    trl.backward()
    assert float(loss.detach()) == pytest.approx(float(trl.detach()), rel=1e-6)
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-6, atol=1e-8)
    tokens = float(mask.sum())
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert float(stats[key]) / tokens == pytest.approx(float(trl_stats[key]), abs=1e-7), key
    assert float(stats["clip_ratio/low_min"].min()) == pytest.approx(float(trl_stats["clip_ratio/low_min"]))
    assert float(stats["clip_ratio/high_max"].max()) == pytest.approx(float(trl_stats["clip_ratio/high_max"]))
    # ratio 1.25 with a positive advantage: clipped (no gradient) by 0.2, not by 0.28
    rows = torch.tensor([0, 2])
    at = (moved - old)[rows].exp().sub(1.25).abs() < 1e-6
    assert (ours_in.grad[rows][at] == 0).all() == (epsilon_high == 0.2)
    assert float(stats["clip_ratio/high_mean"]) > 0 and float(stats["clip_ratio/low_mean"]) > 0


@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_epsilon_and_epsilon_high_clip_the_sequence_ratio_as_trls_rloo(epsilon_high):
    from otalign.trainers import ppo_math as pm

    mask = torch.ones(10, 1, dtype=torch.bool)
    old = torch.zeros(10, 1)
    moved = torch.cat([LOG_RATIOS, LOG_RATIOS])[:, None]  # each ratio with either sign of advantage
    advantages = torch.tensor([1.0] * 5 + [-1.0] * 5)
    ours_in = moved.clone().requires_grad_(True)
    loss, stats = pm.sequence_policy_loss(
        ours_in, old, advantages, mask, cliprange=0.2, cliprange_high=epsilon_high, normalizer=10.0
    )
    loss.backward()
    trl_in = moved.clone().requires_grad_(True)
    trl, hits = trl_sequence_objective(trl_in, old, advantages, mask, 0.2, epsilon_high)
    trl.backward()
    assert float(loss.detach()) == pytest.approx(float(trl.detach()), rel=1e-6)
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(stats["clip_ratio/low_min"], hits["low"])
    assert torch.equal(stats["clip_ratio/high_max"], hits["high"])
    assert float(stats["clip_ratio/high_mean"]) == float(hits["high"].sum()) == (2 if epsilon_high == 0.2 else 1)


def test_epsilon_is_trls_name_of_cliprange_and_max_completion_length_of_response_length():
    default = GRPOConfig()
    assert (default.epsilon, default.cliprange, default.epsilon_high) == (0.2, None, None)  # one value, saved once
    assert default.response_length == 256 == RLOOConfig().response_length and default.max_completion_length is None
    assert GRPOConfig(cliprange=0.3).epsilon == 0.3 == GRPOConfig(epsilon=0.3).epsilon
    saved = GRPOConfig(epsilon=0.3, max_completion_length=12).to_dict()  # a config.json reused with one name changed
    assert GRPOConfig(**{**saved, "epsilon": 0.1, "response_length": 8}).response_length == 8
    with pytest.raises(ConfigError, match="^response_length=12 and max_completion_length=8 are two names"):
        GRPOConfig(**{**saved, "max_completion_length": 8})  # the saved value under the other name: one line
    assert RLOOConfig(max_completion_length=12).response_length == 12
    assert GRPOConfig(epsilon=0.3, cliprange=0.3).epsilon == 0.3  # the same value twice is no conflict
    with pytest.raises(ConfigError, match="^epsilon=0.3 and cliprange=0.2 are two names of one setting: give one$"):
        GRPOConfig(epsilon=0.3, cliprange=0.2)
    with pytest.raises(ConfigError, match="response_length=8 and max_completion_length=12 are two names"):
        RLOOConfig(response_length=8, max_completion_length=12)
    with pytest.raises(ConfigError, match="epsilon_high must be > 0"):
        GRPOConfig(epsilon_high=-0.1)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_epsilon_high_and_max_completion_length_reach_the_run(tmp_path, monkeypatch, algorithm):
    from otalign.trainers import ppo_math as pm

    bounds = []
    for name in ("policy_loss", "sequence_policy_loss"):
        original = getattr(pm, name)

        def recording(*args, original=original, **kwargs):
            bounds.append((kwargs["cliprange"], kwargs["cliprange_high"]))
            return original(*args, **kwargs)

        monkeypatch.setattr(pm, name, recording)
    trainer = rl(
        tmp_path, algorithm, max_steps=1, epsilon=0.1, epsilon_high=0.3, max_completion_length=3, response_length=None
    )
    trainer.train()
    assert bounds and set(bounds) == {(0.1, 0.3)}
    assert trainer.config.sampling.max_new_tokens == 3
    assert read_metrics(tmp_path)[-1]["completions/max_length"] <= 3


# ---------------------------------------------------------------------------------------------- truncated completions
def scored_with_two_ended(trainer):
    """A scored rollout of 4 responses where responses 0 and 2 end with EOS at position 2 and 1 and 3 are cut."""
    from otalign.trainers.metrics import Timer

    rollout, rows = trainer.sample(1)
    eos = trainer.tokenizer.eos_token_id
    rollout.responses[rollout.responses == eos] = eos + 1
    rollout.responses[[0, 2], 2] = eos
    rollout.response_mask[:] = True
    rollout.response_mask[[0, 2], 3:] = False
    return trainer.score_rollout(rollout, rows, Timer("cpu"))


def loss_gradient(trainer, batch, monkeypatch):
    """d loss / d logits (b, T, V) of the whole rollout as one micro-batch, and the loss statistics."""
    from otalign.generation import response_logits
    from otalign.trainers import critic_free

    rollout = batch.scored.rollout
    leaf = response_logits(trainer.policy, rollout).detach().requires_grad_(True)
    monkeypatch.setattr(critic_free, "response_logits", lambda *args: leaf)
    rows = torch.arange(rollout.responses.shape[0])
    loss, _, stats = trainer.loss(batch, rows, trainer.normalizers(batch, (rows,))[0])
    loss.backward()
    return leaf.grad, stats


def test_mask_truncated_completions_gives_a_cut_response_no_gradient(tmp_path, monkeypatch):
    """TRL's ``mask_truncated_completions``: the cut responses' completion mask is zeroed. With ``loss_type grpo``
    (mean over all responses of their token means) the ended ones' gradient is unchanged; with ``dapo`` the
    normaliser is the ended ones' token count; the group baselines still use the cut responses' rewards."""
    trainer = rl(tmp_path, mask_truncated_completions=True, loss_type="grpo", beta=0.1, max_steps=1)
    scored = scored_with_two_ended(trainer)
    masked = trainer.advantages(scored)
    masked_grad, _ = loss_gradient(trainer, masked, monkeypatch)
    trainer.config.mask_truncated_completions = False
    plain = trainer.advantages(scored)
    plain_grad, _ = loss_gradient(trainer, plain, monkeypatch)
    torch.testing.assert_close(masked.advantages, plain.advantages)
    per_row = plain_grad.abs().flatten(1).sum(1)
    assert (per_row > 0).all()  # every response has a gradient without the option (the KL term at least)
    assert (masked_grad[[1, 3]] == 0).all()
    torch.testing.assert_close(masked_grad[[0, 2]], plain_grad[[0, 2]])
    assert masked.scored.mask[[1, 3]].sum() == 0 and torch.equal(masked.scored.mask[[0, 2]], scored.mask[[0, 2]])
    trainer.config.mask_truncated_completions, trainer.config.loss_type = True, "dapo"
    dapo = trainer.advantages(scored)
    assert trainer.normalizers(dapo, (torch.arange(4),)) == [6.0]  # TRL: num_items_in_batch over the loss mask


@pytest.mark.filterwarnings("ignore:metrics.jsonl:RuntimeWarning")
def test_mask_truncated_completions_in_a_run_keeps_the_completion_metrics(tmp_path):
    """A run in which every response is cut (response_length 2): no gradient at all, TRL's ``completions/*`` still
    over every response."""
    trainer = rl(tmp_path, mask_truncated_completions=True, max_steps=1, response_length=2, loss_type="dapo")
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.train()[-1]
    assert metrics["completions/clipped_ratio"] == 1.0 and metrics["completions/mean_length"] == 2.0
    assert metrics["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))
    # TRL: a response without tokens has a NaN share in nanmin/nanmax, so with none left the extremes are NaN
    assert math.isnan(metrics["clip_ratio/low_min"]) and metrics["clip_ratio/low_mean"] == 0.0


# ---------------------------------------------------------------------------------------------- log_completions
def test_log_completions_appends_each_logged_steps_samples(tmp_path, capsys):
    trainer = rl(tmp_path, log_completions=True, max_steps=3, logging_steps=2, num_completions_to_print=1)
    captured = []
    advantages = trainer.advantages
    trainer.advantages = lambda scored: captured.append(advantages(scored)) or captured[-1]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 4 + [3] * 4  # every logging_steps and the last step, as metrics
    assert set(rows[0]) == {"step", "prompt", "completion", "characters", "advantage"}
    for step, batch in ((2, captured[1]), (3, captured[2])):
        logged = [r for r in rows if r["step"] == step]
        assert [r["completion"] for r in logged] == batch.scored.rollout.response_texts
        assert [r["prompt"] for r in logged] == batch.scored.rollout.prompt_texts
        assert [r["characters"] for r in logged] == pytest.approx([len(r["completion"]) / 20 for r in logged])
        assert [r["advantage"] for r in logged] == pytest.approx(batch.advantages.tolist())
    printed = [line for line in capsys.readouterr().out.splitlines() if '"completion"' in line]
    assert len(printed) == 2  # num_completions_to_print at each of the 2 logged steps
    rl(
        tmp_path, log_completions=True, max_steps=1, overwrite_output_dir=True
    ).train()  # a fresh run in the same folder starts the file anew
    assert [json.loads(line)["step"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()] == [1] * 4


def test_log_completions_resumed_reads_as_one_run(tmp_path):
    def steps_and_texts():
        lines = (tmp_path / "completions.jsonl").read_text().splitlines()
        return [(row["step"], row["completion"]) for row in map(json.loads, lines)]

    rl(tmp_path, log_completions=True, max_steps=3, save_steps=1).train()
    whole = steps_and_texts()
    resumed = rl(
        tmp_path,
        log_completions=True,
        max_steps=3,
        resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-2"),
    )
    resumed.train()  # step 3 again: its rows replaced, not doubled
    assert steps_and_texts() == whole and [step for step, _ in whole] == [1] * 4 + [2] * 4 + [3] * 4


def test_log_completions_logs_a_table_to_trackers_that_take_one(tmp_path):
    class TableTracker:  # the calls accelerate's WandBTracker takes
        name, tables = "table", []

        def log(self, values, step=None, **kwargs):
            pass

        def finish(self):
            pass

        def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs):
            self.tables.append((table_name, columns, data, step))

    trainer = rl(tmp_path, log_completions=True, max_steps=1)
    trainer.accelerator.trackers.append(TableTracker())
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    [(name, columns, data, step)] = TableTracker.tables
    assert (name, step, columns) == ("completions", 1, list(rows[0]))
    assert data == [list(row.values()) for row in rows]


def test_log_completions_off_writes_nothing(tmp_path):
    rl(tmp_path, max_steps=1).train()
    assert not (tmp_path / "completions.jsonl").exists()


# ---------------------------------------------------------------------------------------------- completion_only_loss
def sft_rows(tmp_path, data, **settings):
    from otalign.trainers.sft import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, progress_bar=False, **settings)
    trainer = SFTTrainer(config, model=tiny_causal_lm(tokenizer, seed=0), tokenizer=tokenizer, train_data=data)
    return trainer.train_rows


def test_completion_only_loss_masks_the_prompt_tokens_as_trl(tmp_path):
    from otalign.data.sft import IGNORE_INDEX, SFTExample

    pair = [SFTExample("write about the cat .", "the cat is good .")]
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("write about the cat .")["input_ids"]
    completion = tokenizer("the cat is good .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for setting in (None, True):  # TRL: None is True for prompt-completion rows
        [(ids, labels)] = sft_rows(tmp_path, pair, completion_only_loss=setting)
        assert ids == prompt + completion and labels == [IGNORE_INDEX] * len(prompt) + completion
    [(ids, labels)] = sft_rows(tmp_path, pair, completion_only_loss=False)
    assert ids == prompt + completion and labels == ids  # TRL: labels = input_ids, the whole sequence
    text = [SFTExample(text="the cat is good .")]
    assert sft_rows(tmp_path, text)[0][1] == sft_rows(tmp_path, text, completion_only_loss=False)[0][1]
    with pytest.raises(
        ValueError, match="train_data, row 1: completion_only_loss true needs prompt-completion rows, got"
    ):
        sft_rows(tmp_path, text, completion_only_loss=True)


@pytest.mark.parametrize(
    ("command", "fields"),
    [
        ("grpo", ["epsilon", "epsilon_high", "max_completion_length", "mask_truncated_completions"]),
        ("rloo", ["epsilon", "epsilon_high", "max_completion_length", "log_completions", "num_completions_to_print"]),
        ("sft", ["completion_only_loss"]),
    ],
)
def test_help_lists_the_clip_length_and_logging_fields(command, fields, capsys):
    from otalign.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for name in fields:
        assert f"--{name} " in text, name
