"""The verdict parser on real-looking judge outputs, malformed ones included (None, never an exception)."""

from __future__ import annotations

import pytest

from otalign.eval import parse_verdict

WELL_FORMED = [
    ("A", "A"),
    ("B\n", "B"),
    (" 'E' ", "E"),
    ("**B**", "B"),
    ("(A).", "A"),
    ('{"comparison": "Response B gives a concrete letter, which directly addresses the request.", "choice": "B"}', "B"),
    ('```json\n{\n  "comparison": "Both are vague and equally unhelpful.",\n  "choice": "E"\n}\n```', "E"),
    ("{'comparison': 'A is more specific.', 'choice': 'A'}", "A"),
    ("Comparison: Response A answers the question while B rambles.\nA", "A"),
    ("Response A is polite but B actually gives a recipe.\n\nB", "B"),
    ("Your Choice: E", "E"),
    ("The better summary is: B", "B"),
    ("Verdict: **A**", "A"),
    ('{"comparison": "B lists steps.", "choice": "Response B"}', "B"),
    ("Final answer: Summary A", "A"),
    ('{"comparison": "A and B are similar, but A is shorter.", "choice": "A"', "A"),  # truncated JSON
]

MALFORMED = [
    "",
    "   \n",
    None,
    "I'm sorry, but I can't help compare these responses.",
    "Both responses have merits. Response A is concise while Response B is detailed.",
    '{"comparison": "Response A is more helpful because',  # cut off before the choice
    '{"choice": "A"} ... actually, on reflection, {"choice": "B"}',  # conflicting
    "C",
    "Answer: Both",
    "a dog and a cat",
]


@pytest.mark.parametrize(("text", "verdict"), WELL_FORMED)
def test_well_formed_outputs(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_outputs_are_none(text):
    assert parse_verdict(text) is None
