"""Reading data files: the one path by which every JSONL / JSON / text / Parquet file of otalign is read.

Prompt sets, preference and SFT rows, the published datasets' converters and eval generation files all read
through :func:`read_file` (or :func:`parse_text` for text already in memory), with the same rules:

- bytes are UTF-8 (a leading byte-order mark is dropped); other bytes stop the read with
  ``"<file>, row <r> (byte offset <b>): not UTF-8 ..."``, whatever ``on_error`` says (a file in another
  encoding has no usable row);
- ``.jsonl``: one JSON value per line; blank (whitespace-only) lines are skipped; a row is numbered by its
  1-based line, so a message points at the line an editor shows; a line that is not JSON stops the read with
  ``"<file>, row <r>: not valid JSON (...)"``, or with ``on_error="skip"`` is left out and counted as
  ``bad JSON`` in :attr:`Rows.skipped`;
- ``.json``: a list of rows, numbered 1-based by position (a file that is not JSON always stops the read);
- ``.txt``: one row (a string) per non-blank line, numbered by its line;
- ``.parquet`` (needs ``pyarrow``): one row per record, numbered 1-based.

Rows come back as :class:`Rows`, a list that also knows its source, every row's number and what was skipped;
:func:`numbered` pairs rows with their numbers for any list (plain lists count from 1), so messages of later
checks (a missing field, an empty text, a too-long prompt) name the same file and row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

ON_ERROR = ("raise", "skip")
"""What a reader does with a bad row: stop with its file and row (``raise``) or leave it out and count it."""
FORMATS = ("jsonl", "json", "txt", "parquet")


class Rows(list):
    """Rows of one source, in order.

    Attributes:
        source: the file or dataset named in messages.
        numbers: the 1-based row number of each row (its line in a ``.jsonl``/``.txt`` file).
        skipped: problem kind -> row numbers left out while reading (``on_error="skip"``).
    """

    def __init__(self, values=(), source: str = "rows", numbers: list[int] | None = None, skipped=None) -> None:
        super().__init__(values)
        self.source = source
        self.numbers = list(range(1, len(self) + 1)) if numbers is None else list(numbers)
        self.skipped: dict[str, list[int]] = skipped or {}


def check_on_error(on_error: str) -> None:
    """``ValueError`` unless ``on_error`` is one of :data:`ON_ERROR`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def numbered(rows: list) -> Iterator[tuple[int, object]]:
    """``(row number, row)`` pairs: the numbers of a :class:`Rows`, else 1, 2, ..."""
    return zip(rows.numbers, rows, strict=True) if isinstance(rows, Rows) else enumerate(rows, 1)


def decode(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (without a byte-order mark); ``ValueError`` naming the row and byte offset of the
    first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        row = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{source}, row {row} (byte offset {err.start}): not UTF-8 ({err.reason}, byte "
            f"{data[err.start : err.start + 1].hex()}); save the file as UTF-8"
        ) from None


def parse_text(text: str, source: str, fmt: str, *, on_error: str = "raise") -> Rows:
    """The rows of ``text`` in ``fmt`` (``jsonl``, ``json`` or ``txt``), by the module's rules."""
    check_on_error(on_error)
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}, row {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{source}: a .json file must hold a list of rows, got {type(data).__name__}")
        return Rows(data, source)
    rows = Rows(source=source, numbers=[])
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if fmt == "txt":
            value = line
        else:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                if on_error == "raise":
                    raise ValueError(f"{source}, row {i}: not valid JSON ({err.msg}, column {err.colno})") from None
                rows.skipped.setdefault("bad JSON", []).append(i)
                continue
        rows.append(value)
        rows.numbers.append(i)
    return rows


def read_file(path: str | Path, *, kind: str = "data", formats=FORMATS, on_error: str = "raise") -> Rows:
    """The rows of the file ``path`` (its format from the extension, one of ``formats``).

    Args:
        path: the file.
        kind: what the file is, for messages (``"prompt"`` -> ``"prompt file x.jsonl does not exist"``).
        formats: the extensions accepted (without the dot).
        on_error: ``raise`` or ``skip`` (and count) a malformed ``.jsonl`` line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another extension, bytes that are not UTF-8, or malformed JSON (as the module says).
        ImportError: a Parquet file without ``pyarrow``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in formats:
        shown = ", ".join(f".{f}" for f in formats)
        raise ValueError(f"{kind} file {path}: unsupported extension {path.suffix!r}; use {shown}")
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading Parquet needs the 'pyarrow' package") from None
        return Rows(pq.read_table(path).to_pylist(), str(path))
    return parse_text(decode(path.read_bytes(), str(path)), str(path), fmt, on_error=on_error)
