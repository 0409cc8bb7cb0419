"""PPO step time on the default model: RKL vs Wasserstein (WPR) penalty, same seed, batch and prompts.

Runs ``--warmup + --steps`` PPO steps per regularizer with :class:`otalign.trainers.PPOTrainer` from the
same initial policy (so the first rollouts are identical), averages the timed steps, and reports each
phase (generation, forward passes, penalty, update), the penalty's share of the step, and the WPR/RKL
step-time ratio (the WPR paper reports +2.5% for Gemma-2B on 4 A100s). Prints a table and writes JSON
to ``benchmarks/results/ppo_step.json``.

    python benchmarks/ppo_step.py                       # CPU defaults (small batch, short responses)
    python benchmarks/ppo_step.py --batch-size 32 --response-length 128 --steps 5   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from otalign.data import load_prompts
from otalign.models import frozen_copy, load_causal_lm, load_tokenizer
from otalign.rewards import build_reward
from otalign.trainers import PPOConfig, PPOTrainer

PHASES = ("generation", "forward", "penalty", "update", "step")


def run(args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer(args.model)
    if args.random_weights:  # the model's shape and tokenizer without its weights (timing only)
        torch.manual_seed(args.seed)
        config = AutoConfig.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    else:
        base = load_causal_lm(args.model, dtype=args.dtype)
    reference = frozen_copy(base)
    reward = build_reward("sentiment")
    prompts = load_prompts("builtin", "train")
    results = {}
    for name in ("rkl", "wasserstein"):
        with tempfile.TemporaryDirectory() as out:
            config = PPOConfig(
                output_dir=out,
                seed=args.seed,
                max_steps=args.warmup + args.steps,
                per_device_train_batch_size=args.batch_size,
                response_length=args.response_length,
                regularizer=name,
                use_peft=args.peft,
                mixed_precision=args.mixed_precision,
                progress_bar=False,
                save_model=False,
            )
            trainer = PPOTrainer(
                config,
                policy=copy.deepcopy(base),
                ref_model=reference,
                tokenizer=tokenizer,
                reward=reward,
                prompts=prompts,
            )
            timed = trainer.train()[args.warmup :]
        results[name] = {p: sum(m[f"time/{p}"] for m in timed) / len(timed) for p in PHASES}
        results[name]["tokens_per_step"] = sum(m["response/length"] for m in timed) / len(timed) * args.batch_size
        if name == "wasserstein":
            results[name]["sinkhorn_iters"] = max(m["sinkhorn/iters"] for m in timed)
    rkl, wpr = results["rkl"], results["wasserstein"]
    return {
        "settings": vars(args),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "seconds": results,
        "penalty_share": {name: r["penalty"] / r["step"] for name, r in results.items()},
        "step_time_ratio_wpr_over_rkl": wpr["step"] / rkl["step"],
    }


def print_table(report: dict) -> None:
    rkl, wpr = report["seconds"]["rkl"], report["seconds"]["wasserstein"]
    print(f"PPO step on {report['settings']['model']} ({report['device']}, {report['threads']} threads)")
    print(f"{'phase (s/step)':<16} {'RKL':>10} {'WPR':>10} {'WPR/RKL':>9}")
    for phase in PHASES:
        ratio = wpr[phase] / rkl[phase] if rkl[phase] > 0 else float("nan")
        print(f"{phase:<16} {rkl[phase]:>10.3f} {wpr[phase]:>10.3f} {ratio:>9.2f}")
    share = report["penalty_share"]
    print(f"penalty share of step: RKL {share['rkl']:.1%}, WPR {share['wasserstein']:.1%}")
    print(f"step-time ratio WPR/RKL: {report['step_time_ratio_wpr_over_rkl']:.3f} (paper: 1.025)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per regularizer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--peft", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument(
        "--random-weights", action="store_true", help="--model is a config + tokenizer folder: random weights"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ppo_step.json"))
    args = parser.parse_args()
    report = run(args)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
