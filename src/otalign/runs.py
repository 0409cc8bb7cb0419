"""Reading a run folder: the ``metrics.jsonl`` a trainer writes (:class:`otalign.trainers.MetricsLogger`).

Each line is ``{"step": int, "<name>": float | null, ...}``; evaluation metrics carry the prefix
:data:`EVAL_PREFIX`. A run killed while writing leaves a torn last line: :func:`read_rows` skips it; a malformed
line anywhere else is an error naming the file and line. Stdlib only: the sweep, the analyses and the demo read
runs without importing a trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
"""The metrics file of a run folder."""
EVAL_PREFIX = "eval_"
"""Prefix of the evaluation metrics, as transformers' and TRL's trainers write them (``eval_loss``,
``eval_rewards/accuracies``)."""


def read_rows(path: str | Path) -> list[dict]:
    """The JSON rows of the JSONL file ``path``; a torn (unparseable) last line is skipped, any other malformed line
    is a ``ValueError`` naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):  # written while the run was killed
                break
            raise ValueError(f"{path}, line {i}: not valid JSON ({err.msg})") from None
    return rows


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of ``<output_dir>/metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    return read_rows(Path(output_dir) / METRICS_FILE)
