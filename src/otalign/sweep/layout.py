"""The folder of a sweep: what each file is and when it is written; JSON read and written whole.

Layout under ``output_dir``::

    reference/eval.json              the reference model on the held-out prompts
    <cell>/cell.json                 what the cell is (method, setting, seed, overrides), written first
    <cell>/config.json, metrics.jsonl, checkpoints/, model/     the trainer's own run folder
    <cell>/TRAINED                   written (atomically) once training finished and the model is saved
    <cell>/eval.json                 written (atomically) once the cell's evaluation finished
    results.json, frontier.png, ...  the aggregate (:mod:`otalign.sweep.aggregate`)
"""

from __future__ import annotations

import json
from pathlib import Path

from otalign.paths import write_text_atomically

REFERENCE = "reference"
"""The reference model's folder (it is evaluated like a cell, never trained)."""
CELL_FILE = "cell.json"
TRAINED = "TRAINED"
EVAL_FILE = "eval.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename: the file is whole or absent."""
    write_text_atomically(path, json.dumps(data, indent=1) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
