"""Pairwise win rates as the papers count them: a win is 1, a tie (``E``) is one half, a loss 0.

Every comparison shows the judge the two answers in a random order (a fair coin per comparison from a
seeded generator) and maps the verdict back, so a judge's position bias cancels out on average instead of
favouring one model. A malformed judge answer is counted and left out of the denominator, never guessed.
Repeated over seeds/subsamples (the WPR paper: 50 prompts x 5), the rate is reported as mean ± std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

VERDICT_SCORE = {"A": 1.0, "E": 0.5, "B": 0.0}
"""Score of the answer shown first (as A) for each judge verdict."""


@dataclass(frozen=True)
class Comparison:
    """One judged pair, from the point of view of model ``x`` against model ``y``.

    Attributes:
        index: the prompt's index in the evaluation set.
        swapped: True when ``y``'s answer was shown first (as A).
        verdict: the judge's verdict on the order shown (``A``, ``B``, ``E``), None when its answer was malformed.
        raw: the judge's raw output (text, or the two scores of a reward judge).
    """

    index: int
    swapped: bool
    verdict: str | None
    raw: str

    @property
    def score(self) -> float | None:
        """``x``'s result: 1 win, 0.5 tie, 0 loss; None for a malformed verdict."""
        if self.verdict is None:
            return None
        first = VERDICT_SCORE[self.verdict]
        return 1.0 - first if self.swapped else first


def compare(
    judge, prompts: Sequence[str], responses_x: Sequence[str], responses_y: Sequence[str], rng: np.random.Generator
) -> list[Comparison]:
    """Judge ``responses_x[i]`` against ``responses_y[i]`` for every prompt, each pair in an order drawn from ``rng``.

    Args:
        judge: an :class:`otalign.eval.judges.Judge`.
        prompts, responses_x, responses_y: equally long lists, aligned by index.
        rng: draws one coin per comparison (True: ``y`` is shown as A).
    """
    if not len(prompts) == len(responses_x) == len(responses_y):
        raise ValueError(
            f"prompts, responses_x and responses_y differ in length: {len(prompts)}, {len(responses_x)}, "
            f"{len(responses_y)}"
        )
    swaps = (rng.random(len(prompts)) < 0.5).tolist()
    first = [y if s else x for x, y, s in zip(responses_x, responses_y, swaps, strict=True)]
    second = [x if s else y for x, y, s in zip(responses_x, responses_y, swaps, strict=True)]
    judgements = judge.judge(list(prompts), first, second)
    return [Comparison(i, s, j.verdict, j.raw) for i, (s, j) in enumerate(zip(swaps, judgements, strict=True))]


@dataclass(frozen=True)
class WinRate:
    """Counts of one set of comparisons; ``rate`` = (wins + ties / 2) / (wins + ties + losses)."""

    wins: int
    ties: int
    losses: int
    malformed: int

    @classmethod
    def of(cls, comparisons: Sequence[Comparison]) -> WinRate:
        """Count the results of ``comparisons``."""
        scores = [c.score for c in comparisons]
        return cls(
            wins=scores.count(1.0), ties=scores.count(0.5), losses=scores.count(0.0), malformed=scores.count(None)
        )

    @property
    def rate(self) -> float:
        """Win rate with ties as half a win; NaN when no comparison was well-formed."""
        judged = self.wins + self.ties + self.losses
        return (self.wins + 0.5 * self.ties) / judged if judged else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "win_rate": self.rate}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the repeats' win rates; std is 0.0 for one repeat."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def subsample(num_items: int, size: int, rng: np.random.Generator) -> list[int]:
    """``min(size, num_items)`` distinct indices in ``range(num_items)``, sorted, drawn from ``rng``."""
    return sorted(rng.choice(num_items, size=min(size, num_items), replace=False).tolist())
