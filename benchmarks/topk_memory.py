"""Memory per generated position of the Wasserstein penalty from a top-k record vs from full logits.

The top-k path is what a framework that never builds ``(B, T, V)`` logits gives otalign (a fused or chunked LM
head, a top-k "teacher" served by vLLM): a :class:`~otalign.regularizers.TopKLogProbs` record of ``k`` ids and
log-probabilities per side and position, scored by ``evaluate_topk``. The full-logits path is ``evaluate`` on
``(1, N, V)`` policy and reference logits. Each case runs in a fresh process, which first builds the regularizer
(the ``(V, d)`` embedding matrix, d = 64: the model's, there in both paths) and solves one position (one-off
caches), then measures the peak growth of its resident set (``PeakRSS`` of ``benchmarks/penalty.py``, sampled
every millisecond) while it builds the path's inputs and solves: the record for the top-k path (made directly,
no V-sized tensor), both logits tensors for the full path. Each path runs at two position counts ``N1 < N2``, and
the memory per position is the slope ``(peak(N2) - peak(N1)) / (N2 - N1)``, which removes the constant costs.
Both paths solve in chunks of positions whose working set is bounded by the regularizer's ``max_chunk_elements``
(2^24 elements, 64 MiB, by default); here it is 2^20 (``CHUNK``), so that every N spans several chunks and the
slope is the memory kept per position (the inputs, the penalties and the support gradient), not a chunk's.
Each case runs with glibc's mmap threshold fixed (``MMAP_THRESHOLD``) so that the resident set follows live
memory. The table also shows, in brackets, what each path must hold per position by count (:func:`kept_bytes`).

Synthetic distributions: per position, the two sides' top-k lists overlap in half their ids; the listed masses
are a random 90% of each side's mass (the rest is dust). The full path's logits are ``3 * N(0, 1)`` (policy: the
reference's plus ``0.3 * N(0, 1)``). Top-k solves use ``max_iter`` 20 (memory does not depend on it).

    python benchmarks/topk_memory.py       # V in {49152, 151936}, k in {16, 64, 128}: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from penalty import PeakRSS  # noqa: E402

DIM = 64
MAX_ITER = 20
CHUNK = 2**20
MMAP_THRESHOLD = 2**20
"""glibc's mmap threshold in each case (as ``benchmarks/scoring_memory.py --mmap-threshold``): buffers above it go back
to the system when freed, so that the resident set measures live memory, not the allocator's dynamic threshold."""


