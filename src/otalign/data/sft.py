"""Supervised fine-tuning data: prompt/completion, conversation or plain-text rows, as token ids + labels.

Rows (TRL conventions), read from ``.jsonl``/``.json``/``.parquet`` files, ``save_to_disk`` folders or a Hugging
Face dataset name (:func:`otalign.data.preference.read_rows`); the first row's fields set the form of all, in
TRL's order:

- ``{"prompt": ..., "completion": ...}``: plain strings, or both lists of ``{"role", "content"}`` messages;
  the loss covers the completion (encoded by :func:`otalign.data.preference.encode`).
- ``{"messages": [...]}``: a conversation; the loss covers every ``assistant`` turn, each cut out of the
  chat template's rendering of the conversation up to that turn.
- ``{"text": ...}`` (TRL's language-modeling form; the field is ``dataset_text_field``): a plain string,
  tokenized as TRL does, ``tokenizer(text + eos_token)`` (special tokens such as BOS added; the EOS token
  string appended unless the text already ends with it); the loss covers every token.

:func:`encode_sft` returns ``(input_ids, labels)`` with label ``-100`` (ignored) on every untrained token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from .preference import Text, check_prefix, check_same_form, check_text, encode, read_rows, require_fields
from .reading import Rows, numbered

IGNORE_INDEX = -100
"""Label of a token left out of the loss (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""
TEXT_FIELD = "text"
"""TRL's default ``dataset_text_field``: the column of a language-modeling row."""


@dataclass(frozen=True)
class SFTExample:
    """One training example: ``prompt`` + ``completion``, a conversation ``messages``, or a plain ``text`` (the
    other fields None)."""

    prompt: Text | None = None
    completion: Text | None = None
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def load_sft_data(
    source: str, split: str = "train", config: str | None = None, *, dataset_text_field: str = TEXT_FIELD
) -> list[SFTExample]:
    """All rows of ``source`` (file, saved folder, or Hugging Face dataset name with its ``config``), validated;
    errors name source, row and field. ``dataset_text_field``: the column of language-modeling rows."""
    return parse_sft_rows(read_rows(source, split, config=config), source, dataset_text_field=dataset_text_field)


def parse_sft_rows(rows: list[object], where: str, *, dataset_text_field: str = TEXT_FIELD) -> list[SFTExample]:
    """Validate raw rows (1-based row numbers in messages); the first row's form sets all: ``prompt`` (a pair),
    else ``messages`` (a conversation), else ``dataset_text_field`` (a text), as TRL tells them apart. The
    examples keep the rows' numbers (a :class:`~otalign.data.reading.Rows`) for later messages."""
    if not rows:
        raise ValueError(f"{where}: the dataset is empty")
    first = rows[0]
    if not isinstance(first, dict) or "prompt" in first:
        parse = _parse_pair  # a row that is no object fails there, naming the fields it needs
    elif "messages" in first:
        parse = _parse_conversation
    elif dataset_text_field in first:
        parse = partial(_parse_text, name=dataset_text_field)
    else:
        row = next(numbered(rows))[0]
        raise ValueError(
            f"{where}, row {row}: expected fields 'prompt' and 'completion', 'messages', or {dataset_text_field!r} "
            f"(dataset_text_field); got {sorted(first)}"
        )
    numbers = [i for i, _ in numbered(rows)]
    return Rows([parse(row, f"{where}, row {i}") for i, row in numbered(rows)], where, numbers)


def _parse_pair(row: object, where: str) -> SFTExample:
    row = require_fields(row, ("prompt", "completion"), where)
    prompt, completion = check_text(row, "prompt", where), check_text(row, "completion", where)
    check_same_form(row, ("prompt", "completion"), where)
    return SFTExample(prompt=prompt, completion=completion)


def _parse_text(row: object, where: str, *, name: str) -> SFTExample:
    row = require_fields(row, (name,), where)
    if not isinstance(row[name], str):
        raise ValueError(
            f"{where}, field {name!r} (dataset_text_field): expected a string, got {type(row[name]).__name__}; "
            "a conversation goes in a 'messages' field"
        )
    return SFTExample(text=check_text(row, name, where))


def _parse_conversation(row: object, where: str) -> SFTExample:
    row = require_fields(row, ("messages",), where)
    messages = check_text(row, "messages", where)
    if not isinstance(messages, list):
        raise ValueError(f"{where}, field 'messages': expected a list of messages, got a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}, field 'messages': no assistant turn to train on")
    return SFTExample(messages=messages)


def encode_sft(tokenizer, example: SFTExample, where: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels equal the ids on trained tokens, ``-100`` elsewhere.

    Raises:
        ValueError: a conversation with a tokenizer without chat template, or whose template does not render
            each prefix of the conversation as a prefix of the longer ones.
    """
    if example.text is not None:
        eos = tokenizer.eos_token
        text = example.text if eos is None or example.text.endswith(eos) else example.text + eos
        ids = tokenizer(text)["input_ids"]
        return ids, list(ids)
    if example.messages is None:
        prompt_ids, completion_ids = encode(tokenizer, example.prompt, example.completion, where)
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: conversational rows need a tokenizer with a chat template")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    messages = example.messages
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        check_prefix(done, head, f"{where}, field 'messages', message {k}")
        check_prefix(head, whole, f"{where}, field 'messages', message {k}")
        context = tokenizer(head[len(done) :], add_special_tokens=not done)["input_ids"]
        reply = tokenizer(whole[len(head) :], add_special_tokens=False)["input_ids"]
        ids += context + reply
        labels += [IGNORE_INDEX] * len(context) + reply
        done = whole
    return ids, labels
