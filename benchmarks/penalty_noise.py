"""Per-token noise of the WPR penalty near the reference, for every transport form, vs the RKL penalty.

    python benchmarks/penalty_noise.py                       # SmolLM2's real input embeddings (V = 49152)
    python benchmarks/penalty_noise.py --embeddings random   # V = 2000 random rows, distances ~1: seconds

Reference logits ``3 * N(0, 1)`` at ``--positions`` positions, policy logits = reference + ``delta * N(0, 1)``
(the same noise draw scaled by each delta), the sampled token drawn from the policy with the same uniforms for
every delta. For each lambda and delta, every penalty gives the per-token mean and standard deviation of the
sampled token's penalty over the positions and the distance it estimates (mean over positions): the penalty is
an unbiased one-sample estimate of that distance, so the std is the noise it adds to each token's reward.

Forms: ``smooth`` (the default: the difference-form distance through a C1 quadratic blend below tau),
``difference`` (the policy's excess onto its deficit), ``full`` and ``full+debias`` (the paper's OT between the
whole distributions, and its Sinkhorn divergence), and ``rkl`` (log pi/pi_ref, distance = exact KL). Two more
candidates for the default are computed from the difference form's solution (not in the library):
``huber`` (D = W^2/(2 tau) below tau, W - tau/2 above) and ``mass`` (D = W g(m), g = x(2 - x),
x = min(m/mu, 1), m the moved mass, mu = SMOOTH_MASS).

Results: a table on stdout, ``benchmarks/results/penalty_noise.json`` and ``penalty_noise.png`` (std vs delta,
log-log, one panel per lambda). The full forms run ``--full-max-iter`` (200) Sinkhorn iterations, the others up to
``--max-iter`` (1000, the regularizer's default); ``marg.err`` says which reached the tolerance. The default run
took 260 s on 2 shared CPU cores (``--embeddings random`` uses V = 2000 rows of dimension 64).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from otalign.regularizers import (
    FDivergenceRegularizer,
    WassersteinRegularizer,
    build_problem,
    solve_problem,
)
from otalign.regularizers.wasserstein import SMOOTH_MASS

DELTAS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.3)
LAMBDAS = (10.0, 30.0, 100.0)
LIBRARY_FORMS = {"smooth": ("smooth", False), "difference": ("difference", False), "full": ("full", False)}
LIBRARY_FORMS["full+debias"] = ("full", True)
CANDIDATES = ("huber", "mass")


def load_embeddings(kind: str, vocab: int, seed: int) -> torch.Tensor:
    if kind == "default":
        from otalign.models.default import default_model_path
        from otalign.regularizers import load_embedding_matrix

        return load_embedding_matrix(default_model_path(), dtype=torch.float32)
    dim = 64
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed + 7)) / math.sqrt(2 * dim)


def candidate_penalties(problem, lam: float, tau: float, max_iter: int, tol: float) -> dict[str, tuple]:
    """``{name: (sampled-token penalties, distances)}`` of the candidates built on the difference solution."""
    solved = solve_problem(problem, lam, transport="difference", max_iter=max_iter, tol=tol)
    phi, value = solved.penalty.double(), solved.value.double()
    out = {}
    slope = (value / tau).clamp(0.0, 1.0)
    huber = torch.where(value < tau, value.clamp_min(0) ** 2 / (2 * tau), value - tau / 2)
    out["huber"] = (slope * (phi - value) + huber, huber)
    a, b = problem.a.double(), problem.b.double()
    sign = 0.5 * torch.sign(a - b)
    moved = 0.5 * (a - b).abs().sum(1)
    x = (moved / SMOOTH_MASS).clamp(max=1.0)
    scale, dscale = x * (2 - x), 2 * (1 - x) / SMOOTH_MASS
    distance = value * scale
    mean_sign = (a * sign).sum(1)
    out["mass"] = (scale * (phi - value) + value * dscale * (sign[:, 0] - mean_sign) + distance, distance)
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    embeddings = load_embeddings(args.embeddings, args.vocab, args.seed)
    vocab = embeddings.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    ref = 3.0 * torch.randn(args.positions, vocab, generator=gen)
    noise = torch.randn(args.positions, vocab, generator=gen)
    uniforms = torch.rand(args.positions, 1, generator=gen)
    rkl = FDivergenceRegularizer("rkl")
    rows = []
    tau = None
    for lam in args.lams:
        regs = {
            name: WassersteinRegularizer(
                embeddings,
                lam=lam,
                top_k=args.top_k,
                transport=transport,
                debias=debias,
                max_iter=args.full_max_iter if transport == "full" else args.max_iter,
                tol=args.tol,
            )
            for name, (transport, debias) in LIBRARY_FORMS.items()
            if name in args.forms
        }
        tau = next(iter(regs.values())).tau
        for delta in args.deltas:
            policy = ref + delta * noise
            cdf = policy.softmax(-1).cumsum(-1)
            actions = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp(max=vocab - 1)[:, 0]
            results = {}
            for name, reg in regs.items():
                start = time.perf_counter()
                out = reg.penalty(policy[None], ref[None], actions[None])
                results[name] = {
                    "per_token": out.per_token[0].double(),
                    "distance": out.stats["wasserstein/value"],
                    "marginal_err": out.stats["sinkhorn/marginal_err"],
                    "iters": out.stats["sinkhorn/iters"],
                    "seconds": time.perf_counter() - start,
                }
            if set(CANDIDATES) & set(args.forms):
                problem = build_problem(policy, ref, actions, embeddings, top_k=args.top_k)
                for name, (penalty, distance) in candidate_penalties(
                    problem, lam, tau, args.max_iter, args.tol
                ).items():
                    if name in args.forms:
                        results[name] = {"per_token": penalty, "distance": float(distance.mean())}
            if "rkl" in args.forms:
                out = rkl.penalty(policy[None], ref[None], actions[None])
                results["rkl"] = {"per_token": out.per_token[0].double(), "distance": out.stats["kl/exact"]}
            for name, result in results.items():
                per_token = result.pop("per_token")
                rows.append(
                    {
                        "lam": lam,
                        "delta": delta,
                        "form": name,
                        "mean": float(per_token.mean()),
                        "std": float(per_token.std()),
                        **result,
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return {"settings": {**vars(args), "vocab_size": vocab, "smooth_tau": tau}, "rows": rows}


HEADER = (
    f"{'lambda':>7}{'delta':>8}{'form':>13}{'mean':>11}{'std':>10}{'distance':>11}{'marg.err':>10}{'iters':>7}{'s':>7}"
)


def format_row(row: dict) -> str:
    err = f"{row['marginal_err']:>10.1e}" if "marginal_err" in row else f"{'':>10}"
    iters = f"{row['iters']:>7.0f}" if "iters" in row else f"{'':>7}"
    seconds = f"{row['seconds']:>7.2f}" if "seconds" in row else f"{'':>7}"
    return (
        f"{row['lam']:>7g}{row['delta']:>8.0e}{row['form']:>13}{row['mean']:>11.2e}{row['std']:>10.2e}"
        f"{row['distance']:>11.2e}{err}{iters}{seconds}"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = result["settings"]["lams"]
    forms = list(dict.fromkeys(row["form"] for row in result["rows"]))
    fig, axes = plt.subplots(1, len(lams), figsize=(5 * len(lams), 4.2), sharey=True, squeeze=False)
    for ax, lam in zip(axes[0], lams, strict=True):
        for form in forms:
            points = [(r["delta"], r["std"]) for r in result["rows"] if r["lam"] == lam and r["form"] == form]
            points = [(d, s) for d, s in points if d > 0 and s > 0]
            if points:
                style = {"linewidth": 2.5} if form == "smooth" else {"linewidth": 1.2, "alpha": 0.8}
                ax.plot(*zip(*points, strict=True), marker="o", label=form, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"lambda = {lam:g}")
        ax.set_xlabel("delta (policy logits = reference + delta N(0,1))")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("per-token std of the sampled-token penalty")
    axes[0][-1].legend(fontsize=8)
    settings = result["settings"]
    fig.suptitle(
        f"WPR penalty noise near the reference ({settings['embeddings']} embeddings, V={settings['vocab_size']}, "
        f"top_k={settings['top_k']}, {settings['positions']} positions, tau={settings['smooth_tau']:.3g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", choices=["default", "random"], default="default")
    parser.add_argument("--vocab", type=int, default=2000, help="V for --embeddings random")
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--deltas", type=float, nargs="+", default=list(DELTAS))
    parser.add_argument("--lams", type=float, nargs="+", default=list(LAMBDAS))
    forms = [*LIBRARY_FORMS, *CANDIDATES, "rkl"]
    parser.add_argument("--forms", nargs="+", default=forms, choices=forms)
    parser.add_argument("--max-iter", type=int, default=1000, help="Sinkhorn iterations (regularizer default)")
    parser.add_argument(
        "--full-max-iter",
        type=int,
        default=200,
        help="Sinkhorn iterations of the full forms (unconverged at lambda=100 in 1000 too; keeps the run short)",
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="Sinkhorn tolerance (regularizer default)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "penalty_noise.json"))
    args = parser.parse_args(argv)
    print(HEADER)
    print("-" * len(HEADER))
    start = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
