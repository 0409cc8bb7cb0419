"""The arithmetic task's verifiable reward (see :mod:`otalign.data.arithmetic`): exact check of the answer."""

from __future__ import annotations

import re

INTEGER = re.compile(r"-?\d+")


def arithmetic_reward(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1.0 where the last integer in the response equals the row's ``answer`` column exactly, else 0.0."""
    scores = []
    for response, expected in zip(responses, answer, strict=True):
        found = INTEGER.findall(response)
        scores.append(float(bool(found) and found[-1] == str(expected).strip()))
    return scores
