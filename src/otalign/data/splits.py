"""The WPR paper's data split: a seeded 20% / 40% / 40% partition into SFT, reward-model and RL subsets.

:func:`paper_split` partitions any rows; :func:`stage_rows` turns the preference rows of each subset into
what its stage reads: SFT ``prompt``/``completion`` (the preferred response, as in the paper: "prompts are
paired with their preferred responses"), reward ``prompt``/``chosen``/``rejected`` unchanged, RL ``prompt``.
"""

from __future__ import annotations

import random

STAGES = ("sft", "reward", "rl")
PAPER_FRACTIONS = (0.2, 0.4, 0.4)


def paper_split(rows: list, seed: int = 0, fractions: tuple[float, float, float] = PAPER_FRACTIONS) -> dict[str, list]:
    """``{"sft", "reward", "rl"}`` -> disjoint subsets of ``rows`` covering all of them.

    A seeded permutation gives ``round(fractions[0] * n)`` rows to SFT, ``round(fractions[1] * n)`` to the reward
    model and the rest to RL; each subset keeps the input order. The same ``rows`` and ``seed`` give the same split.

    Raises:
        ValueError: fractions that are negative or do not sum to 1.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    n = len(rows)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_sft = round(fractions[0] * n)
    cuts = (0, n_sft, min(n_sft + round(fractions[1] * n), n), n)
    return {stage: [rows[i] for i in sorted(order[cuts[k] : cuts[k + 1]])] for k, stage in enumerate(STAGES)}


def stage_rows(split: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The rows each stage trains on, from a :func:`paper_split` of preference rows (``prompt``/``chosen``/...)."""
    return {
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in split["sft"]],
        "reward": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in split["reward"]],
        "rl": [{"prompt": r["prompt"]} for r in split["rl"]],
    }
