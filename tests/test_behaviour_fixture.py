"""Refactors keep behaviour: short PPO, GRPO, RLOO, DPO (with OTPO weights) and SFT runs on tiny random models
log the same metrics, to 1e-6, as the committed fixture recorded before the code was restructured.

The fixture was written by the code before the change (``python tests/test_behaviour_fixture.py --write`` on that
commit). A change that alters a metric on purpose rewrites it in the same commit and says why.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import (
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    PreferenceConfig,
    PreferenceTrainer,
    RLOOConfig,
    RLOOTrainer,
    read_metrics,
)
from otalign.trainers.sft import SFTConfig, SFTTrainer

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = FIXTURES / "behaviour_metrics.json"
TOLERANCE = 1e-6
PROMPTS = [
    "write one sentence about the cat .",
    "tell you about my day .",
    "describe the city in the rain .",
    "what is your friend ?",
]
COMMON = dict(max_steps=2, learning_rate=1e-3, progress_bar=False, save_model=False)
RL = dict(COMMON, per_device_train_batch_size=4, response_length=6, wpr_top_k=8)


def characters(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that differs between responses from the start: characters / 20."""
    return [len(r) / 20 for r in responses]


def run_rl(config_class, trainer_class, output_dir: Path, **overrides) -> None:
    tokenizer = tiny_tokenizer()
    trainer_class(
        config_class(output_dir=str(output_dir), **{**RL, **overrides}),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        reward=characters,
        prompts=PROMPTS,
    ).train()


def run_dpo(output_dir: Path) -> None:
    tokenizer = tiny_tokenizer()
    PreferenceTrainer(
        PreferenceConfig(
            output_dir=str(output_dir),
            dataset_name=str(FIXTURES / "preference_pairs.jsonl"),
            per_device_train_batch_size=4,
            token_weighting="otpo",
            **COMMON,
        ),
        policy=tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
    ).train()


def run_sft(output_dir: Path) -> None:
    tokenizer = tiny_tokenizer()
    SFTTrainer(
        SFTConfig(
            output_dir=str(output_dir),
            dataset_name=str(FIXTURES / "sft_pairs.jsonl"),
            per_device_train_batch_size=4,
            **COMMON,
        ),
        model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
    ).train()


RUNS = {
    "ppo_rkl": lambda out: run_rl(PPOConfig, PPOTrainer, out, regularizer="rkl"),
    "ppo_wasserstein": lambda out: run_rl(PPOConfig, PPOTrainer, out, regularizer="wasserstein"),
    "ppo_js_in_loss": lambda out: run_rl(PPOConfig, PPOTrainer, out, regularizer="js", penalty_in="loss"),
    # the fixture's k3 term predates use_bias_correction_kl (TRL 1.16's default, now otalign's)
    "grpo_kl": lambda out: run_rl(GRPOConfig, GRPOTrainer, out, num_generations=2, use_bias_correction_kl=False),
    "grpo_wasserstein_in_loss": lambda out: run_rl(
        GRPOConfig, GRPOTrainer, out, num_generations=2, regularizer="wasserstein"
    ),
    "grpo_wasserstein_current": lambda out: run_rl(
        GRPOConfig, GRPOTrainer, out, num_generations=2, regularizer="wasserstein", loss_potentials="current"
    ),
    "rloo_wasserstein": lambda out: run_rl(  # RLOO's per-token objective of the recording (now loss_type grpo)
        RLOOConfig,
        RLOOTrainer,
        out,
        num_generations=2,
        regularizer="wasserstein",
        gradient_accumulation_steps=2,
        loss_type="grpo",
    ),
    "dpo_otpo": run_dpo,
    "sft": run_sft,
}


def recorded_metrics(name: str, output_dir: Path) -> list[dict[str, float]]:
    """Run ``name`` single-threaded into ``output_dir`` and return its logged metrics without timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        RUNS[name](output_dir)
    finally:
        torch.set_num_threads(threads)
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(output_dir)]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_match_the_recorded_run(tmp_path, name):
    expected = json.loads(RECORDED.read_text())[name]
    got = recorded_metrics(name, tmp_path)
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for row_expected, row_got in zip(expected, got, strict=True):
        missing = sorted(set(row_expected) - set(row_got))
        assert not missing, f"{name} step {row_expected['step']}: metrics no longer logged: {missing}"
        for key, value in row_expected.items():
            if value is None or isinstance(value, str):
                assert row_got[key] == value, (name, key)
                continue
            assert math.isclose(row_got[key], value, rel_tol=TOLERANCE, abs_tol=TOLERANCE), (
                f"{name} step {row_expected['step']} {key}: {row_got[key]!r} != recorded {value!r}"
            )


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the fixture from this checkout's code")
    args = parser.parse_args()
    if not args.write:
        sys.exit(parser.format_usage())
    with tempfile.TemporaryDirectory() as tmp:
        result = {name: recorded_metrics(name, Path(tmp) / name) for name in sorted(RUNS)}
    RECORDED.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDED}")
