"""Prompt sets for RL: the built-in sentiment prompts (train / held-out) or a local file, validated up front.

A prompt is a plain string or a conversation (a list of ``{"role", "content"}`` messages). Sources:

- ``.jsonl``: one JSON object per line with a ``prompt`` field;
- ``.json``: a list of such objects (or of strings);
- ``.txt``: one prompt per non-empty line;
- ``.parquet`` (needs ``pyarrow``), a folder written by ``save_to_disk`` or a Hugging Face dataset name (need
  ``datasets``): records with a ``prompt`` column; the split is the ``split`` argument.

All are read by :func:`otalign.data.reading.read_source`, as the preference and SFT datasets are (blank lines
skipped, UTF-8, 1-based rows in every message).

Fields of a row other than ``prompt`` are its columns (:func:`load_prompt_rows`), passed to reward functions.

The built-in set (``"builtin"``) is shipped as package data: 80 training prompts and 40 held-out prompts
on disjoint topics ("Write one sentence about a rainy morning.").
"""

from __future__ import annotations

from importlib import resources

from .arithmetic import SOURCE as ARITHMETIC
from .arithmetic import arithmetic_rows
from .preference import check_text
from .reading import Rows, numbered, parse_text, read_source

BUILTIN = "builtin"
PROMPT_SETS = (BUILTIN, ARITHMETIC)
"""The prompt sets a ``prompts`` option names instead of a file."""
SPLITS = ("train", "test")
PROMPT_FORMATS = ("jsonl", "json", "txt", "parquet")
"""The file formats of a prompt set."""
Prompt = str | list[dict[str, str]]


def load_prompts(source: str = BUILTIN, split: str = "train") -> list[Prompt]:
    """Prompts of ``source`` (``"builtin"``, ``"arithmetic"``, a file, a saved folder or a dataset name); ``split``
    picks its train/test part. The prompts of :func:`load_prompt_rows`, without their other columns.

    Raises:
        ValueError: unknown split, an unreadable row, a missing/empty/non-string ``prompt``, or no prompt at all;
            the message names the file and the 1-based row.
        FileNotFoundError: a local source that does not exist.
    """
    return [row["prompt"] for row in load_prompt_rows(source, split)]


def load_prompt_rows(source: str = BUILTIN, split: str = "train") -> list[dict]:
    """Rows of ``source``, each a dict with ``prompt`` plus the row's other fields (e.g. a reference ``answer``
    that a data-dependent reward function receives as a column).

    Sources: ``"builtin"`` (the sentiment prompts), ``"arithmetic"`` (:mod:`otalign.data.arithmetic`, with an
    ``answer`` column), or one of the module docstring's (a ``.txt`` row has only ``prompt``; ``split`` picks the
    split of a saved ``DatasetDict`` or a hub dataset).

    Raises:
        ValueError, FileNotFoundError: as :func:`load_prompts`.
        ImportError: a ``.parquet`` file without ``pyarrow``, a saved folder without ``datasets``.
    """
    if source == ARITHMETIC:
        return arithmetic_rows(split)
    if source == BUILTIN:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of the built-in prompts; choose one of {SPLITS}")
        resource = resources.files("otalign.data") / "builtin" / f"sentiment_prompts_{split}.jsonl"
        return prompt_rows(parse_text(resource.read_text(encoding="utf-8"), f"builtin:{split}", "jsonl"))
    return prompt_rows(read_source(source, split, kind="prompt set", formats=PROMPT_FORMATS))


def parse_prompts(text: str, where: str, fmt: str) -> list[Prompt]:
    """Parse and validate the prompts in ``text`` (``jsonl``, ``json`` or ``txt``); ``where`` names the source."""
    return [row["prompt"] for row in prompt_rows(parse_text(text, where, fmt))]


def prompt_rows(rows: Rows) -> Rows:
    """The rows (``prompt`` validated, other fields kept, row numbers kept) of a read prompt file."""
    parsed = Rows(source=rows.source, numbers=rows.numbers)
    for i, row in numbered(rows):
        prompt = validate_prompt(row, f"{rows.source}, row {i}")
        parsed.append({**row, "prompt": prompt} if isinstance(row, dict) else {"prompt": prompt})
    if not parsed:
        raise ValueError(f"{rows.source}: the prompt set is empty")
    return parsed


def prompt_columns(rows: list[dict], where: str = "prompt rows") -> list[str]:
    """The column names (fields other than ``prompt``) every row has; ``ValueError`` naming the first row that
    lacks a column another row has, so that a data-dependent reward never sees a partial column."""
    if not rows:
        return []
    names = sorted({key for row in rows for key in row if key != "prompt"})
    for i, row in enumerate(rows, 1):
        missing = [name for name in names if name not in row]
        if missing:
            raise ValueError(f"{where}, row {i}: missing field(s) {missing} that other rows have")
    return names


def validate_prompt(row: object, where: str) -> Prompt:
    """The prompt of one row (a string, or an object with a ``prompt`` field); ``ValueError`` names ``where``."""
    prompt = row.get("prompt") if isinstance(row, dict) else row
    if isinstance(row, dict) and "prompt" not in row:
        raise ValueError(f"{where}: missing field 'prompt' (fields: {sorted(row)})")
    return check_text({"prompt": prompt}, "prompt", where)


def render_prompt(prompt: Prompt, tokenizer, *, use_chat_template: bool = True) -> str:
    """The text the policy continues: the chat template with a generation prompt when the tokenizer has one
    (and ``use_chat_template``), else the plain string. A conversation requires a chat template."""
    has_template = use_chat_template and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, list) or has_template:
        if not has_template:
            raise ValueError("conversational prompts need a tokenizer with a chat template (use_chat_template=true)")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt
