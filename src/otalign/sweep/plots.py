"""The sweep's figures: reward-vs-distance frontiers (the WPR paper's Figure 4 form) and the head-to-head matrix."""

from __future__ import annotations

from pathlib import Path

from otalign.eval.analysis.sampling import save_figure


def _ci(stat: dict) -> float:
    return stat["ci95"] if stat.get("ci95") is not None else 0.0


def plot_frontier(results: dict, path: Path) -> None:
    """Two panels, reward vs exact KL per token and reward vs W per token: one line per method through its
    settings (sorted by KL), error bars = 95% t-intervals across seeds on both axes; the reference at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(s["method"] for s in results["settings"]))
    for color, method in enumerate(methods):
        points = [s for s in results["settings"] if s["method"] == method]
        points.sort(key=lambda s: s["across_seeds"]["kl_per_token"]["mean"])
        for ax, key in ((axes[0], "kl_per_token"), (axes[1], "w_per_token")):
            stats = [s["across_seeds"] for s in points]
            if any(st[key]["mean"] is None for st in stats):
                continue
            ax.errorbar(
                [st[key]["mean"] for st in stats],
                [st["reward"]["mean"] for st in stats],
                xerr=[_ci(st[key]) for st in stats],
                yerr=[_ci(st["reward"]) for st in stats],
                marker="o",
                capsize=3,
                color=f"C{color}",
                label=method,
            )
            for s, st in zip(points, stats, strict=True):
                label = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["setting"].items())
                ax.annotate(label, (st[key]["mean"], st["reward"]["mean"]), fontsize=7, alpha=0.7)
    ref = results["reference"]
    for ax, x, label in (
        (axes[0], 0.0, "exact KL(pi || pi_ref) per token (nats)"),
        (axes[1], ref.get("w_per_token") or 0.0, "Wasserstein distance to pi_ref per token"),
    ):
        ax.errorbar([x], [ref["reward"]], yerr=[ref["reward_ci95_prompts"]], fmt="s", color="black", label="reference")
        ax.set(xlabel=label, ylabel="mean held-out reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Reward vs distance to the reference (error bars: 95% across seeds)")
    save_figure(fig, path)


def plot_head_to_head(results: dict, path: Path) -> None:
    """Matrix of win rates of the row method against the column method at matched KL (mean ± 95% across seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h2h = results["head_to_head"]
    methods = list(h2h["chosen"])
    index = {m: i for i, m in enumerate(methods)}
    values = np.full((len(methods), len(methods)), np.nan)
    text = [["" for _ in methods] for _ in methods]
    for pair in h2h["pairs"]:
        stat = pair["win_rate_a"]
        if stat is None or stat["mean"] is None:
            continue
        i, j = index[pair["a"]], index[pair["b"]]
        ci = f"\n± {stat['ci95']:.2f}" if stat["ci95"] is not None else ""
        values[i, j], values[j, i] = stat["mean"], 1.0 - stat["mean"]
        text[i][j], text[j][i] = f"{stat['mean']:.2f}{ci}", f"{1 - stat['mean']:.2f}{ci}"
    size = 1.5 + 1.1 * len(methods)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdBu")
    for i in range(len(methods)):
        for j in range(len(methods)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=8)
    labels = [h2h["chosen"][m] for m in methods]
    ax.set_xticks(range(len(methods)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), labels, fontsize=8)
    ax.set_title(f"win rate of row vs column at KL ≈ {h2h['target']['kl_per_token']:.3g}/token")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)
