r"""Aggregating a sweep from its folders alone: ``results.json``, ``frontier.png``, ``head_to_head.png``.

Read from every ``<cell>/cell.json`` + ``TRAINED`` + ``eval.json`` and ``reference/eval.json`` (nothing is
trained or sampled here), so ``otalign sweep --aggregate-only`` rebuilds everything after a crash or on
another machine. Cells of the grid not finished, evaluated with settings other than the reference's, or
folders of cells no longer in the grid are listed (``incomplete``, ``stale``, ``outside_grid``) and left out.

Intervals (95%), two kinds, always named:

- **across seeds** (training noise): per (method, setting), the Student-t interval
  :math:`t_{0.975, n-1}\, s / \sqrt{n}` of the ``n`` seeds' per-cell values (None with one seed);
- **across prompts** (evaluation noise): the normal interval :math:`1.96\, s / \sqrt{P}` over the ``P`` held-out
  prompts of the per-prompt values (averaged over seeds first, for a setting).

Per cell: mean reward, win rate against the reference (per prompt: 1 if the cell's reward beats the
reference's on the same prompt and sampling seed, 1/2 on a tie), exact KL and W per token
(:mod:`otalign.sweep.evaluate`), coherence (mean top-k candidate spread per position). Head to head: each
method's setting whose mean KL is closest to a common target (``match_kl``, else the middle of the KL range
all methods cover), then every pair's win rate, cell against cell on the same prompts, seed by seed.
The paper's analyses, where they apply: penalty correlation (Figure 5) of per-response KL and W per token on
the held-out answers and, for runs that logged both, of ``kl/exact`` and ``wasserstein/value`` over training
steps; coherence (Table 8); semantic similarity (Table 7) of each answer to the reference's answer against
the negative KL and W per token.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from otalign.config import ConfigError
from otalign.runs import EVAL_PREFIX

from .config import SweepConfig, expand_grid
from .layout import CELL_FILE, EVAL_FILE, REFERENCE, TRAINED, read_json, write_json_atomic

RESULTS = "results.json"
METRICS = ("reward", "win_rate", "kl_per_token", "w_per_token", "coherence", "response_length")

_T975 = (12.7062, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600, 2.26216, 2.22814)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table to 10, then the Cornish-Fisher
    expansion to 1/df^3, within 2e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384)
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def seed_interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t-interval half-width across seeds (None for one value)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    std = float(x.std(ddof=1)) if x.size > 1 else None
    ci = t_quantile_975(x.size - 1) * std / math.sqrt(x.size) if std is not None else None
    return {"mean": float(x.mean()), "std": std, "ci95": ci, "n": int(x.size)}


def prompt_interval(rows: list[list[float]]) -> dict:
    """Mean and 95% normal half-width across prompts of per-prompt values averaged over ``rows`` (seeds)."""
    per_prompt = np.asarray(rows, dtype=np.float64).mean(0)
    ci = 1.96 * float(per_prompt.std(ddof=1)) / math.sqrt(per_prompt.size) if per_prompt.size > 1 else None
    return {"mean": float(per_prompt.mean()), "ci95": ci, "n": int(per_prompt.size)}


def wins(a: list[float], b: list[float]) -> list[float]:
    """Per prompt: 1 if ``a`` beats ``b``, 1/2 on a tie, else 0."""
    return [float(x > y) + 0.5 * float(x == y) for x, y in zip(a, b, strict=True)]


def per_token(values: list[float], lengths: list[int]) -> np.ndarray:
    """Per-response sums divided by the response's token count."""
    return np.asarray(values, dtype=np.float64) / np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)


