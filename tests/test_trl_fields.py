"""TRL 1.16 / transformers fields with their meaning: the RL trainers' held-out evaluation (``eval_strategy``,
``eval_steps``, ``per_device_eval_batch_size``, ``eval_dataset_name``), ``save_strategy`` and ``save_total_limit``,
``run_name``, ``bf16``/``fp16``, ``optim``, ``model_init_kwargs`` and ``attn_implementation``, GRPO/RLOO's
``clip_ratio/low_min`` and ``/high_max`` and ``scale_rewards``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otalign.config import ConfigError
from otalign.eval.policy import evaluate_policy
from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.rewards import build_reward
from otalign.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, RLOOConfig, RLOOTrainer, read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")
FIXTURES = Path(__file__).parent / "fixtures"

PROMPTS = [
    "write one sentence about the cat .",
    "tell you about my day .",
    "describe the city in the rain .",
    "what is your friend ?",
]
HELD_OUT = ["the dog walks in the park .", "a friend writes about the sun .", "what is the rain ?"]
TRAINERS = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


def characters(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that differs between responses from the start: characters / 20."""
    return [len(r) / 20 for r in responses]


def rl(tmp_path, algorithm: str = "grpo", *, eval_prompts=None, **overrides):
    config_cls, trainer_cls = TRAINERS[algorithm]
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        response_length=5,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
        wpr_top_k=8,
        reward_fn=["sentiment"],
    )
    if algorithm != "ppo":
        settings["num_generations"] = 2
    settings.update(overrides)
    return trainer_cls(
        config_cls(**settings),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        reward=characters,
        prompts=PROMPTS,
        eval_prompts=eval_prompts,
    )


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
