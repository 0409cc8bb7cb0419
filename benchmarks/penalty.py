"""Time and peak memory of the Wasserstein (WPR) penalty vs the reverse-KL penalty on the same logits.

    python benchmarks/penalty.py            # issue 3: B=8, T=256, V in {49152, 256000}, top_k in {64, 128, 256}
    python benchmarks/penalty.py --quick    # B=2, T=64, V=49152, top_k in {64, 128}: a few minutes on a laptop CPU

Every measurement runs in a fresh subprocess (so the allocator's cache of one run cannot hide the next one's
memory) on synthetic inputs: reference logits ``3 * N(0, 1)``, policy logits = reference + ``0.3 * N(0, 1)``
(per-token KL about 0.04, an RLHF run's typical drift), float32, and a random embedding matrix
``N(0, 1/(2d))`` whose pairwise distances are about 1 (the scale of trained input embeddings), d = 576
(SmolLM2) for V = 49152 and d = 2048 (Gemma) otherwise. Peak memory is the growth of the process's resident
set (CPU, sampled every millisecond) or of ``torch.cuda.max_memory_allocated`` (GPU) above what the inputs
already hold. The official design's memory is computed, not measured: a symmetrised sparse V x 512 kernel in
CSR (float32 values, int64 column indices and row pointers), ``2 * V * 512`` entries at most. The paper
reports 12.8 GB for it and the Wasserstein penalty at 0.117 vs 0.005 h per 1k steps for KL (23x).

``--embeddings default`` prices tokens with the default model's real input embeddings instead (V = 49152;
their pairwise distances are about 3, so lambda * cost is 200-600 at lambda = 100).

Each top_k runs both WPR transport forms (``--transport``): ``difference`` (the default, the policy's excess
mass onto its deficit) and ``full`` (the paper's OT between the whole distributions); ``marg.err`` shows which
of them reached the tolerance within ``--max-iter``.

Accuracy guard: on the same logits, a reference run of each form in ``--reference-transports`` is solved in float64
(the timed runs' own problems: their masses and costs, in float64, so that it measures the solve; see
:func:`reference_solve` on the inputs' rounding) to ``--reference-tol`` (1e-7) with
``--reference-max-iter`` iterations allowed and over-relaxation ``--reference-overrelaxation`` (the same fixed
point, reached sooner); every per-token penalty of the timed runs of that form must be within ``max(1e-3
|reference|, 1e-4)`` of it. The max and 99th-percentile errors print beside the timings, and the script exits with
status 1, naming the offending rows, above the bound.

Newton finishing (``--newton-steps``, the regularizer's ``newton_steps``): problems still above the tolerance
at ``--max-iter`` get that many Newton steps on the dual (:mod:`otalign.ot.newton`); its time counts as
Sinkhorn time. ``--max-iter`` and ``--newton-steps`` take several values like ``--tol``.

Profile (``--profile`` table): per Sinkhorn call of the timed runs, the atoms that carry more than 1e-6 /
1e-4 / 1e-3 of the (normalised) moved mass on each side, the iterations, the time per iteration and the time
spent outside Sinkhorn (log-softmax, top-k, gathers, costs).

``--overrelaxation`` and ``--tol`` take several values: every combination is a row (the full form only at the
first tolerance), each with its own RKL run just before it so that the two times share the machine's load.

Results print as a table and go to ``benchmarks/results/penalty.json``. CPU always; CUDA too when available.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import otalign.ot.difference as difference_module
import otalign.regularizers.wasserstein.solve as solve_module
from otalign.regularizers import FDivergenceRegularizer, WassersteinRegularizer, build_problem

EMBEDDING_DIM = {49152: 576, 256000: 2048}
SOLVER = {name: p.default for name, p in inspect.signature(WassersteinRegularizer).parameters.items()}
"""The regularizer's defaults, those of `--max-iter`, `--tol`, `--overrelaxation` and `--newton-steps`."""
OFFICIAL_KNN = 512


def official_kernel_bytes(vocab: int, knn: int = OFFICIAL_KNN) -> int:
    """Bytes of a symmetrised sparse ``V x knn`` kernel in CSR: float32 values, int64 columns and row pointers."""
    entries = 2 * vocab * knn
    return entries * (4 + 8) + (vocab + 1) * 8