def record(count: int, k: int, vocab: int, seed: int = 0):
    """A valid :class:`TopKLogProbs` of ``count`` positions built from ``O(count * k)`` numbers only."""
    from otalign.regularizers import TopKLogProbs

    gen = torch.Generator().manual_seed(seed)
    union = 3 * k // 2  # policy ids: the first k of the union, reference ids: the last k (k // 2 shared)
    offset = torch.randint(vocab, (count, 1), generator=gen)
    ids = (offset + torch.arange(union) * (vocab // union)) % vocab  # distinct per row
    listed = torch.log(0.9 * torch.softmax(torch.randn(count, union, generator=gen), -1))
    listed_ref = torch.log(0.9 * torch.softmax(torch.randn(count, union, generator=gen), -1))
    policy, ref = slice(0, k), slice(union - k, union)
    return TopKLogProbs(
        actions=ids[:, 0].clone(),
        policy_ids=ids[:, policy].contiguous(),
        policy_logprobs=listed[:, policy].contiguous(),
        ref_ids=ids[:, ref].contiguous(),
        ref_logprobs=listed_ref[:, ref].contiguous(),
        policy_at_ref_ids=listed[:, ref].contiguous(),
        ref_at_policy_ids=listed_ref[:, policy].contiguous(),
        policy_at_actions=listed[:, 0].clone(),
        ref_at_actions=listed_ref[:, 0].clone(),
    )


def child(path: str, vocab: int, k: int, count: int) -> dict:
    """One case in this (fresh) process: the peak resident-set growth of building the inputs and solving."""
    from otalign.regularizers import build_regularizer

    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(vocab, DIM, generator=gen) / (2 * DIM) ** 0.5
    regularizer = build_regularizer(
        "wasserstein", embeddings=embeddings, top_k=k, max_iter=MAX_ITER, max_chunk_elements=CHUNK
    )
    regularizer.evaluate_topk(record(1, k, vocab, seed=1), support_gradient=True)  # one-off caches
    with PeakRSS() as rss:
        if path == "topk":
            out = regularizer.evaluate_topk(record(count, k, vocab), support_gradient=True, check=False)
        else:
            ref = 3.0 * torch.randn(1, count, vocab, generator=gen)
            policy = torch.randn(1, count, vocab, generator=gen).mul_(0.3).add_(ref)
            actions = torch.randint(vocab, (1, count), generator=gen)
            out = regularizer.evaluate(policy, ref, actions, support_gradient=True)
        assert out.gradient is not None
    return {"peak_bytes": rss.growth}


def kept_bytes(path: str, vocab: int, k: int) -> int:
    """Bytes per position the path must hold at once, by count (float32 log-probabilities, int64 ids): the full
    path's two rows of V logits; the top-k path's record (``2k + 1`` ids, ``4k + 2`` log-probabilities) plus its
    support gradient (``2k + 1`` slots of id, flag and phi; dust, value) and penalty."""
    if path == "full":
        return 2 * vocab * 4
    slots = 2 * k + 1
    return slots * 8 + (4 * k + 2) * 4 + slots * (8 + 1 + 4) + 3 * 4


def measure(path: str, vocab: int, k: int, count: int, threads: int) -> int:
    command = [sys.executable, __file__, "--child", path, str(vocab), str(k), str(count), "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{path} V={vocab} k={k} N={count} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[49_152, 151_936])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--topk-positions", type=int, nargs=2, default=[1024, 2048], help="N1 N2 of the top-k path")
    parser.add_argument("--full-positions", type=int, nargs=2, default=[32, 128], help="N1 N2 of the full path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/topk_memory.json")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "V", "K", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        path, vocab, k, count = args.child
        print(json.dumps(child(path, int(vocab), int(k), int(count))))
        return
    rows = []
    for vocab in args.vocabs:
        for k in args.ks:
            row = {"V": vocab, "k": k}
            for path, (n1, n2) in (("topk", args.topk_positions), ("full", args.full_positions)):
                low, high = measure(path, vocab, k, n1, args.threads), measure(path, vocab, k, n2, args.threads)
                row[f"{path}_peak_bytes"] = {str(n1): low, str(n2): high}
                row[f"{path}_bytes_per_position"] = (high - low) / (n2 - n1)
                row[f"{path}_kept_bytes_per_position"] = kept_bytes(path, vocab, k)
            rows.append(row)
            print(row, file=sys.stderr)
    print("\nWasserstein penalty + support gradient: extra memory per position (peak RSS slope, CPU)")
    print("(measured slope; in brackets what the path must hold per position, counted)")
    print(f"{'V':>8} | {'k':>4} | {'top-k KiB/pos':>16} | {'full KiB/pos':>18} | {'full / top-k':>12}")
    for row in rows:
        topk, full = row["topk_bytes_per_position"], row["full_bytes_per_position"]
        ratio = f"{full / topk:12.0f}" if topk > 0 else f"{'-':>12}"
        counted = row["topk_kept_bytes_per_position"] / 1024, row["full_kept_bytes_per_position"] / 1024
        print(
            f"{row['V']:>8} | {row['k']:>4} | {topk / 1024:7.1f} [{counted[0]:6.1f}] | "
            f"{full / 1024:8.1f} [{counted[1]:7.1f}] | {ratio}"
        )
    result = {
        "benchmark": "topk_memory",
        "command": "python " + " ".join(sys.argv),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "embedding_dim": DIM,
        "max_iter": MAX_ITER,
        "max_chunk_elements": CHUNK,
        "mmap_threshold": MMAP_THRESHOLD,
        "topk_positions": args.topk_positions,
        "full_positions": args.full_positions,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