def load_cells(config: SweepConfig) -> tuple[dict, list[dict], dict]:
    """``(reference eval, finished cells, {"incomplete": [...], "stale": [...], "outside_grid": [...]})`` from the
    folders; each cell is its ``cell.json`` plus ``eval`` and ``trained`` records. Cells of the grid not finished,
    evaluated with other settings, or folders of cells no longer in the grid are listed and left out."""
    root = Path(config.output_dir)
    reference = read_json(root / REFERENCE / EVAL_FILE)
    if reference is None:
        raise ConfigError(f"output_dir: {root / REFERENCE / EVAL_FILE} does not exist (run the sweep first)")
    order = {name: i for i, name in enumerate(config.method_specs)}
    grid = {cell.name for cell in expand_grid(config)}
    cells, skipped = [], {"incomplete": [], "stale": [], "outside_grid": []}
    for name in sorted(grid - {p.parent.name for p in root.glob(f"*/{CELL_FILE}")}):
        skipped["incomplete"].append(name)
    for path in sorted(root.glob(f"*/{CELL_FILE}")):
        cell = read_json(path)
        folder = path.parent
        trained, evaluation = read_json(folder / TRAINED), read_json(folder / EVAL_FILE)
        if cell["name"] not in grid:
            skipped["outside_grid"].append(cell["name"])
        elif trained is None or evaluation is None:
            skipped["incomplete"].append(cell["name"])
        elif evaluation["settings"] != reference["settings"]:
            skipped["stale"].append(cell["name"])
        else:
            cells.append({**cell, "trained": trained, "eval": evaluation, "folder": str(folder)})
    cells.sort(key=lambda c: (order.get(c["method"], len(order)), c["method"], c["name"]))
    return reference, cells, skipped


def cell_metrics(evaluation: dict, reference: dict) -> dict:
    """One evaluation's numbers (means over prompts with across-prompt intervals) against the reference's."""
    s = evaluation["summary"]
    out = {
        "reward": s["reward_mean"],
        "reward_ci95_prompts": s["reward_ci95"],
        "kl_per_token": s["kl_per_token"],
        "w_per_token": s.get("ot_per_token"),
        "response_length": s["response_length"],
    }
    if "coherence" in evaluation:
        out["coherence"] = sum(evaluation["coherence"]) / max(sum(evaluation["lengths"]), 1)
    if evaluation is not reference:
        w = wins(evaluation["scores"], reference["scores"])
        out["win_rate"] = float(np.mean(w))
        out["win_rate_ci95_prompts"] = prompt_interval([w])["ci95"]
    return out


def group_settings(cells: list[dict], reference: dict) -> list[dict]:
    """Per (method, setting): the seeds' cells and every metric's across-seed interval, plus the reward's and
    win rate's across-prompt interval (per-prompt values averaged over the seeds)."""
    groups: dict[str, dict] = {}
    for cell in cells:
        group = groups.setdefault(
            cell["setting_name"],
            {"method": cell["method"], "setting": cell["setting"], "name": cell["setting_name"], "cells": []},
        )
        group["cells"].append(cell)
    out = []
    for group in groups.values():
        members = group.pop("cells")
        metrics = [cell_metrics(c["eval"], reference) for c in members]
        group["seeds"] = [c["seed"] for c in members]
        group["cells"] = [c["name"] for c in members]
        group["across_seeds"] = {m: seed_interval([x.get(m) for x in metrics]) for m in METRICS}
        trainer_eval = [c["trained"].get("eval_metrics", {}) for c in members]
        for key in sorted({k for e in trainer_eval for k in e if k.startswith(EVAL_PREFIX)}):
            group["across_seeds"][key] = seed_interval([e.get(key) for e in trainer_eval])
        group["across_prompts"] = {
            "reward": prompt_interval([c["eval"]["scores"] for c in members]),
            "win_rate": prompt_interval([wins(c["eval"]["scores"], reference["scores"]) for c in members]),
        }
        out.append(group)
    return out


def match_target(settings: list[dict], match_kl: float | None) -> dict:
    """The KL per token the head-to-head matches at: ``match_kl``, else the middle of the range every method's
    settings cover (the median of all settings' KL when the ranges do not overlap)."""
    if match_kl is not None:
        return {"kl_per_token": match_kl, "how": "match_kl"}
    by_method: dict[str, list[float]] = {}
    for s in settings:
        by_method.setdefault(s["method"], []).append(s["across_seeds"]["kl_per_token"]["mean"])
    lo = max(min(v) for v in by_method.values())
    hi = min(max(v) for v in by_method.values())
    if lo <= hi:
        return {"kl_per_token": (lo + hi) / 2, "how": f"middle of the common KL range [{lo:.4g}, {hi:.4g}]"}
    everything = [v for values in by_method.values() for v in values]
    return {"kl_per_token": float(np.median(everything)), "how": "median of all settings (KL ranges do not overlap)"}


