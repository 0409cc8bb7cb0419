"""Turning a published dataset's rows into our standard columns, row by row, with errors that name file, row and field.

A format module (:mod:`~otalign.data.hh_rlhf`, :mod:`~otalign.data.tldr`, :mod:`~otalign.data.apps`) supplies a
function ``raw row (dict) -> standard row (dict)`` that raises :class:`RowError` for a row it cannot use.
:func:`convert_rows` runs it over every row: with ``on_error="raise"`` (default) the first bad row stops
everything with ``"<source>, row <i>, field '<field>': <problem>"``; with ``on_error="skip"`` bad rows are
left out and counted per kind of problem in :attr:`Converted.skipped` (see :meth:`Converted.summary`), together
with the lines the reader skipped (``bad JSON``, :mod:`otalign.data.reading`). Row numbers are the reader's.
A row whose converted form repeats an earlier one is a ``duplicate`` problem like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from otalign.paths import write_text_atomically

from .reading import Rows, check_on_error, numbered


class RowError(ValueError):
    """A row that does not fit its format.

    Args:
        kind: short problem name, used to group skipped rows (``missing field``, ``empty text``, ``duplicate``...).
        field: the offending field (dotted path for nested ones, e.g. ``info.post``) or None for the whole row.
        detail: what is wrong, for the message.
    """

    def __init__(self, kind: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.field, self.detail = kind, field, detail

    def located(self, where: str) -> str:
        """The message with its location: ``<where>, field '<field>': <detail>``."""
        return f"{where}, field {self.field!r}: {self.detail}" if self.field else f"{where}: {self.detail}"


@dataclass
class Converted:
    """Result of :func:`convert_rows`.

    Attributes:
        rows: the standard rows, in input order.
        skipped: problem kind -> 1-based numbers of the rows left out for it.
        total: rows read.
    """

    rows: list[dict]
    skipped: dict[str, list[int]] = field(default_factory=dict)
    total: int = 0

    def summary(self, source: str) -> str:
        """One line: rows kept, and each kind of problem with its count and first row numbers."""
        kept = f"{source}: kept {len(self.rows)} of {self.total} rows"
        if not self.skipped:
            return kept
        parts = []
        for kind, rows in sorted(self.skipped.items()):
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            parts.append(f"{len(rows)} {kind} (rows {shown})")
        return f"{kept}; skipped {'; '.join(parts)}"


def convert_rows(raw: list[object], source: str, convert, *, on_error: str = "raise") -> Converted:
    """``convert`` applied to every raw row (see the module docstring).

    Raises:
        ValueError: a bad row with ``on_error="raise"``, an unknown ``on_error``, or no row left at all.
    """
    check_on_error(on_error)
    read_skipped = raw.skipped if isinstance(raw, Rows) else {}
    result = Converted(rows=[], total=len(raw) + sum(map(len, read_skipped.values())))
    result.skipped = {kind: list(rows) for kind, rows in read_skipped.items()}
    seen: dict[str, int] = {}
    for i, row in numbered(raw):
        try:
            if not isinstance(row, dict):
                raise RowError("not an object", None, f"expected a JSON object, got {type(row).__name__}")
            out = convert(row)
            key = json.dumps(out, sort_keys=True)
            if key in seen:
                raise RowError("duplicate", None, f"duplicate of row {seen[key]}")
            seen[key] = i
            result.rows.append(out)
        except RowError as err:
            if on_error == "raise":
                raise ValueError(err.located(f"{source}, row {i}")) from None
            result.skipped.setdefault(err.kind, []).append(i)
    if not result.rows:
        raise ValueError(f"{result.summary(source)}: no usable row")
    return result


def get(row: dict, path: str) -> object:
    """The value at a dotted ``path`` of nested objects; :class:`RowError` (``missing field``) if absent."""
    value: object = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RowError("missing field", path, "missing")
        value = value[part]
    return value


def text(row: dict, path: str) -> str:
    """The string at ``path``; :class:`RowError` if missing, not a string, or only whitespace."""
    value = get(row, path)
    if not isinstance(value, str):
        raise RowError("not a string", path, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError("empty text", path, "empty text")
    return value


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, parent folders created, whole or not at all:
    :func:`otalign.paths.write_text_atomically`); returns the path."""
    path = Path(path)
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
