"""Execution-reward benchmark: programs per second for a rollout batch of 64 solutions x 10 tests, serial vs pooled.

The batch cycles through the built-in APPS-form problems (``apps_mini``), each problem's tests repeated up to 10
cases, and through each problem's known-correct and known-wrong solutions (the infinite-loop one excluded: it
would only measure the timeout). Every program gets a distinct trailing comment and the cache is off, so every
one of the 64 x 10 tests really runs. Timed: :meth:`CodeScorer.score_batch` on the whole batch, with 1 worker
(serial) and with one worker per CPU (pooled); ``--isolation`` adds a pooled run with the namespaces and the uid
switch off (rlimits, session and output caps only), to show what the isolation costs.

Usage: ``python benchmarks/code_reward.py [--programs 64] [--tests 10] [--repeats 3] [--isolation]``; prints a
table and writes ``benchmarks/results/code_reward.json``. Divide the pooled batch time by a PPO/GRPO step's time
(``benchmarks/ppo_step.py``) for the reward's share of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from otalign.data import load_code_problems
from otalign.rewards.code import CodeScorer
from otalign.rewards.sandbox import SandboxConfig, default_workers, describe

RESULTS = Path(__file__).resolve().parent / "results" / "code_reward.json"


def make_batch(n_programs: int, n_tests: int) -> tuple[list[str], list[dict]]:
    """``n_programs`` distinct programs, each with its problem's tests cycled to ``n_tests`` cases."""
    pairs = []
    for row in load_code_problems().rows:
        tests = row["tests"]
        idx = [i % len(tests["inputs"]) for i in range(n_tests)]
        padded = {
            "inputs": [tests["inputs"][i] for i in idx],
            "outputs": [tests["outputs"][i] for i in idx],
            "fn_name": tests["fn_name"],
        }
        programs = row["solutions"] + [w["program"] for w in row["wrong_solutions"] if w["status"] != "timeout"]
        pairs += [(p, padded) for p in programs]
    programs, tests = [], []
    for i in range(n_programs):
        program, t = pairs[i % len(pairs)]
        programs.append(f"{program}\n# sample {i}\n")
        tests.append(t)
    return programs, tests


def time_batch(scorer: CodeScorer, programs, tests, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = scorer.score_batch(programs, tests)
        times.append(time.perf_counter() - start)
    ran = sum(r.n_pass + r.n_fail if r.status != "compile_error" else 1 for r in results)
    best = min(times)
    return {
        "seconds_median": statistics.median(times),
        "seconds_best": best,
        "programs_per_s": len(programs) / best,
        "tests_run": ran,
        "tests_per_s": ran / best,
        "statuses": {s: sum(r.status == s for r in results) for s in sorted({r.status for r in results})},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="pooled worker count (default: CPU count)")
    parser.add_argument("--isolation", action="store_true", help="also time the pool without namespaces/uid")
    parser.add_argument("--out", default=str(RESULTS), help="JSON path")
    args = parser.parse_args()
    programs, tests = make_batch(args.programs, args.tests)
    pooled = args.workers or default_workers()
    config = SandboxConfig(timeout=4.0, allow_unsandboxed_network=True)
    rows = {}
    for name, workers, full in [("serial", 1, True), ("pooled", pooled, True)] + (
        [("pooled, no isolation", pooled, False)] if args.isolation else []
    ):
        scorer = CodeScorer(config=config, workers=workers, cache_size=0)
        if not full:
            scorer.sandbox.isolation = dict.fromkeys(scorer.sandbox.isolation, False)
        scorer.score_batch(programs[:2], tests[:2])  # warm up
        rows[name] = time_batch(scorer, programs, tests, args.repeats) | {
            "workers": workers,
            "isolation": describe(scorer.sandbox.isolation),
        }
        scorer.close()
    print(f"{args.programs} programs x {args.tests} tests, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}")
    print(f"{'mode':<22} {'workers':>7} {'batch s (best)':>15} {'programs/s':>11} {'tests/s':>9}")
    for name, r in rows.items():
        print(
            f"{name:<22} {r['workers']:>7} {r['seconds_best']:>15.2f} {r['programs_per_s']:>11.1f} "
            f"{r['tests_per_s']:>9.1f}"
        )
    print(f"pooled speed-up: {rows['serial']['seconds_best'] / rows['pooled']['seconds_best']:.2f}x")
    print(f"statuses: {rows['pooled']['statuses']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"programs": args.programs, "tests": args.tests, "repeats": args.repeats, "cpus": os.cpu_count()}
    out.write_text(json.dumps({"setup": meta | {"platform": platform.platform()}, "modes": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