def _kl(setting: dict) -> float:
    return setting["across_seeds"]["kl_per_token"]["mean"]


def head_to_head(cells: list[dict], settings: list[dict], match_kl: float | None) -> dict:
    """Every pair of methods at matched KL: win rate of the first against the second, seed by seed."""
    methods = list(dict.fromkeys(s["method"] for s in settings))
    if len(methods) < 2:
        return {"note": "one method: nothing to match", "pairs": []}
    target = match_target(settings, match_kl)
    chosen = {}
    for method in methods:
        options = [s for s in settings if s["method"] == method]
        chosen[method] = min(
            options, key=lambda s: abs(s["across_seeds"]["kl_per_token"]["mean"] - target["kl_per_token"])
        )
    by_name = {c["name"]: c for c in cells}
    pairs = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            sa, sb = chosen[a], chosen[b]
            cells_a = {by_name[n]["seed"]: by_name[n] for n in sa["cells"]}
            cells_b = {by_name[n]["seed"]: by_name[n] for n in sb["cells"]}
            seeds = sorted(set(cells_a) & set(cells_b))
            rows = [wins(cells_a[s]["eval"]["scores"], cells_b[s]["eval"]["scores"]) for s in seeds]
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "setting_a": sa["name"],
                    "setting_b": sb["name"],
                    "kl_a": sa["across_seeds"]["kl_per_token"]["mean"],
                    "kl_b": sb["across_seeds"]["kl_per_token"]["mean"],
                    "seeds": seeds,
                    "win_rate_a": seed_interval([float(np.mean(r)) for r in rows]) if rows else None,
                    "win_rate_a_prompts": prompt_interval(rows) if rows else None,
                }
            )
    return {"target": target, "chosen": {m: s["name"] for m, s in chosen.items()}, "pairs": pairs}


def penalty_correlations(cells: list[dict], reference: dict) -> dict:
    """Figure 5 on the sweep's own runs: per cell, Pearson r and slope of jointly normalised KL and W per token
    over the held-out answers, and over training steps where the run logged both."""
    from otalign.eval.analysis.penalty_correlation import correlate, from_metrics

    out = {}
    for cell in cells:
        e = cell["eval"]
        entry = {}
        try:
            fit = correlate(per_token(e["kl"], e["lengths"]), per_token(e["w"], e["lengths"]))
            entry["held_out"] = {k: fit[k] for k in ("n", "pearson_r", "slope", "intercept")}
        except ValueError as err:
            entry["held_out"] = {"skipped": str(err)}
        try:
            fit = correlate(*from_metrics(cell["folder"]))
            entry["training"] = {k: fit[k] for k in ("n", "pearson_r", "slope", "intercept")}
        except (ValueError, FileNotFoundError) as err:
            entry["training"] = {"skipped": str(err)}
        out[cell["name"]] = entry
    return out


def semantic_similarity(cells: list[dict], reference: dict, encoder: str) -> dict:
    """Table 7 on the sweep's own runs: per cell, the mean cosine similarity of each answer to the reference's
    answer to the same prompt (same sampling seed), and its Pearson r with -KL and -W per token."""
    from otalign.eval.analysis.encoder import sentence_encoder
    from otalign.eval.analysis.semantic_similarity import pearson

    encode = sentence_encoder(encoder)
    ref = encode(reference["responses"])
    out = {}
    for cell in cells:
        e = cell["eval"]
        similarity = (encode(e["responses"]) * ref).sum(-1).double().numpy()
        out[cell["name"]] = {
            "similarity": float(similarity.mean()),
            "pearson_neg_kl": pearson(-per_token(e["kl"], e["lengths"]), similarity),
            "pearson_neg_w": pearson(-per_token(e["w"], e["lengths"]), similarity),
        }
    return out


