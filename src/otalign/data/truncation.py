"""Rows longer than ``max_length`` tokens: truncated as TRL does (``truncation_mode``), or an error naming the row.

One rule for every command (``sft``, ``reward``, ``dpo``), on the encoded token sequence (prompt + completion):

- ``keep_start``: the first ``max_length`` tokens are kept (the end of the completion is cut);
- ``keep_end``: the last ``max_length`` tokens are kept (the start of the prompt is cut);
- ``error``: a ``ValueError`` naming the source, row and field.

:func:`kept` gives the span to keep; :func:`truncate_pair` applies it to a ``(prompt_ids, completion_ids)`` pair.
"""

from __future__ import annotations

from dataclasses import field

TRUNCATION_MODES = ("keep_end", "keep_start", "error")


def truncation_field(default: str):
    """The ``truncation_mode`` config field (help and choices written once, here) with ``default``."""
    return field(
        default=default,
        metadata={
            "help": "a row longer than max_length: keep_start (keep its first max_length tokens), keep_end (keep "
            "its last max_length tokens: the prompt's start is cut) or error (stop, naming the row)",
            "choices": TRUNCATION_MODES,
        },
    )


def kept(length: int, max_length: int, mode: str, where: str) -> slice:
    """The span of a ``length``-token sequence that ``mode`` keeps within ``max_length`` tokens.

    Raises:
        ValueError: ``mode`` is ``error`` and ``length > max_length``; the message starts with ``where``.
    """
    if length <= max_length:
        return slice(0, length)
    if mode == "error":
        raise ValueError(f"{where}: {length} tokens, more than max_length={max_length} (truncation_mode: error)")
    return slice(0, max_length) if mode == "keep_start" else slice(length - max_length, length)


def truncate_pair(
    prompt_ids: list[int], completion_ids: list[int], max_length: int, mode: str, where: str
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` whose concatenation is its :func:`kept` span, at most ``max_length`` tokens.

    When ``keep_end`` cuts the whole prompt, the first kept token becomes the prompt: no token predicts it, as in
    TRL, where the first token of a truncated sequence is never scored.

    Raises:
        ValueError: ``error`` mode and a longer pair, or ``keep_start`` leaving no completion token (a prompt of
            ``max_length`` tokens or more); the message starts with ``where``.
    """
    span = kept(len(prompt_ids) + len(completion_ids), max_length, mode, where)
    ids = (prompt_ids + completion_ids)[span]
    split = max(len(prompt_ids) - span.start, 1)
    if split >= len(ids):
        raise ValueError(
            f"{where}: the prompt alone has {len(prompt_ids)} tokens, so truncation_mode {mode} at "
            f"max_length={max_length} leaves no completion token; raise max_length or use keep_end"
        )
    return ids[:split], ids[split:]
