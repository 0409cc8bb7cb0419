"""Read a judge's verdict (``A``, ``B`` or ``E``) from free text, robustly; None when it cannot be told.

Judges answer in many shapes: a bare letter, JSON (``{"comparison": ..., "choice": "B"}``) possibly inside a
Markdown fence or with single quotes, ``Your Choice: A``, a verdict on the last line, ``**E**``. The rules,
tried in order (the first that finds a letter wins):

1. the whole answer is one letter (quotes, brackets, bold, a final period allowed);
2. a ``choice`` / ``answer`` / ``verdict`` / ``judgment`` key followed by a letter (JSON or prose);
3. the last non-empty line is one letter.

Anything else (empty, cut off, two conflicting letters in rule 2, refusals) is malformed: None.
"""

from __future__ import annotations

import re

VERDICTS = ("A", "B", "E")
_LETTER = r"[\s\"'`*(\[{]*([ABE])[\s\"'`*)\]}.,!]*"
_ALONE = re.compile(rf"^{_LETTER}$", re.IGNORECASE)
_KEYED = re.compile(
    r"(?:choice|answer|verdict|judge?ment|decision|better\s+(?:one|response|summary)(?:\s+is)?)[\"'`*\s]*[:=]"
    r"[\s\"'`*(\[]*(?:(?:response|summary|answer)\s+)?([ABE])(?![A-Za-z])",
    re.IGNORECASE,
)


def parse_verdict(text: str | None) -> str | None:
    """``A``, ``B`` or ``E`` read from a judge's output ``text``; None when malformed (see the module rules)."""
    if not text or not text.strip():
        return None
    alone = _ALONE.match(text.strip())
    if alone:
        return alone.group(1).upper()
    keyed = {m.upper() for m in _KEYED.findall(text)}
    if len(keyed) == 1:
        return keyed.pop()
    if len(keyed) > 1:
        return None
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = _ALONE.match(lines[-1].strip())
    if last and last.group(1).isupper():
        return last.group(1)
    return None
