"""GRPO with a KL penalty vs GRPO with the Wasserstein penalty on the built-in verifiable arithmetic task.

    python benchmarks/grpo_verifiable.py                 # default model (SmolLM2-135M-Instruct), CPU, minutes
    python benchmarks/grpo_verifiable.py --steps 40 --lora

Both runs share everything but the regularizer: the ``arithmetic`` prompts (one-digit sums) and reward (1 when the
last integer of the response is the sum), ``num_generations`` responses per prompt, the penalty in the loss
(k3 for the KL, the envelope-theorem surrogate for Wasserstein), each regularizer's default beta (or
``--beta-kl`` / ``--beta-w``), the same seeds. Per step it records the mean reward, the exact per-token KL and
the regularizer's own measured distance (``regularizer/distance``: the KL, or the Wasserstein value), and the
held-out accuracy (greedy decoding on the 30 test problems) before and after training.

Results: a table, ``benchmarks/results/grpo_verifiable.json`` and ``benchmarks/results/grpo_verifiable.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from otalign.data import load_prompt_rows, render_prompt
from otalign.generation import encode_prompts, left_pad
from otalign.models import frozen_copy, load_causal_lm, load_tokenizer
from otalign.rewards import arithmetic_reward
from otalign.trainers import GRPOConfig, GRPOTrainer

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def held_out_accuracy(model, tokenizer, max_new_tokens: int) -> float:
    """Share of the 30 test problems answered correctly with greedy decoding."""
    rows = load_prompt_rows("arithmetic", "test")
    texts = [render_prompt(r["prompt"], tokenizer) for r in rows]
    ids, mask = left_pad(encode_prompts(tokenizer, texts, max_prompt_length=512), tokenizer.pad_token_id, "cpu")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    answers = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    scores = arithmetic_reward(texts, answers, [r["answer"] for r in rows])
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (then use a larger learning rate)")
    parser.add_argument("--beta-kl", type=float, default=None)
    parser.add_argument("--beta-w", type=float, default=None)
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON (and plot)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="otalign-bench-grpo-")
    torch.manual_seed(0)

    tokenizer = load_tokenizer("default")
    base = load_causal_lm("default")
    reference = frozen_copy(base)
    before = held_out_accuracy(base, tokenizer, args.response_length)
    print(f"held-out accuracy of the reference: {before:.3f}", flush=True)
    runs = {}
    for name, regularizer, beta in (("kl", "kl", args.beta_kl), ("wasserstein", "wasserstein", args.beta_w)):
        config = GRPOConfig(
            output_dir=str(Path(scratch.name) / name),
            max_steps=args.steps,
            per_device_train_batch_size=args.prompts_per_step * args.num_generations,
            num_generations=args.num_generations,
            response_length=args.response_length,
            learning_rate=args.learning_rate,
            num_iterations=args.num_iterations,
            use_peft=args.lora,
            regularizer=regularizer,
            beta=beta,
            penalty_in="loss",
            use_bias_correction_kl=False,  # the committed run's KL term (TRL 1.16's default multiplies it by the ratio)
            wpr_top_k=32,
            progress_bar=False,
            save_model=False,
        )
        trainer = GRPOTrainer(config, policy=copy.deepcopy(base), ref_model=reference, tokenizer=tokenizer)
        start = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - start
        policy = trainer.accelerator.unwrap_model(trainer.policy)
        after = held_out_accuracy(policy, tokenizer, args.response_length)
        runs[name] = {
            "beta": trainer.beta,
            "seconds": seconds,
            "held_out_accuracy": after,
            "history": [
                {k: row[k] for k in ("reward/mean", "kl/exact", "regularizer/distance", "loss/penalty")}
                for row in history
            ],
        }
        print(f"{name}: {seconds:.0f} s, held-out accuracy {before:.3f} -> {after:.3f}", flush=True)

    header = ("regularizer", "reward first5", "reward last5", "KL last5", "D last5", "held-out")
    print("\n{:12} {:>13} {:>12} {:>9} {:>9} {:>9}".format(*header))
    for name, run in runs.items():
        h = run["history"]

        def mean(key, part, h=h):
            rows = h[:5] if part == "first" else h[-5:]
            return sum(r[key] for r in rows) / len(rows)

        print(
            f"{name:12} {mean('reward/mean', 'first'):13.3f} {mean('reward/mean', 'last'):12.3f} "
            f"{mean('kl/exact', 'last'):9.4f} {mean('regularizer/distance', 'last'):9.4f} "
            f"{run['held_out_accuracy']:9.3f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "reference_held_out_accuracy": before, "runs": runs}
    (out / "grpo_verifiable.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    plot(runs, out / "grpo_verifiable.png")


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run in runs.items():
        steps = range(1, len(run["history"]) + 1)
        for ax, key in zip(axes, ("reward/mean", "kl/exact", "regularizer/distance"), strict=True):
            ax.plot(steps, [r[key] for r in run["history"]], label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
    axes[2].set_title("regularizer/distance (KL or W, own units)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
