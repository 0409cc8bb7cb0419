"""Anthropic HH-RLHF -> conversational ``prompt``/``chosen``/``rejected`` rows.

Accepted published forms:

- Anthropic's (``Anthropic/hh-rlhf``): ``{"chosen": transcript, "rejected": transcript}``, each transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."`` ending with an Assistant turn. Both must share every
  turn before their last Assistant turn (the prompt).
- Dahoas' (``Dahoas/full-hh-rlhf``, the WPR paper's copy): ``{"prompt": transcript ending "\\n\\nAssistant:",
  "response", "chosen", "rejected"}``, the last three being bare responses.

Output (multi-turn kept as messages)::

    {"prompt": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", "content": ...}]}

Contents are stripped of surrounding whitespace. Problems (see :mod:`otalign.data.conversion`):
``not a transcript``, ``empty response``, ``prompt mismatch``, ``identical responses``, plus the generic ones.
"""

from __future__ import annotations

import re

from .conversion import Converted, RowError, convert_rows, text
from .preference import read_rows

ROLES = {"Human": "user", "Assistant": "assistant"}
TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_transcript(transcript: str, field: str) -> list[dict[str, str]]:
    """Messages of a ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcript (the last one's content may be empty)."""
    pieces = TURN.split(transcript)
    if pieces[0].strip() or len(pieces) < 3:
        raise RowError("not a transcript", field, "expected a transcript starting with '\\n\\nHuman:'")
    turns = zip(pieces[1::2], pieces[2::2], strict=True)
    messages = [{"role": ROLES[role], "content": content.strip()} for role, content in turns]
    for j, message in enumerate(messages[:-1]):
        if not message["content"]:
            raise RowError("not a transcript", field, f"turn {j + 1} ({message['role']}) is empty")
    return messages


def _split_last_reply(transcript: str, field: str) -> tuple[list[dict[str, str]], str]:
    messages = parse_transcript(transcript, field)
    if messages[-1]["role"] != "assistant":
        raise RowError("not a transcript", field, "the transcript does not end with an Assistant turn")
    if not messages[-1]["content"]:
        raise RowError("empty response", field, "the last Assistant turn is empty")
    if len(messages) < 2:
        raise RowError("not a transcript", field, "no Human turn before the Assistant's reply")
    return messages[:-1], messages[-1]["content"]


def hh_rlhf_row(row: dict) -> dict:
    """One standard row from one HH-RLHF row (either published form); :class:`RowError` if unusable."""
    if "prompt" in row:
        prompt = parse_transcript(text(row, "prompt"), "prompt")
        if prompt[-1] != {"role": "assistant", "content": ""}:
            raise RowError("not a transcript", "prompt", "the prompt must end with an empty '\\n\\nAssistant:' turn")
        prompt = prompt[:-1]
        chosen, rejected = text(row, "chosen").strip(), text(row, "rejected").strip()
    else:
        prompt, chosen = _split_last_reply(text(row, "chosen"), "chosen")
        rejected_prompt, rejected = _split_last_reply(text(row, "rejected"), "rejected")
        if rejected_prompt != prompt:
            raise RowError(
                "prompt mismatch", "rejected", "the chosen and rejected transcripts differ before their last reply"
            )
    if chosen == rejected:
        raise RowError("identical responses", "rejected", "chosen and rejected replies are identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def load_hh_rlhf(source: str, split: str = "train", *, on_error: str = "raise") -> Converted:
    """HH-RLHF rows of a ``.jsonl``/``.json``/``.parquet`` file or a Hugging Face dataset, converted."""
    return convert_rows(read_rows(source, split, on_error=on_error), source, hh_rlhf_row, on_error=on_error)
