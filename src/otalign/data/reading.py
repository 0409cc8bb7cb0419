"""Reading data: the one path by which every JSONL / JSON / text / Parquet file and every dataset of otalign is read.

Prompt sets, preference and SFT rows and the published datasets' converters read through :func:`read_source`
(a file, a folder written by ``save_to_disk`` or a Hugging Face dataset name); eval generation files through
:func:`read_file` (or :func:`parse_text` for text already in memory). Files follow the same rules:

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

A ``save_to_disk`` folder or a hub dataset (both need ``datasets``) gives one row per record, numbered 1-based.

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
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json")
"""Files of which one marks a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""


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


def read_source(
    source: str,
    split: str = "train",
    *,
    kind: str = "dataset",
    formats=FORMATS,
    on_error: str = "raise",
    config: str | None = None,
) -> Rows:
    """The rows of ``source``: a file (:func:`read_file`, one of ``formats``; ``on_error`` goes with it), a folder
    written by ``save_to_disk`` (its ``split`` for a ``DatasetDict``), or a Hugging Face dataset's ``split`` in its
    configuration ``config`` (``datasets.load_dataset(source, config, split=split)``, TRL's ``dataset_config``).

    A name that reads as a local path (it starts with ``.``, ``/`` or ``~``, or ends in one of ``formats``) never
    goes to the hub. ``kind`` names the source in messages (``"prompt set 'p.jsonl': no such file ..."``).

    Raises:
        FileNotFoundError: a local path that is neither a file nor a saved folder; a hub name without ``datasets``.
        ValueError: ``config`` given for a local source (it names a hub dataset's configuration), a ``split`` a
            saved ``DatasetDict`` lacks, or a file's problems (:func:`read_file`).
        ImportError: a saved folder without the ``datasets`` package.
    """
    path = Path(source).expanduser()
    if config is not None and path.exists():
        raise ValueError(f"dataset_config={config!r} names a Hugging Face dataset's configuration; {source} is local")
    if path.is_file():
        return read_file(path, kind=kind, formats=formats, on_error=on_error)
    saved = path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS)
    if path.is_dir() and not saved:
        raise FileNotFoundError(
            f"{kind} {source!r}: a folder without {' or '.join(SAVED_MARKERS)}, so not one written by save_to_disk"
        )
    local = source.startswith((".", "/", "~")) or path.suffix.lower().lstrip(".") in formats
    if not saved and local:
        raise FileNotFoundError(f"{kind} {source!r}: no such file (nor a folder saved with save_to_disk)")
    try:
        import datasets
    except ImportError:
        if saved:
            raise ImportError(
                f"{source}: reading a folder saved with save_to_disk needs the 'datasets' package"
            ) from None
        raise FileNotFoundError(
            f"{kind} {source!r}: no such file, and loading a Hugging Face dataset needs the 'datasets' package "
            "(pip install 'otalign[data]')"
        ) from None
    if not saved:
        return Rows(datasets.load_dataset(source, config, split=split), source)
    rows = datasets.load_from_disk(str(path))
    if isinstance(rows, datasets.DatasetDict):
        if split not in rows:
            raise ValueError(f"{source}: no split {split!r}; it has {sorted(rows)}")
        rows = rows[split]
    return Rows(rows, source)
