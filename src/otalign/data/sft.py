"""Supervised fine-tuning data: ``prompt``/``completion`` rows or ``messages`` conversations, as token ids + labels.

Rows (TRL conventions), read from ``.jsonl``/``.json``/``.parquet`` files or a Hugging Face dataset name
(:func:`otalign.data.preference.read_rows`):

- ``{"prompt": ..., "completion": ...}``: plain strings, or both lists of ``{"role", "content"}`` messages;
  the loss covers the completion (encoded by :func:`otalign.data.preference.encode`).
- ``{"messages": [...]}``: a conversation; the loss covers every ``assistant`` turn, each cut out of the
  chat template's rendering of the conversation up to that turn.

:func:`encode_sft` returns ``(input_ids, labels)`` with label ``-100`` (ignored) on every prompt token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .preference import Text, check_same_form, check_text, encode, read_rows, require_fields
from .reading import Rows, numbered

IGNORE_INDEX = -100
"""Label of a token left out of the loss (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""


@dataclass(frozen=True)
class SFTExample:
    """One training example: ``prompt`` + ``completion`` (``messages`` None), or a conversation ``messages``."""

    prompt: Text | None = None
    completion: Text | None = None
    messages: list[dict[str, str]] | None = None


def load_sft_data(source: str, split: str = "train", config: str | None = None) -> list[SFTExample]:
    """All rows of ``source`` (file, or Hugging Face dataset name with its ``config``), validated; errors name
    source, row and field."""
    return parse_sft_rows(read_rows(source, split, config=config), source)


def parse_sft_rows(rows: list[object], where: str) -> list[SFTExample]:
    """Validate raw rows (1-based row numbers in messages); the first row's form (``messages`` or not) sets all.
    The examples keep the rows' numbers (a :class:`~otalign.data.reading.Rows`) for later messages."""
    if not rows:
        raise ValueError(f"{where}: the dataset is empty")
    conversational = isinstance(rows[0], dict) and "messages" in rows[0]
    parse = _parse_conversation if conversational else _parse_pair
    numbers = [i for i, _ in numbered(rows)]
    return Rows([parse(row, f"{where}, row {i}") for i, row in numbered(rows)], where, numbers)


def _parse_pair(row: object, where: str) -> SFTExample:
    row = require_fields(row, ("prompt", "completion"), where)
    prompt, completion = check_text(row, "prompt", where), check_text(row, "completion", where)
    check_same_form(row, ("prompt", "completion"), where)
    return SFTExample(prompt=prompt, completion=completion)


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
        if not (head.startswith(done) and whole.startswith(head)):
            raise ValueError(
                f"{where}, field 'messages', message {k}: the chat template does not render the conversation "
                "before this turn as a prefix of the conversation with it, so the turn cannot be cut out"
            )
        context = tokenizer(head[len(done) :], add_special_tokens=not done)["input_ids"]
        reply = tokenizer(whole[len(head) :], add_special_tokens=False)["input_ids"]
        ids += context + reply
        labels += [IGNORE_INDEX] * len(context) + reply
        done = whole
    return ids, labels
