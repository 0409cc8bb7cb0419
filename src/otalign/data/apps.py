"""APPS programming problems -> ``prompt`` rows with their unit tests (for an execution-based reward).

Published form (``codeparrot/apps``): ``{"problem_id": int, "question": str, "solutions": JSON string,
"input_output": JSON string {"inputs": [...], "outputs": [...], "fn_name"?: str}, "difficulty": str,
"url": str, "starter_code": str}``.

Output::

    {"prompt": ..., "tests": {"inputs": [...], "outputs": [...], "fn_name": str | None},
     "problem_id": int, "difficulty": str}

The prompt is the APPS paper's generation format: ``"\\nQUESTION:\\n<question>\\n<starter_code>\\nUse
Call-Based format\\nANSWER:\\n"`` for problems with ``fn_name`` (``Use Standard Input format`` otherwise; the
starter-code line only when there is starter code). Problems: ``no tests``, ``bad tests``, plus the generic ones.
"""

from __future__ import annotations

import json

from .conversion import Converted, RowError, convert_rows, get, text
from .preference import read_rows


def apps_tests(row: dict) -> dict:
    """``{"inputs", "outputs", "fn_name"}`` from the row's ``input_output`` JSON string."""
    raw = get(row, "input_output")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RowError("no tests", "input_output", "the problem has no tests")
    if not isinstance(raw, str):
        raise RowError("not a string", "input_output", f"expected a JSON string, got {type(raw).__name__}")
    try:
        tests = json.loads(raw)
    except json.JSONDecodeError as err:
        raise RowError("bad tests", "input_output", f"not valid JSON ({err.msg})") from None
    inputs, outputs = (tests.get(k) if isinstance(tests, dict) else None for k in ("inputs", "outputs"))
    if not (isinstance(inputs, list) and isinstance(outputs, list)) or len(inputs) != len(outputs):
        raise RowError("bad tests", "input_output", "expected lists 'inputs' and 'outputs' of equal length")
    if not inputs:
        raise RowError("no tests", "input_output", "the problem has no tests")
    fn_name = tests.get("fn_name")
    if fn_name is not None and not (isinstance(fn_name, str) and fn_name):
        raise RowError("bad tests", "input_output", f"'fn_name' must be a non-empty string, got {fn_name!r:.80}")
    return {"inputs": inputs, "outputs": outputs, "fn_name": fn_name}


def apps_row(row: dict) -> dict:
    """One standard row from one APPS problem; :class:`RowError` if unusable."""
    question = text(row, "question")
    tests = apps_tests(row)
    starter = row.get("starter_code") or ""
    if not isinstance(starter, str):
        raise RowError("not a string", "starter_code", f"expected a string, got {type(starter).__name__}")
    problem_id = get(row, "problem_id")
    if not isinstance(problem_id, int) or isinstance(problem_id, bool):
        raise RowError("bad problem_id", "problem_id", f"expected an integer, got {problem_id!r:.80}")
    style = "Call-Based" if tests["fn_name"] else "Standard Input"
    prompt = f"\nQUESTION:\n{question}\n" + (f"{starter}\n" if starter.strip() else "")
    prompt += f"Use {style} format\nANSWER:\n"
    return {"prompt": prompt, "tests": tests, "problem_id": problem_id, "difficulty": text(row, "difficulty")}


def load_apps(source: str, split: str = "train", *, on_error: str = "raise") -> Converted:
    """APPS problems of a ``.jsonl``/``.json``/``.parquet`` file or a Hugging Face dataset, converted."""
    return convert_rows(read_rows(source, split), source, apps_row, on_error=on_error)
