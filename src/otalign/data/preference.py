"""Preference datasets: paired ``prompt/chosen/rejected`` and unpaired ``prompt/completion/label`` rows.

Rows follow the Hugging Face (TRL) conventions. Each text field is either a plain string or, for
conversational data, a list of ``{"role", "content"}`` messages (the prompt's turns; the completion's
assistant turn(s)); all fields of a row take the same form. Optional reference columns hold
precomputed sequence log-probabilities in nats: ``ref_chosen_logps`` and ``ref_rejected_logps``
(paired) or ``ref_logps`` (unpaired), in every row or in none.

Sources: ``builtin`` (the packaged demo set), a local ``.jsonl`` (one object per line), ``.json`` (a list of
objects) or ``.parquet`` file (needs ``pyarrow``), a folder written by ``save_to_disk`` or a Hugging Face dataset
name (both need the ``datasets`` package; a name, a reachable hub), all read by
:func:`otalign.data.reading.read_source` (blank lines skipped, UTF-8, rows numbered by their line or position).
Every row is validated before anything trains; an error names the source, the
1-based row and the field. No row is dropped; unknown extra columns are ignored.

:func:`encode` turns a prompt and a completion into token ids: plain text is tokenized as is (special
tokens such as BOS added to the prompt) and the completion gets the EOS token appended;
conversations go through the tokenizer's chat template, the completion being what the template adds
after the prompt rendered with its generation prompt (the template must be prefix-preserving: :func:`check_prefix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

from .reading import Rows, numbered, read_source

Text = str | list[dict[str, str]]
"""A plain string or a list of chat messages."""

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
DATASET_FORMATS = ("jsonl", "json", "parquet")
"""The file formats of preference, SFT and reward datasets."""


@dataclass(frozen=True)
class PreferencePair:
    """One paired example: ``chosen`` is preferred to ``rejected`` as a reply to ``prompt``.

    ``ref_chosen_logps`` / ``ref_rejected_logps``: precomputed :math:`\\log\\pi_{ref}(y|x)` (nats) or None.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None


@dataclass(frozen=True)
class LabeledCompletion:
    """One unpaired example: ``completion`` to ``prompt`` is desirable (``label`` True) or not.

    ``ref_logps``: precomputed :math:`\\log\\pi_{ref}(y|x)` (nats) or None.
    """

    prompt: Text
    completion: Text
    label: bool
    ref_logps: float | None = None


Example = PreferencePair | LabeledCompletion


def load_preference_data(
    source: str, split: str = "train", config: str | None = None
) -> list[PreferencePair] | list[LabeledCompletion]:
    """All rows of ``source`` (a file path or a Hugging Face dataset name, with its ``config``), validated.

    The format (paired or unpaired) is set by the first row: it has ``chosen`` or ``completion``.

    Raises:
        ValueError: an unreadable row, a missing or malformed field, mixed forms, reference columns in
            some rows only, or no row at all; the message names the source, row and field.
        FileNotFoundError: neither a file nor (with ``datasets`` installed) a loadable dataset name.
    """
    return parse_rows(read_rows(source, split, config=config), source)


BUILTIN_PREFERENCES = "builtin"
"""The name of the packaged demo preference set: 80 pairs over the built-in training prompts, made by
``otalign data synth`` (the default model's best and worst of 4 samples by the sentiment reward)."""


def read_rows(source: str, split: str = "train", *, on_error: str = "raise", config: str | None = None) -> Rows:
    """Raw rows of a ``.jsonl``/``.json``/``.parquet`` file, a folder written by ``save_to_disk``, a Hugging Face
    dataset (:func:`otalign.data.reading.read_source`, which ``split``, ``on_error`` and ``config`` are passed to),
    or the packaged demo preference set (``"builtin"``)."""
    if source == BUILTIN_PREFERENCES:
        source = str(resources.files("otalign.data") / "builtin" / "sentiment_preferences.jsonl")
    return read_source(source, split, formats=DATASET_FORMATS, on_error=on_error, config=config)


def parse_rows(rows: list[object], where: str) -> list[PreferencePair] | list[LabeledCompletion]:
    """Validate raw rows (row numbers in messages are 1-based, a :class:`~otalign.data.reading.Rows`' own); see
    :func:`load_preference_data`. The examples keep the rows' numbers (a ``Rows``) for later messages."""
    if not rows:
        raise ValueError(f"{where}: the dataset is empty")
    first = rows[0] if isinstance(rows[0], dict) else {}
    paired = "completion" not in first
    parse = parse_pair if paired else parse_labeled
    numbers, examples = zip(*((i, parse(row, f"{where}, row {i}")) for i, row in numbered(rows)), strict=True)
    columns = ("ref_chosen_logps", "ref_rejected_logps") if paired else ("ref_logps",)
    has_ref = [getattr(e, columns[0]) is not None for e in examples]
    if any(has_ref) and not all(has_ref):
        i = numbers[has_ref.index(not has_ref[0])]
        raise ValueError(
            f"{where}, row {i}, field {columns[0]!r}: reference log-probs must be given in every row or in none"
        )
    if not paired and len({e.label for e in examples}) < 2:
        raise ValueError(f"{where}: unpaired data needs both desirable (label true) and undesirable rows")
    return Rows(examples, where, numbers)