def environment() -> dict:
    """Package versions and the machine the aggregate was built on (the runs' own machine when run in one go)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    packages = {}
    for name in ("otalign", "torch", "transformers", "accelerate", "peft", "numpy", "vaderSentiment"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "packages": packages,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def timing(cells: list[dict], reference: dict) -> dict:
    """Seconds spent: summed training step time, evaluations, and the CPU seconds where recorded."""
    evals = [reference] + [c["eval"] for c in cells]
    cpu = [c["trained"].get("session_cpu_s") for c in cells] + [e.get("eval_cpu_s") for e in evals]
    return {
        "train_s": sum(c["trained"]["train_s"] for c in cells),
        "eval_s": sum(e["eval_s"] for e in evals),
        "cpu_s": sum(cpu) if all(v is not None for v in cpu) else None,
    }


def aggregate(config: SweepConfig) -> dict:
    """Build and write ``results.json``, ``frontier.png`` and ``head_to_head.png`` from the folders; print a table."""
    reference, cells, skipped = load_cells(config)
    settings = group_settings(cells, reference)
    results = {
        "command": config.command,
        "eval_settings": reference["settings"],
        "intervals": {
            "across_seeds": "95% Student-t interval of the per-seed values (training noise)",
            "across_prompts": "95% normal interval over held-out prompts of per-prompt values averaged over seeds "
            "(evaluation noise)",
        },
        "reference": cell_metrics(reference, reference),
        "cells": [
            {
                "name": c["name"],
                "method": c["method"],
                "setting": c["setting"],
                "seed": c["seed"],
                **cell_metrics(c["eval"], reference),
                "train_s": c["trained"]["train_s"],
                "train_cpu_s": c["trained"].get("session_cpu_s"),
                "eval_s": c["eval"]["eval_s"],
                "eval_cpu_s": c["eval"].get("eval_cpu_s"),
                "last_training_metrics": c["trained"]["last_metrics"],
                "trainer_eval_metrics": c["trained"].get("eval_metrics", {}),
            }
            for c in cells
        ],
        "settings": settings,
        "timing": timing(cells, reference),
        "environment": environment(),
        "head_to_head": head_to_head(cells, settings, config.match_kl) if settings else {"pairs": []},
        "analyses": {},
        **skipped,
    }
    if cells and "penalty_correlation" in config.analyses:
        results["analyses"]["penalty_correlation"] = penalty_correlations(cells, reference)
    if cells and "coherence" in config.analyses:
        results["analyses"]["coherence"] = {
            "reference": results["reference"].get("coherence"),
            "settings": {s["name"]: s["across_seeds"]["coherence"] for s in settings},
            "note": f"mean pairwise distance of the top-{reference['settings']['coherence_top_k']} next-token "
            "candidates per generated position, reference input embeddings (lower: more coherent)",
        }
    if cells and "semantic_similarity" in config.analyses:
        try:
            results["analyses"]["semantic_similarity"] = semantic_similarity(cells, reference, config.encoder)
        except ImportError as err:
            results["analyses"]["semantic_similarity"] = {"skipped": str(err)}
    root = Path(config.results_dir or config.output_dir)
    write_json_atomic(root / RESULTS, results)
    if settings:
        from .plots import plot_frontier, plot_head_to_head

        plot_frontier(results, root / "frontier.png")
        if results["head_to_head"]["pairs"]:
            plot_head_to_head(results, root / "head_to_head.png")
    print_table(results)
    return results


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def print_table(results: dict) -> None:
    """Per setting: reward, win rate (across seeds), KL and W per token; then the head-to-head pairs."""
    print(f"{'setting':<36} {'seeds':>5} {'reward':>16} {'win vs ref':>16} {'KL/token':>17} {'W/token':>17}")
    ref = results["reference"]
    print(f"{'reference':<36} {'':>5} {ref['reward']:>16.3f} {'':>16} {0.0:>17.4f} {ref['w_per_token'] or 0.0:>17.4f}")
    for s in results["settings"]:
        a = s["across_seeds"]
        print(
            f"{s['name']:<36} {len(s['seeds']):>5} {_fmt(a['reward']):>16} {_fmt(a['win_rate']):>16} "
            f"{_fmt(a['kl_per_token'], 4):>17} {_fmt(a['w_per_token'], 4):>17}"
        )
    for pair in results["head_to_head"].get("pairs", []):
        print(
            f"head to head at KL {results['head_to_head']['target']['kl_per_token']:.4f}: {pair['setting_a']} beats "
            f"{pair['setting_b']} on {_fmt(pair['win_rate_a'])} of prompts (across seeds)"
        )
    for key in ("incomplete", "stale", "outside_grid"):
        if results.get(key):
            print(f"{key} cells left out: {', '.join(results[key])}")
