"""Metrics logging: ``metrics.jsonl`` always (main process), plus accelerate trackers when configured.

Each JSONL line is ``{"step": int, "<name>": float, ...}`` with slash names (``reward/mean``, ``kl/exact``).
On resume, lines after the checkpoint's step are dropped first, so a resumed run's file reads exactly
like an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends metrics to ``<output_dir>/metrics.jsonl`` and forwards them to ``accelerator.log``.

    Args:
        accelerator: its trackers (``log_with``) receive every logged dict when any were initialised.
        output_dir: run folder.
    """

    def __init__(self, accelerator, output_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step`` greater than ``step`` (main process), e.g. when resuming from it."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def reset(self) -> None:
        """Start a fresh file (a new, non-resumed run)."""
        if self.accelerator.is_main_process and self.path.is_file():
            self.path.unlink()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (call on every process; only the main one writes)."""
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of ``<output_dir>/metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
