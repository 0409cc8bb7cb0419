"""Surrogate potentials from the rollout policy vs from the current policy (``loss_potentials``), GRPO with the
Wasserstein penalty in the loss, on a tiny random model (seconds; CPU).

    python benchmarks/loss_potentials.py [--steps 10] [--num-iterations 4]

``rollout`` solves the transport problems once per step, at the policy that sampled; ``current`` re-solves them
at the current policy for every micro-batch of every inner epoch (one more reference forward each time), so its
gradient is the exact distance gradient even after the first optimizer step of the batch. Prints the update time
per step, the final mean distance and reward; writes ``benchmarks/results/loss_potentials.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import GRPOConfig, GRPOTrainer

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["write one sentence about the cat .", "tell you about my day .", "describe the city in the rain ."]


def good_share(prompts: list[str], responses: list[str]) -> list[float]:
    return [r.split().count("good") / max(len(r.split()), 1) for r in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--num-iterations", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON (and plot)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="otalign-bench-potentials-")
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    results = {}
    for mode in ("rollout", "current"):
        config = GRPOConfig(
            output_dir=str(Path(scratch.name) / mode),
            max_steps=args.steps,
            per_device_train_batch_size=12,
            num_generations=4,
            num_iterations=args.num_iterations,
            num_mini_batches=2,
            response_length=6,
            learning_rate=1e-2,
            regularizer="wasserstein",
            wpr_top_k=16,
            beta=0.5,
            penalty_in="loss",
            loss_potentials=mode,
            progress_bar=False,
            save_model=False,
        )
        trainer = GRPOTrainer(
            config,
            policy=tiny_causal_lm(tokenizer, seed=0),
            ref_model=tiny_causal_lm(tokenizer, seed=0),
            tokenizer=tokenizer,
            reward=good_share,
            prompts=PROMPTS,
        )
        history = trainer.train()
        results[mode] = {
            "update_seconds_per_step": sum(h["time/update"] for h in history) / len(history),
            "penalty_seconds_per_step": sum(h["time/penalty"] for h in history) / len(history),
            "final_distance": history[-1]["regularizer/distance"],
            "final_reward": history[-1]["reward/mean"],
            "distance": [h["regularizer/distance"] for h in history],
        }
    print(f"{'potentials':10} {'update s/step':>13} {'penalty s/step':>14} {'final W':>9} {'final reward':>12}")
    for mode, r in results.items():
        print(
            f"{mode:10} {r['update_seconds_per_step']:13.3f} {r['penalty_seconds_per_step']:14.3f} "
            f"{r['final_distance']:9.4f} {r['final_reward']:12.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_potentials.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
