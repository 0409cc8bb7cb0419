"""Peak memory of scoring one RL rollout, by rollout size: one-pass micro-batched scoring vs the whole-rollout path.

A tiny Llama (2 layers, hidden 32) with Qwen's 151,936-token vocabulary scores a rollout of B random responses of T
tokens (after a 16-token prompt) with the policy and a reference, as an RL step does (``otalign.scoring``:
log-probabilities, exact KL and entropy, the regularizer's penalty). Each measurement runs in a fresh process and
reports its peak memory above the models' own: the peak resident set size on CPU (``ru_maxrss``), the peak of
``torch.cuda.max_memory_allocated`` on CUDA. Rows:

- ``plain forward``: one forward of one scoring chunk (``--chunk`` rows) that keeps its (chunk, T, V) logits, the
  yardstick of the issue (scoring should cost at most 1.5x of it, and stay flat in B);
- ``one pass``: :func:`otalign.scoring.score_rollout` with ``chunk_size=--chunk``;
- ``whole rollout``: the path before micro-batching (both models' (B, T, V) logits at once, then log-softmax, KL and
  the penalty), run only where it fits in ``--whole-limit-gb``.

On CPU the resident set also holds what glibc's allocator keeps after frees: with its default (dynamic) mmap
threshold, heap fragmentation grows with the number of pieces scored; ``--mmap-threshold 1048576`` fixes the
threshold so the peak measures live memory (both runs are committed).

    python benchmarks/scoring_memory.py                          # B = 8, 32, 128; T = 512; CPU
    python benchmarks/scoring_memory.py --device cuda --out benchmarks/results/gpu_scoring_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 151_936
PROMPT = 16


def models(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(LlamaForCausalLM(config).to(device).eval().requires_grad_(False))
    return pair


def rollout(batch: int, steps: int, device: str):
    from otalign.generation import Rollout

    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(VOCAB, (batch, PROMPT + steps), generator=gen).to(device)
    mask = torch.ones(batch, steps, dtype=torch.bool, device=device)
    attention = torch.ones_like(sequences, dtype=torch.bool)
    positions = torch.arange(PROMPT + steps, device=device).expand(batch, -1)
    return Rollout(sequences, attention, positions, PROMPT, sequences[:, PROMPT:], mask, [""] * batch, [""] * batch)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def child(mode: str, batch: int, steps: int, chunk: int, device: str) -> dict:
    """One measurement in this (fresh) process: peak memory above the models' and the rollout's."""
    from otalign.generation import kl_and_entropy, response_logits
    from otalign.regularizers import build_regularizer
    from otalign.scoring import score_rollout

    policy, reference = models(device)
    batch_rollout = rollout(batch, steps, device)
    regularizer = build_regularizer("rkl")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_bytes(device)
    with torch.no_grad():
        if mode == "plain":
            logits = response_logits(policy, batch_rollout, slice(0, chunk))
            del logits
        elif mode == "pass":
            score_rollout(policy, reference, batch_rollout, regularizer, temperature=1.0, chunk_size=chunk)
        else:  # the whole-rollout path this replaced
            policy_logp = torch.log_softmax(response_logits(policy, batch_rollout).float(), -1)
            ref_logp = torch.log_softmax(response_logits(reference, batch_rollout).float(), -1)
            kl_and_entropy(policy_logp, ref_logp, normalized=True)
            regularizer.penalty(policy_logp, ref_logp, batch_rollout.responses, batch_rollout.response_mask)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"peak_bytes": peak_bytes(device) - base, "baseline_bytes": base}


def measure(mode: str, batch: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(batch), "--steps", str(args.steps)]
    command += ["--chunk", str(args.chunk), "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold:  # a fixed glibc mmap threshold: freed large buffers go back to the system at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help="rollout sizes B")
    parser.add_argument("--steps", type=int, default=512, help="response tokens T")
    parser.add_argument("--chunk", type=int, default=8, help="scoring chunk (rows per forward)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-limit-gb", type=float, default=12.0, help="skip the whole-rollout path above this")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="bytes: set glibc's MALLOC_MMAP_THRESHOLD_ in each measurement (0: glibc's dynamic default, whose "
        "heap fragmentation grows the RSS with the number of pieces; a fixed threshold measures live memory)",
    )
    parser.add_argument("--out", default="benchmarks/results/scoring_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps, args.chunk, args.device)))
        return
    gib = 2**30
    plain = measure("plain", args.chunk, args)["peak_bytes"]
    rows = []
    for batch in args.batches:
        row = {"B": batch, "one_pass_bytes": measure("pass", batch, args)["peak_bytes"]}
        whole_estimate = 2 * 2 * batch * (args.steps + 1) * VOCAB * 4  # two models' logits and log-probs
        if whole_estimate <= args.whole_limit_gb * gib:
            row["whole_rollout_bytes"] = measure("whole", batch, args)["peak_bytes"]
        rows.append(row)
        print(f"B={batch}: {row}", file=sys.stderr)
    print(f"\nscoring peak memory above the models (T={args.steps}, V={VOCAB}, chunk={args.chunk}, {args.device})")
    print(f"{'B':>5} | {'one pass GiB':>12} | {'/ plain fwd':>11} | {'whole rollout GiB':>17}")
    for row in rows:
        whole = f"{row['whole_rollout_bytes'] / gib:17.2f}" if "whole_rollout_bytes" in row else f"{'(skipped)':>17}"
        print(f"{row['B']:>5} | {row['one_pass_bytes'] / gib:12.2f} | {row['one_pass_bytes'] / plain:11.2f} | {whole}")
    print(f"plain forward of one chunk ({args.chunk} rows, logits kept): {plain / gib:.2f} GiB")
    flat = max(r["one_pass_bytes"] for r in rows) / min(r["one_pass_bytes"] for r in rows)
    print(f"one pass, largest / smallest B: {flat:.2f}x")
    result = {
        "benchmark": "scoring_memory",
        "command": " ".join(sys.argv),
        "device": args.device,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "vocab": VOCAB,
        "steps": args.steps,
        "chunk": args.chunk,
        "mmap_threshold": args.mmap_threshold,
        "plain_forward_bytes": plain,
        "rows": rows,
        "flatness": flat,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