class PeakRSS:
    """Largest resident-set growth (bytes) of this process while the context is open, sampled every ms."""

    def __enter__(self) -> PeakRSS:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def make_inputs(batch: int, steps: int, vocab: int, dim: int, device: str, seed: int = 0):
    """Synthetic (policy_logits, ref_logits, actions, embeddings); see the module docstring."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ref = 3.0 * torch.randn(batch, steps, vocab, generator=gen, device=device)
    policy = ref + 0.3 * torch.randn(batch, steps, vocab, generator=gen, device=device)
    actions = torch.multinomial(policy.view(-1, vocab).softmax(-1), 1, generator=gen).view(batch, steps)
    embeddings = torch.randn(vocab, dim, generator=gen, device=device) / (2 * dim) ** 0.5
    return policy, ref, actions, embeddings


def measure(spec: dict) -> dict:
    """Run one penalty as ``spec`` says and return its time, peak memory and stats (runs in a worker)."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    policy, ref, actions, embeddings = make_inputs(
        spec["batch"], spec["steps"], spec["vocab"], spec["dim"], device, seed=spec["seed"]
    )
    if spec["embeddings"] == "default":
        from otalign.models.default import default_model_path
        from otalign.regularizers import load_embedding_matrix

        embeddings = load_embedding_matrix(default_model_path(), dtype=torch.float32, device=device)
    logits_dtype = getattr(torch, spec.get("logits_dtype", "float32"))  # e.g. bf16 logits, as a bf16 model gives
    policy, ref = policy.to(logits_dtype), ref.to(logits_dtype)
    if spec.get("reference"):
        return reference_solve(spec, policy, ref, actions, embeddings)
    reg = FDivergenceRegularizer("rkl") if spec["method"] == "rkl" else wasserstein(spec, embeddings)

    sinkhorn_seconds, calls = [], []

    def timed(solver):
        def timed_sinkhorn(a, b, *args, **kwargs):
            start = time.perf_counter()
            result = solver(a, b, *args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            sinkhorn_seconds.append(seconds)
            calls.append(sinkhorn_profile(a, b, result, seconds))
            return result

        return timed_sinkhorn

    for module in (difference_module, solve_module):  # the difference form's Sinkhorn and the full form's
        module.sinkhorn = timed(module.sinkhorn)
    if cuda:
        reg.penalty(policy, ref, actions)  # warm-up: CUDA context, kernels, embeddings moved once
        torch.cuda.synchronize()
        sinkhorn_seconds.clear()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(spec["repeats"]):
        with PeakRSS() as rss:
            start = time.perf_counter()
            out = reg.penalty(policy, ref, actions)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.growth
    return {
        **spec,
        "seconds": sorted(times)[len(times) // 2],
        "sinkhorn_seconds": sum(sinkhorn_seconds) / spec["repeats"],
        "peak_bytes": peak,
        "stats": out.stats,
        "profile": calls[-len(calls) // spec["repeats"] :] if calls else [],
        "per_token": out.per_token.flatten().tolist(),
    }


def wasserstein(spec: dict, embeddings: torch.Tensor) -> WassersteinRegularizer:
    """The Wasserstein regularizer a run's ``spec`` describes."""
    return WassersteinRegularizer(
        embeddings,
        lam=spec["lam"],
        top_k=spec["top_k"],
        transport=spec["transport"],
        max_iter=spec["max_iter"],
        tol=spec["tol"],
        overrelaxation=spec.get("overrelaxation", 1.0),
        newton_steps=spec.get("newton_steps", 0),
    )


def reference_solve(spec: dict, policy, ref, actions, embeddings, positions: int = 256) -> dict:
    """The accuracy guard's oracle: the very problems the timed run solves (its masses and costs, built from the
    same logits in their dtype by :func:`~otalign.regularizers.build_problem`) solved in float64 to the reference
    settings, ``positions`` at a time. It measures the solve, not the rounding of the inputs: where a sampled token's
    excess or deficit is a near-cancellation, its potential moves with ``eps log`` of that mass, and float32's
    rounding of the masses alone can move it by ~2e-4 on a penalty of ~0.1."""
    reg = wasserstein(spec, embeddings)
    vocab = policy.shape[-1]
    policy, ref, actions = policy.reshape(-1, vocab), ref.reshape(-1, vocab), actions.reshape(-1)
    per_token, iters, errors = [], 0, []
    for start in range(0, actions.shape[0], positions):
        part = slice(start, start + positions)
        problem = build_problem(policy[part], ref[part], actions[part], embeddings, top_k=spec["top_k"])
        exact = dataclasses.replace(problem, a=problem.a.double(), b=problem.b.double(), cost=problem.cost.double())
        solution = reg.solve(exact)
        per_token.append(solution.penalty)
        iters = max(iters, solution.n_iter)
        errors.append(solution.marginal_error)
    return {
        **spec,
        "stats": {"sinkhorn/iters": iters, "sinkhorn/marginal_err": float(torch.cat(errors).max())},
        "per_token": torch.cat(per_token).tolist(),
    }


MASS_LEVELS = (1e-6, 1e-4, 1e-3)


def sinkhorn_profile(a: torch.Tensor, b: torch.Tensor, result, seconds: float) -> dict:
    """What one Sinkhorn call of the penalty solved: problems, atoms above each mass level per side (means over
    problems), iterations (slowest and mean), seconds and seconds per iteration."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    iters = result.iters.reshape(-1).float() if result.iters is not None else torch.tensor([float(result.n_iter)])
    return {
        "problems": a.shape[0],
        "atoms": a.shape[1],
        "atoms_a": {str(level): float((a > level).sum(-1).float().mean()) for level in MASS_LEVELS},
        "atoms_b": {str(level): float((b > level).sum(-1).float().mean()) for level in MASS_LEVELS},
        "n_iter": int(result.n_iter),
        "mean_iters": float(iters.mean()),
        "converged": float(result.converged.float().mean()) if result.converged is not None else None,
        "seconds": seconds,
        "seconds_per_iter": seconds / max(int(result.n_iter), 1),
    }


def accuracy(values: list[float], reference: list[float], rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Per-token error against the reference: max and 99th percentile of ``|p - ref|`` and of
    ``|p - ref| / max(rtol |ref|, atol)`` (the guard fails above 1)."""
    p, ref = torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    err = (p - ref).abs()
    relative = err / torch.clamp(rtol * ref.abs(), min=atol)
    return {
        "max_abs_err": float(err.max()),
        "p99_abs_err": float(torch.quantile(err, 0.99)),
        "max_err_over_bound": float(relative.max()),
        "p99_err_over_bound": float(torch.quantile(relative, 0.99)),
        "tokens_over_bound": int((relative > 1).sum()),
        "ok": bool((relative <= 1).all()),
    }


def run_worker(spec: dict) -> dict:
    """Run :func:`measure` in a fresh Python process and return its result."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    header = (
        f"{'device':<7}{'V':>8}{'top_k':>6}{'transport':>11}{'w':>5}{'tol':>7}{'cap':>6}{'N':>4}"
        f"{'RKL s':>9}{'W s':>9}{'W/RKL':>8}"
        f"{'sinkhorn':>10}"
        f"{'iters':>7}{'marg.err':>10}{'max err':>9}{'p99 err':>9}{'/bound':>8}{'RKL MB':>8}{'W MB':>8}"
        f"{'official GB':>12}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        acc = row.get("accuracy")
        errors = (
            f"{acc['max_abs_err']:>9.1e}{acc['p99_abs_err']:>9.1e}{acc['max_err_over_bound']:>8.2f}"
            if acc
            else f"{'-':>9}{'-':>9}{'-':>8}"
        )
        lines.append(
            f"{row['device']:<7}{row['vocab']:>8}{row['top_k']:>6}{row['transport']:>11}{row['overrelaxation']:>5.2g}"
            f"{row['tol']:>7.0e}{row.get('max_iter', 0):>6}{row.get('newton_steps', 0):>4}{row['rkl_seconds']:>9.3f}"
            f"{row['w_seconds']:>9.2f}{row['ratio']:>8.1f}{row['sinkhorn_share']:>9.0%} {row['iters']:>6.0f}"
            f"{row['marginal_err']:>10.1e}{errors}{row['rkl_peak_mb']:>8.0f}{row['w_peak_mb']:>8.0f}"
            f"{row['official_gb']:>12.2f}"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """Where the Wasserstein penalty's time goes, one line per timed run (sums/means over its Sinkhorn calls)."""
    header = (
        f"{'V':>7}{'top_k':>6}{'transport':>11}{'w':>5}{'tol':>7}{'cap':>6}{'N':>4}{'atoms':>7}{'a>1e-6':>8}{'a>1e-4':>8}{'a>1e-3':>8}{'b>1e-4':>8}"
        f"{'iters':>7}{'mean it':>8}{'ms/iter':>9}{'sinkhorn s':>11}{'outside s':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        calls = row["profile"]
        if not calls:
            continue
        problems = sum(c["problems"] for c in calls)

        def mean(key, level, calls=calls, problems=problems):
            return sum(c[key][level] * c["problems"] for c in calls) / problems

        seconds = sum(c["seconds"] for c in calls)
        lines.append(
            f"{row['vocab']:>7}{row['top_k']:>6}{row['transport']:>11}{row['overrelaxation']:>5.2g}{row['tol']:>7.0e}"
            f"{row.get('max_iter', 0):>6}{row.get('newton_steps', 0):>4}{max(c['atoms'] for c in calls):>7}"
            f"{mean('atoms_a', '1e-06'):>8.1f}{mean('atoms_a', '0.0001'):>8.1f}{mean('atoms_a', '0.001'):>8.1f}"
            f"{mean('atoms_b', '0.0001'):>8.1f}{max(c['n_iter'] for c in calls):>7}"
            f"{sum(c['mean_iters'] * c['problems'] for c in calls) / problems:>8.0f}"
            f"{1e3 * seconds / sum(c['n_iter'] for c in calls):>9.2f}{seconds:>11.2f}"
            f"{row['w_seconds'] - seconds:>10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=2, T=64, V=49152, top_k 64 and 128")
    parser.add_argument("--batch", type=int, default=None, help="B (default 8; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="T (default 256; 64 with --quick)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="V values (default 49152 256000)")
    parser.add_argument("--top-k", type=int, nargs="+", default=None, help="k2 values (default 64 128 256)")
    parser.add_argument("--lam", type=float, default=100.0)
    parser.add_argument(
        "--transport", nargs="+", default=["difference", "full"], help="WPR transport forms, side by side"
    )
    parser.add_argument("--max-iter", type=int, nargs="+", default=[SOLVER["max_iter"]], help="Sinkhorn iteration caps")
    parser.add_argument("--tol", type=float, nargs="+", default=[SOLVER["tol"]], help="Sinkhorn tolerances")
    parser.add_argument(
        "--overrelaxation",
        type=float,
        nargs="+",
        default=[SOLVER["overrelaxation"]],
        help="Sinkhorn over-relaxation values w, side by side (1: plain)",
    )
    parser.add_argument(
        "--newton-steps",
        type=int,
        nargs="+",
        default=[SOLVER["newton_steps"]],
        help="Newton steps for the problems still above tol at max-iter (0: none)",
    )
    parser.add_argument(
        "--embeddings",
        choices=["random", "default"],
        default="random",
        help="random N(0, 1/(2d)) rows, or the default model's (SmolLM2-135M, V=49152) input embeddings",
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (median)")
    parser.add_argument(
        "--reference-transports",
        nargs="*",
        default=["difference"],
        help="forms checked against a reference solve (the full form's reference needs ~1e5 iterations)",
    )
    parser.add_argument("--reference-tol", type=float, default=1e-7, help="tolerance of the reference solve")
    parser.add_argument("--reference-max-iter", type=int, default=50_000, help="iterations the reference may use")
    parser.add_argument(
        "--reference-overrelaxation", type=float, default=1.5, help="over-relaxation w of the reference solve"
    )
    parser.add_argument(
        "--reference-newton-steps", type=int, default=50, help="Newton steps of the reference's stalled problems"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "penalty.json"))
    parser.add_argument(
        "--logits-dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the timed runs' logits (the float64 reference is computed from them in float64)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (64 if args.quick else 256)
    vocabs = args.vocab or ([49152] if args.quick else [49152, 256000])
    top_ks = args.top_k or ([64, 128] if args.quick else [64, 128, 256])
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    common = {
        "batch": batch,
        "steps": steps,
        "lam": args.lam,
        "max_iter": args.max_iter,
        "tol": args.tol,
        "overrelaxation": args.overrelaxation,
        "newton_steps": args.newton_steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "seed": 0,
        "embeddings": args.embeddings,
        "logits_dtype": args.logits_dtype,
    }
    print(
        f"B={batch} T={steps} lam={args.lam} max_iter={args.max_iter} tol={args.tol} w={args.overrelaxation} "
        f"newton={args.newton_steps} "
        f"threads={args.threads} "
        f"embeddings={args.embeddings}"
    )
    rows, raw, references = [], [], {}
    for device in devices:
        for vocab in vocabs:
            base = {**common, "device": device, "vocab": vocab, "dim": EMBEDDING_DIM.get(vocab, 1024)}
            for name in ("tol", "overrelaxation", "newton_steps", "max_iter"):
                base.pop(name)
            grid = itertools.product(
                top_ks, args.transport, args.tol, args.overrelaxation, args.newton_steps, args.max_iter
            )
            for top_k, transport, tol, omega, newton, max_iter in grid:
                firsts = (tol, newton, max_iter) == (args.tol[0], args.newton_steps[0], args.max_iter[0])
                if transport == "full" and not firsts:
                    continue  # the full form reaches no tolerance within max_iter, and takes no Newton steps
                # RKL right before each W run, so that the ratio is taken under the same load.
                rkl = run_worker({**base, "method": "rkl", "top_k": 0, "tol": tol})
                wpr = run_worker(
                    {
                        **base,
                        "method": "wasserstein",
                        "top_k": top_k,
                        "transport": transport,
                        "tol": tol,
                        "overrelaxation": omega,
                        "newton_steps": newton,
                        "max_iter": max_iter,
                    }
                )
                raw += [rkl, wpr]
                acc = None
                if transport in args.reference_transports:
                    key = (device, vocab, top_k, transport)
                    if key not in references:
                        references[key] = run_worker(
                            {
                                **base,
                                "method": "wasserstein",
                                "top_k": top_k,
                                "transport": transport,
                                "tol": args.reference_tol,
                                "max_iter": args.reference_max_iter,
                                "overrelaxation": args.reference_overrelaxation,
                                "newton_steps": args.reference_newton_steps,
                                "repeats": 1,
                                "reference": True,
                            }
                        )
                        raw.append(references[key])
                    reference = references[key]
                    acc = accuracy(wpr["per_token"], reference["per_token"])
                    acc["reference_iters"] = reference["stats"]["sinkhorn/iters"]
                    acc["reference_marginal_err"] = reference["stats"]["sinkhorn/marginal_err"]
                rows.append(
                    {
                        "device": device,
                        "vocab": vocab,
                        "top_k": top_k,
                        "transport": transport,
                        "tol": tol,
                        "overrelaxation": omega,
                        "newton_steps": newton,
                        "max_iter": max_iter,
                        "rkl_seconds": rkl["seconds"],
                        "w_seconds": wpr["seconds"],
                        "ratio": wpr["seconds"] / rkl["seconds"],
                        "sinkhorn_share": wpr["sinkhorn_seconds"] / wpr["seconds"],
                        "iters": wpr["stats"]["sinkhorn/iters"],
                        "marginal_err": wpr["stats"]["sinkhorn/marginal_err"],
                        "unconverged_frac": wpr["stats"]["sinkhorn/unconverged_frac"],
                        "rkl_peak_mb": rkl["peak_bytes"] / 2**20,
                        "w_peak_mb": wpr["peak_bytes"] / 2**20,
                        "official_gb": official_kernel_bytes(vocab) / 1e9,
                        "accuracy": acc,
                        "profile": wpr["profile"],
                    }
                )
                print(table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
    print()
    print(table(rows))
    print(
        "(max/p99 err: |penalty - reference| per token, reference solved to tol "
        f"{args.reference_tol:g} in float64; /bound: max of err / max(1e-3 |ref|, 1e-4))"
    )
    print()
    print("profile of the timed runs (atoms: slots per problem; a/b > level: atoms above that share of the moved")
    print("mass, mean per problem; iters: slowest problem, mean it: mean per problem)")
    print(profile_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for run in raw:
        run.pop("per_token", None)
    out.write_text(json.dumps({"settings": common, "rows": rows, "runs": raw}, indent=2))
    print(f"wrote {out}")
    failed = [row for row in rows if row["accuracy"] and not row["accuracy"]["ok"]]
    for row in failed:
        acc = row["accuracy"]
        print(
            f"ACCURACY GUARD FAILED: {row['device']} V={row['vocab']} top_k={row['top_k']} {row['transport']} "
            f"w={row['overrelaxation']:g} tol={row['tol']:g}: "
            f"{acc['tokens_over_bound']} tokens above max(1e-3 |ref|, 1e-4), max err {acc['max_abs_err']:.2e} "
            f"({acc['max_err_over_bound']:.1f}x the bound)",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
