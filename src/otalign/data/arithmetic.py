"""The built-in verifiable-reward task: one-digit sums, answered with a number and checked exactly.

Rows are ``{"prompt": "What is 3 + 5? Answer with the number only.", "answer": "8"}``; all 100 pairs
``a + b`` with ``0 <= a, b <= 9`` are split deterministically into 70 training and 30 held-out problems.
The reward :func:`otalign.rewards.arithmetic_reward` gives 1 when the last integer in the response is the
answer, else 0: a 135M-parameter chat model gets some right from the start, so the reward moves within a
few critic-free RL steps on a CPU.
"""

from __future__ import annotations

import random

SOURCE = "arithmetic"
TEMPLATE = "What is {a} + {b}? Answer with the number only."


def arithmetic_rows(split: str = "train") -> list[dict[str, str]]:
    """The ``train`` (70) or ``test`` (30) rows of the task, in a fixed order."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} of the arithmetic prompts; choose train or test")
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(13).shuffle(pairs)
    chosen = pairs[:70] if split == "train" else pairs[70:]
    return [{"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b)} for a, b in chosen]
