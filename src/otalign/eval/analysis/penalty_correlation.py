"""KL vs Wasserstein penalties (the WPR paper's Figure 5): same tokens, jointly min-max normalised, Pearson r, slope.

Both penalties are scaled by their coefficient beta, then normalised to [0, 1] with one shared range (the
minimum and maximum over both arrays together), so the slope of the least-squares line W = slope * KL + b
compares their sizes: below 1, the Wasserstein penalty is the more lenient (paper: r = 0.917, slope 0.579).

Points come from either

- a WPR run's ``metrics.jsonl`` (``run_dir``): per logged step, ``kl/exact`` against ``wasserstein/value``;
- generations (``policy`` + ``reference``): per generated token, the reverse-KL penalty log(pi/pi_ref) of
  the sampled token against the WPR penalty, both from :mod:`otalign.regularizers`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from otalign.config import ConfigError, redefault
from otalign.paths import write_text_atomically

from .penalties import PenaltyFields, response_penalties
from .sampling import save_figure


@dataclass
class PenaltyCorrelationConfig(PenaltyFields):
    """Settings of ``otalign analyze penalty-correlation`` (model, sampling and penalty fields: :class:`PenaltyFields`);
    give ``run_dir`` or else ``policy`` and ``reference``."""

    output_dir: str = redefault(PenaltyFields, "output_dir", "reports/penalty-correlation")
    run_dir: str | None = field(default=None, metadata={"help": "a WPR run's output folder (reads its metrics.jsonl)"})
    beta_kl: float = field(
        default=1.0, metadata={"help": "KL coefficient before the joint normalisation", "check": "> 0"}
    )
    beta_wasserstein: float = field(
        default=1.0, metadata={"help": "Wasserstein coefficient before the joint normalisation", "check": "> 0"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.run_dir is None) == (self.policy is None or self.reference is None):
            raise ConfigError("give either run_dir (a WPR run's folder) or both policy and reference")


def correlate(kl: np.ndarray, wasserstein: np.ndarray, beta_kl: float = 1.0, beta_wasserstein: float = 1.0) -> dict:
    """Pearson r and least-squares line of the jointly min-max normalised ``beta * penalty`` arrays.

    Returns:
        ``n``, ``pearson_r``, ``slope``, ``intercept``, ``range`` (the shared [min, max] before normalising) and
        ``kl`` / ``wasserstein``: the normalised points.

    Raises:
        ValueError: different lengths, fewer than two points, non-finite values, or a constant array.
    """
    x = beta_kl * np.asarray(kl, dtype=np.float64)
    y = beta_wasserstein * np.asarray(wasserstein, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"need two 1-D arrays of equal length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("penalties must be finite")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("a constant penalty has no correlation")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    x, y = (x - lo) / (hi - lo), (y - lo) / (hi - lo)
    slope, intercept = np.polyfit(x, y, 1)
    return {
        "n": int(x.size),
        "pearson_r": float(np.corrcoef(x, y)[0, 1]),
        "slope": float(slope),
        "intercept": float(intercept),
        "range": [lo, hi],
        "kl": x.tolist(),
        "wasserstein": y.tolist(),
    }


def from_metrics(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Per logged step of a WPR run: ``kl/exact`` and ``wasserstein/value`` from ``<run_dir>/metrics.jsonl``."""
    from otalign.runs import read_metrics

    rows = [r for r in read_metrics(run_dir) if "kl/exact" in r and "wasserstein/value" in r]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no row with both kl/exact and wasserstein/value (a WPR run?)")
    return np.array([r["kl/exact"] for r in rows]), np.array([r["wasserstein/value"] for r in rows])


def from_generations(config: PenaltyCorrelationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per generated token of the policy: the reverse-KL and the Wasserstein penalty against the reference."""
    penalties = response_penalties(config)
    return torch.cat(penalties.kl).numpy(), torch.cat(penalties.wasserstein).numpy()


def plot(result: dict, path: str | Path) -> None:
    """Scatter of the normalised penalties with the fitted line, the diagonal, r and the slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(result["kl"], result["wasserstein"], s=8, alpha=0.5)
    grid = np.linspace(0.0, 1.0, 2)
    ax.plot(grid, result["slope"] * grid + result["intercept"], color="C3", label=f"fit: slope {result['slope']:.3f}")
    ax.plot(grid, grid, color="gray", linestyle=":", label="y = x")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="normalised KL penalty", ylabel="normalised Wasserstein penalty")
    ax.set_title(f"Pearson r = {result['pearson_r']:.3f} (n = {result['n']})")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def run_penalty_correlation(config: PenaltyCorrelationConfig) -> dict:
    """Compute, write ``penalty_correlation.json`` and ``penalty_correlation.png`` in ``output_dir``, print a line."""
    kl, w = from_metrics(config.run_dir) if config.run_dir is not None else from_generations(config)
    result = correlate(kl, w, config.beta_kl, config.beta_wasserstein)
    result["source"] = "metrics" if config.run_dir is not None else "generations"
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        out / "penalty_correlation.json", json.dumps({"config": asdict(config), **result}, indent=1) + "\n"
    )
    plot(result, out / "penalty_correlation.png")
    print(
        f"penalty correlation ({result['source']}, n={result['n']}): r = {result['pearson_r']:.3f}, "
        f"slope = {result['slope']:.3f}"
    )
    return result