def require_fields(row: object, names: tuple[str, ...], where: str) -> dict:
    """``row`` if it is an object holding every field of ``names``; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with fields {list(names)}, got {type(row).__name__}")
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r} (fields: {sorted(row)})")
    return row


def extract_prompt(row: dict) -> dict:
    """TRL's implicit-prompt preference rows: ``chosen``/``rejected`` holding the whole text or conversation and
    no ``prompt`` (or a plain-text prompt next to conversational completions). The prompt becomes the longest
    common prefix of the two (messages, or characters less a trailing space, as TRL's ``extract_prompt``); the
    completions keep the rest. Other rows are returned unchanged."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, (str, list)) and isinstance(rejected, type(chosen))):
        return row
    if "prompt" in row and not (isinstance(row["prompt"], str) and isinstance(chosen, list)):
        return row  # an explicit prompt (a text prompt beside whole conversations is TRL's implicit form too)
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 - the loop index is the prefix length
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return {**row, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def parse_pair(row: object, where: str) -> PreferencePair:
    """A validated :class:`PreferencePair` from one row (implicit-prompt rows: :func:`extract_prompt`);
    ``ValueError`` names ``where`` and the field."""
    if isinstance(row, dict):
        row = extract_prompt(row)
    row = require_fields(row, PAIRED_FIELDS, where)
    prompt, chosen, rejected = (check_text(row, name, where) for name in PAIRED_FIELDS)
    check_same_form(row, PAIRED_FIELDS, where)
    ref = [optional_logp(row, name, where) for name in ("ref_chosen_logps", "ref_rejected_logps")]
    if (ref[0] is None) != (ref[1] is None):
        raise ValueError(f"{where}: give both 'ref_chosen_logps' and 'ref_rejected_logps' or neither")
    return PreferencePair(prompt, chosen, rejected, *ref)


def parse_labeled(row: object, where: str) -> LabeledCompletion:
    """A validated :class:`LabeledCompletion` from one row; ``ValueError`` names ``where`` and the field."""
    row = require_fields(row, UNPAIRED_FIELDS, where)
    prompt, completion = check_text(row, "prompt", where), check_text(row, "completion", where)
    check_same_form(row, ("prompt", "completion"), where)
    if not isinstance(row["label"], bool):
        raise ValueError(f"{where}, field 'label': expected true or false, got {row['label']!r:.80}")
    return LabeledCompletion(prompt, completion, row["label"], optional_logp(row, "ref_logps", where))


def check_text(row: dict, name: str, where: str) -> Text:
    """``row[name]`` if it is a non-empty string or a non-empty list of string role/content messages."""
    value = row[name]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}, field {name!r}: empty text")
        return value
    if isinstance(value, list) and value:
        for j, message in enumerate(value):
            ok = isinstance(message, dict) and isinstance(message.get("role"), str)
            if not (ok and isinstance(message.get("content"), str)):
                raise ValueError(f"{where}, field {name!r}, message {j}: need string 'role' and 'content'")
        return value
    raise ValueError(f"{where}, field {name!r}: expected a non-empty string or list of messages, got {value!r:.80}")


def check_same_form(row: dict, names: tuple[str, ...], where: str) -> None:
    """``ValueError`` unless the fields ``names`` are all strings or all message lists."""
    conversational = [isinstance(row[n], list) for n in names]
    if any(conversational) and not all(conversational):
        odd = names[conversational.index(not conversational[0])]
        raise ValueError(f"{where}, field {odd!r}: mixes plain text and chat messages; use one form per row")


def optional_logp(row: dict, name: str, where: str) -> float | None:
    """``row[name]`` as a float log-probability (finite, <= 0), or None when absent or null."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
        raise ValueError(f"{where}, field {name!r}: expected a finite log-probability <= 0, got {value!r:.80}")
    return float(value)


def encode(tokenizer, prompt: Text, completion: Text, where: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of one example (rules in the module docstring).

    Raises:
        ValueError: conversational rows with a tokenizer that has no chat template, or a template that
            does not render the prompt as a prefix of the whole conversation (:func:`check_prefix`).
    """
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return prompt_ids, tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: conversational rows need a tokenizer with a chat template")
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    check_prefix(head, whole, where)
    return (
        tokenizer(head, add_special_tokens=False)["input_ids"],
        tokenizer(whole[len(head) :], add_special_tokens=False)["input_ids"],
    )


def check_prefix(head: str, whole: str, where: str) -> None:
    """``ValueError`` (one line, starting with ``where``) unless the chat template's rendering ``head`` of a
    conversation (a prompt with its generation prompt) is a prefix of its rendering ``whole`` of the conversation
    with the next turn (the completion), showing where the two part.

    TRL trains on such a template by cutting the completion where the two tokenizations part (with a warning), so
    the end of the prompt is left out of training; otalign asks for a prefix-preserving template instead."""
    if whole.startswith(head):
        return
    at = next((i for i, (a, b) in enumerate(zip(head, whole, strict=False)) if a != b), min(len(head), len(whole)))
    before, one, other = head[max(at - 30, 0) : at], head[at : at + 30], whole[at : at + 30]
    raise ValueError(
        f"{where}: the chat template does not render the conversation so far as a prefix of the conversation with "
        f"the next turn (it is not prefix-preserving), so the turn cannot be cut out: after {before!r} one has "
        f"{one!r}, the other {other!r}; use a template whose rendering of a prompt with add_generation_prompt "
        "begins its rendering with the completion (TRL instead cuts the completion where the two part, leaving the "
        "prompt's end out of training; its chat_template_path sets another template)"
    )
