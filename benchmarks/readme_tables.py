"""Print the README's benchmark tables (Markdown) from the committed ``benchmarks/results/*.json``.

python benchmarks/readme_tables.py            # paste the output into README.md, "Benchmarks"
"""

from __future__ import annotations

import json
from pathlib import Path

from ppo_step import PHASES

RESULTS = Path(__file__).resolve().parent / "results"


def penalty_table(report: dict) -> list[str]:
    s = report["settings"]
    lines = [
        f"B={s['batch']}, T={s['steps']}, lambda={s['lam']:g}, {s['threads']} threads, embeddings: {s['embeddings']}",
        "",
        "| V | top_k | transport | w | tol | max_iter | Newton | W/RKL time | Sinkhorn share | iters | unconverged | "
        "marg. err | "
        "max / p99 err vs ref | err / bound | W peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        acc = row.get("accuracy")
        err = f"{acc['max_abs_err']:.1e} / {acc['p99_abs_err']:.1e}" if acc else "-"
        bound = f"{acc['max_err_over_bound']:.1f} ({'ok' if acc['ok'] else 'FAIL'})" if acc else "-"
        lines.append(
            f"| {row['vocab']} | {row['top_k']} | {row['transport']} | {row.get('overrelaxation', 1.0):g} | "
            f"{row.get('tol', s['tol']):g} | {row.get('max_iter', s['max_iter'])} | {row.get('newton_steps', 0)} | "
            f"{row['ratio']:.1f}x | "
            f"{row['sinkhorn_share']:.0%} | {row['iters']:.0f} | {row.get('unconverged_frac', float('nan')):.1%} | "
            f"{row['marginal_err']:.1e} | {err} | {bound} | "
            f"{row['w_peak_mb']:.0f} |"
        )
    return lines


def profile_table(report: dict) -> list[str]:
    lines = [
        "| top_k | transport | w | tol | max_iter | Newton | atoms | excess atoms > 1e-6 / 1e-4 / 1e-3 of moved mass | "
        "iters (max / mean) | ms / iter | Sinkhorn s | outside s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        calls = row.get("profile") or []
        if not calls:
            continue
        problems = sum(c["problems"] for c in calls)

        def mean(level, calls=calls, problems=problems):
            return sum(c["atoms_a"][level] * c["problems"] for c in calls) / problems

        seconds = sum(c["seconds"] for c in calls)
        iters = sum(c["n_iter"] for c in calls)
        mean_iters = sum(c["mean_iters"] * c["problems"] for c in calls) / problems
        lines.append(
            f"| {row['top_k']} | {row['transport']} | {row.get('overrelaxation', 1.0):g} | {row.get('tol', '-')} | "
            f"{row.get('max_iter', '-')} | {row.get('newton_steps', 0)} | "
            f"{max(c['atoms'] for c in calls)} | "
            f"{mean('1e-06'):.1f} / {mean('0.0001'):.1f} / {mean('0.001'):.1f} | "
            f"{max(c['n_iter'] for c in calls)} / {mean_iters:.0f} | {1e3 * seconds / max(iters, 1):.1f} | "
            f"{seconds:.2f} | {row['w_seconds'] - seconds:.2f} |"
        )
    return lines


def otpo_table(report: dict) -> list[str]:
    lines = [
        "| hidden | pairs | buckets | otalign s | POT loop s | speed-up (best times) | speed-up (median of pairs) | "
        "max err vs float64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["weights"]:
        lines.append(
            f"| {r['hidden']} | {r['pairs']} | {len(r['buckets'])} | {r['otalign_s']:.3f} | {r['pot_loop_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r.get('speedup_paired_median', float('nan')):.2f}x | "
            f"{r['max_err_otalign_vs_float64']:.1e} |"
        )
    step = report["dpo_step"]
    lines += [
        "",
        f"DPO step ({step['pairs']} pairs, responses <= {step['max_response_len']}, tiny Llama): "
        f"{step['dpo_step_s']:.3f} s, with OTPO {step['dpo_otpo_step_s']:.3f} s "
        f"({step['dpo_otpo_step_s'] / step['dpo_step_s']:.2f}x).",
    ]
    return lines


def official_table(report: dict) -> list[str]:
    s = report["settings"]
    lines = [
        f"B={s['batch']}, T={s['steps']}, V={s['vocab']} ({s['embeddings']} embeddings), top_k={s['top_k']}, "
        f"k1={s['knn']}, lambda={s['lam']:g}; errors against our difference form solved to {s['reference_tol']:g}",
        "",
        "| method | time | x RKL | peak MB | iters | max / p99 err | centred max / p99 err |",
        "|---|---|---|---|---|---|---|",
    ]
    rkl = report["rows"][0]["seconds"]
    for row in report["rows"]:
        err, cen = row.get("error"), row.get("centred_error")
        lines.append(
            f"| {row['method']} | {row['seconds']:.3f} s | {row['seconds'] / rkl:.1f} | "
            f"{row['peak_bytes'] / 2**20:.0f} | {row.get('iters', '-')} | "
            + (f"{err['max_abs_err']:.1e} / {err['p99_abs_err']:.1e}" if err else "-")
            + " | "
            + (f"{cen['max_abs_err']:.1e} / {cen['p99_abs_err']:.1e}" if cen else "-")
            + " |"
        )
    return lines


def ppo_step_table(report: dict) -> list[str]:
    s = report["settings"]
    rkl, wpr = report["seconds"]["rkl"], report["seconds"]["wasserstein"]
    lines = [
        f"{s['model']} ({report['device']}, {report['threads']} threads), batch {s['batch_size']}, "
        f"response length {s['response_length']}, {'LoRA' if s['peft'] else 'all weights'}, "
        f"{s['steps']} timed steps after {s['warmup']} warm-up",
        "",
        "| phase (s / step) | RKL | WPR | WPR / RKL |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        ratio = f"{wpr[phase] / rkl[phase]:.2f}" if rkl[phase] > 0 else "-"
        lines.append(f"| {phase} | {rkl[phase]:.3f} | {wpr[phase]:.3f} | {ratio} |")
    share = report["penalty_share"]
    lines += [
        "",
        f"Penalty share of the step: RKL {share['rkl']:.1%}, WPR {share['wasserstein']:.1%}; "
        f"step-time ratio WPR / RKL {report['step_time_ratio_wpr_over_rkl']:.3f}; "
        f"1 + (WPR - RKL penalty time) / RKL step = {1 + (wpr['penalty'] - rkl['penalty']) / rkl['step']:.3f}.",
    ]
    return lines


def scoring_memory_table(report: dict) -> list[str]:
    gib = 2**30
    plain = report["plain_forward_bytes"]
    threshold = report.get("mmap_threshold") or 0
    allocator = f"glibc mmap threshold fixed at {threshold} B" if threshold else "glibc's default allocator"
    lines = [
        f"T={report['steps']}, V={report['vocab']}, scoring chunk {report['chunk']} rows, {report['device']}, "
        f"{allocator}; a plain forward of one chunk keeping its logits: {plain / gib:.2f} GiB",
        "",
        "| rollout B | one pass (GiB) | / plain forward of a chunk | whole-rollout path (GiB) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        estimate = 2 * 2 * row["B"] * (report["steps"] + 1) * report["vocab"] * 4 / gib  # 2 models' logits + logp
        whole = (
            f"{row['whole_rollout_bytes'] / gib:.2f}" if "whole_rollout_bytes" in row else f"not run (~{estimate:.0f})"
        )
        lines.append(
            f"| {row['B']} | {row['one_pass_bytes'] / gib:.2f} | {row['one_pass_bytes'] / plain:.2f} | {whole} |"
        )
    lines += ["", f"One pass, largest B / smallest B: {report['flatness']:.2f}x."]
    return lines


def main() -> None:
    for name, fn in (
        ("penalty", penalty_table),
        ("penalty", profile_table),
        ("otpo", otpo_table),
        ("official_wpr", official_table),
        ("ppo_step", ppo_step_table),
        ("scoring_memory", scoring_memory_table),
        ("scoring_memory_live", scoring_memory_table),
    ):
        path = RESULTS / f"{name}.json"
        if path.exists():
            print(f"<!-- {path.name}: {fn.__name__} -->")
            print("\n".join(fn(json.loads(path.read_text()))))
            print()


if __name__ == "__main__":
    main()
