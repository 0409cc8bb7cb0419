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

The built-in set ``"apps_mini"`` (:data:`APPS_MINI`, shipped as ``builtin/apps_mini.jsonl``) is a dozen small
problems in this output form (5 introductory, 4 interview, 3 competition; stdin/stdout and
call-based), each with known-correct ``solutions`` and ``wrong_solutions`` (``{"program", "status"}``: the
verdict the evaluator must give). It is also a prompt file: its ``tests`` and ``difficulty`` columns reach a
reward through the prompt rows.
"""

from __future__ import annotations

import json
from importlib import resources

from .conversion import Converted, RowError, convert_rows, get, text
from .preference import read_rows

APPS_MINI = "apps_mini"
DIFFICULTIES = ("introductory", "interview", "competition")


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
    return convert_rows(read_rows(source, split, on_error=on_error), source, apps_row, on_error=on_error)


def apps_mini_path() -> str:
    """Path of the built-in APPS-form problem set (a prompt file with ``tests`` and ``difficulty`` columns)."""
    return str(resources.files("otalign.data") / "builtin" / "apps_mini.jsonl")


def _problem_row(row: dict) -> dict:
    """A row already in the output form (``prompt``, ``tests`` dict or JSON string, optional ``difficulty``)."""
    if "input_output" in row:
        return apps_row(row)
    prompt = text(row, "prompt")
    tests = get(row, "tests")
    out = dict(row)
    out["prompt"] = prompt
    out["tests"] = apps_tests({"input_output": tests if isinstance(tests, str) else json.dumps(tests)})
    out.setdefault("difficulty", "unknown")
    return out


def load_code_problems(source: str = APPS_MINI, split: str = "train", *, on_error: str = "raise") -> Converted:
    """Problems with tests from ``"apps_mini"``, a raw APPS file/dataset (rows with ``input_output``), or a prompt
    file in the output form (rows with ``prompt`` and ``tests``); every row as :func:`apps_row` gives it."""
    path = apps_mini_path() if source == APPS_MINI else source
    return convert_rows(read_rows(path, split, on_error=on_error), source, _problem_row, on_error=on_error)
