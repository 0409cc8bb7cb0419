"""Batched entropic OT on WPR-shaped problems: otalign vs POT, side by side in one run.

Each problem is what the WPR penalty solves at one generated position: a shared support of
258 atoms (2 x 128 top-k tokens + the sampled token + dust) with Euclidean costs between
token embeddings, the policy's and the reference's next-token probabilities as marginals, and
eps such that cost / eps is in the hundreds. All solvers run in float32 on the same problems.

Equal accuracy: the solvers' stopping rules measure different things (otalign: the L1 marginal
error; ``ot.solve_batch``: the change of the dual variables; ``ot.sinkhorn``: an L2 column error),
and at cost/eps ~ 200 none of them reaches 1e-4 within a few hundred iterations. So every solver
runs the same number of Sinkhorn iterations at the target eps (tolerance 0), and the table shows
the L1 marginal error each one reaches beside its time. otalign adds its eps-scaling warm start
(about log2(cost range / eps) log-domain steps, included in its time).

    python benchmarks/sinkhorn.py                 # 512 and 4096 problems (CPU, and CUDA if present)
    python benchmarks/sinkhorn.py --quick         # 128 problems, a fast smoke run

Prints a table and writes benchmarks/results/sinkhorn.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import ot
import torch

from otalign.ot import euclidean, sinkhorn

SUPPORT = 258
VOCAB, DIM = 4096, 64
RESULTS = Path(__file__).parent / "results"


def wpr_like_problems(batch: int, cost_over_eps: float, seed: int = 0):
    """(a, b, cost, eps): policy/reference distributions on shared supports of random tokens."""
    gen = torch.Generator().manual_seed(seed)
    vocabulary = torch.randn(VOCAB, DIM, generator=gen)
    support = torch.stack([torch.randperm(VOCAB, generator=gen)[:SUPPORT] for _ in range(batch)])
    points = vocabulary[support]
    cost = euclidean(points, points)
    cost = cost / cost.amax()
    logits = 4.0 * torch.randn(batch, SUPPORT, generator=gen)
    a = torch.softmax(logits, -1)
    b = torch.softmax(logits + 1.5 * torch.randn(batch, SUPPORT, generator=gen), -1)
    return a, b, cost, 1.0 / cost_over_eps


def l1_marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest L1 violation over both marginals and all problems."""
    rows = (plan.sum(-1) - a).abs().sum(-1)
    cols = (plan.sum(-2) - b).abs().sum(-1)
    return float(torch.maximum(rows, cols).max())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def run_otalign(a, b, cost, eps, iters, device):
    res, seconds = timed(lambda: sinkhorn(a, b, cost, eps, tol=0.0, max_iter=iters, return_plan=True), device)
    return {"seconds": seconds, "l1_error": l1_marginal_error(res.plan, a, b), "iterations": res.n_iter}


def run_pot_batch(a, b, cost, eps, iters, device):
    res, seconds = timed(
        lambda: ot.solve_batch(cost, eps, a, b, method="log_sinkhorn", reg_type="entropy", tol=0.0, max_iter=iters),
        device,
    )
    return {"seconds": seconds, "l1_error": l1_marginal_error(res.plan, a, b), "iterations": iters}


def run_pot_loop(a, b, cost, eps, iters, device):
    def solve_all():
        return torch.stack(
            [
                ot.sinkhorn(a[i], b[i], cost[i], eps, method="sinkhorn_log", stopThr=0.0, numItermax=iters)
                for i in range(a.shape[0])
            ]
        )

    plans, seconds = timed(solve_all, device)
    return {"seconds": seconds, "l1_error": l1_marginal_error(plans, a, b), "iterations": iters}


def bench(batch: int, device: str, iters: int, cost_over_eps: float, loop_subset: int) -> dict:
    a, b, cost, eps = (x.to(device) if torch.is_tensor(x) else x for x in wpr_like_problems(batch, cost_over_eps))
    sinkhorn(a[:8], b[:8], cost[:8], eps, max_iter=5)  # warm-up (allocator, CUDA context)
    ours = run_otalign(a, b, cost, eps, iters, device)
    pot_batch = run_pot_batch(a, b, cost, eps, iters, device)
    n_loop = min(loop_subset, batch)
    pot_loop = run_pot_loop(a[:n_loop], b[:n_loop], cost[:n_loop], eps, iters, device)
    pot_loop["measured_on"] = n_loop
    pot_loop["seconds"] *= batch / n_loop  # per-problem loop: time scales linearly with the count
    return {
        "problems": batch,
        "device": device,
        "shape": [SUPPORT, SUPPORT],
        "eps": eps,
        "max_cost_over_eps": float(cost.amax() / eps),
        "otalign": ours,
        "pot_solve_batch": pot_batch,
        "pot_loop": pot_loop,
        "speedup_vs_pot_batch": pot_batch["seconds"] / ours["seconds"],
        "speedup_vs_pot_loop": pot_loop["seconds"] / ours["seconds"],
    }


def print_table(rows: list[dict]) -> None:
    header = f"{'device':<7}{'problems':>9}  {'solver':<16}{'seconds':>10}{'L1 marg. err':>14}{'speedup':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for name, key in (("otalign", "otalign"), ("POT solve_batch", "pot_solve_batch"), ("POT loop", "pot_loop")):
            res = row[key]
            speed = res["seconds"] / row["otalign"]["seconds"]
            note = (
                f" (loop timed on {res['measured_on']})"
                if key == "pot_loop" and res["measured_on"] < row["problems"]
                else ""
            )
            print(
                f"{row['device']:<7}{row['problems']:>9}  {name:<16}{res['seconds']:>10.3f}{res['l1_error']:>14.2e}"
                f"{speed:>9.1f}x{note}"
            )
        print(f"{'':<18}{row['otalign']['iterations']} iterations each, max cost/eps {row['max_cost_over_eps']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--iters", type=int, default=100, help="Sinkhorn iterations at the target eps, every solver")
    parser.add_argument("--cost-over-eps", type=float, default=200.0, help="max cost / eps")
    parser.add_argument("--loop-subset", type=int, default=64, help="problems the POT per-problem loop is timed on")
    parser.add_argument("--quick", action="store_true", help="128 problems, 50 iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sinkhorn.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [128] if args.quick else args.sizes
    if args.quick:
        args.iters = 50

    rows = [
        bench(n, device, args.iters, args.cost_over_eps, args.loop_subset) for device in args.devices for n in sizes
    ]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "pot": ot.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
