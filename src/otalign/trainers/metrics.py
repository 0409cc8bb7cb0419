"""Metrics logging: ``metrics.jsonl`` always (main process), plus accelerate trackers when configured.

Each JSONL line is ``{"step": int, "<name>": float, ...}`` with slash names (``reward/mean``, ``kl/exact``);
evaluation metrics carry the prefix :data:`EVAL_PREFIX` (``eval_loss``). :mod:`otalign.runs` reads them back.
JSON has no NaN or infinity: such a value is written as ``null``, and the first time a metric is so written a
``RuntimeWarning`` names it and the step (the trainers' guard stops or skips a step whose loss, gradient, reward
or penalty is not finite, so this is left to statistics of an empty or skipped set).
On resume, lines after the checkpoint's step are dropped first, so a resumed run's file reads exactly
like an uninterrupted one. A run killed while writing leaves a torn last line: readers skip it and resuming
removes it; a malformed line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch

from otalign.runs import EVAL_PREFIX, METRICS_FILE, read_metrics, read_rows  # noqa: F401 (public here too)


class MetricsLogger:
    """Appends metrics to ``<output_dir>/metrics.jsonl`` and forwards them to ``accelerator.log``.

    Args:
        accelerator: its trackers (``log_with``) receive every logged dict when any were initialised.
        output_dir: run folder.
    """

    def __init__(self, accelerator, output_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self._nulled: set[str] = set()  # metrics already warned about

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step`` greater than ``step`` (main process), e.g. when resuming from it."""
        if not (self.accelerator.is_main_process and self.path.is_file()):
            return
        kept = [row for row in read_rows(self.path) if row["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(self.path)

    def reset(self) -> None:
        """Start a fresh file (a new, non-resumed run)."""
        if self.accelerator.is_main_process and self.path.is_file():
            self.path.unlink()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (call on every process; only the main one writes)."""
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            row = {"step": step, **{k: _finite(v) for k, v in metrics.items()}}
            for name in sorted(k for k, v in row.items() if v is None and k not in self._nulled):
                self._nulled.add(name)
                warnings.warn(
                    f"metrics.jsonl: {name} is {float(metrics[name])} at step {step}, written as null "
                    "(warned once per metric)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=step)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class Timer:
    """Wall-clock laps by name (summed when a name repeats), synchronising CUDA so GPU work is counted."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        """``time/<name>`` seconds per lap name and ``time/step`` in total."""
        return {**{f"time/{k}": v for k, v in self.totals.items()}, "time/step": self.last - self.start}
