"""The reward interface an RL trainer calls once per rollout batch.

A reward sees the batch both as text (prompts as the policy saw them, decoded responses) and as the
policy's token ids, right-aligned so that every sequence ends at the last position:

- ``sequences`` (B, L) int64: prompt + response tokens (up to and including EOS), left-padded;
- ``attention_mask`` (B, L) bool: True on real tokens;
- ``columns``: each prompt row's fields other than ``prompt`` (e.g. a reference ``answer``), as a mapping
  from field name to a list aligned with the batch (see :func:`otalign.data.load_prompt_rows`).

It returns one scalar score per sequence, (B,) float32, on the sequences' device.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch

RewardFn = Callable[..., Sequence[float]]
"""A reward function: ``fn(prompts, responses, **columns) -> one float per response``; a function that declares
no ``**kwargs`` receives only the columns it names as keyword parameters (so ``fn(prompts, responses)`` works)."""


class Reward(ABC):
    """Scores (prompt, response) pairs: ``reward(prompts, responses, sequences, attention_mask, columns)``."""

    name: str = "reward"

    @abstractmethod
    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        columns: Mapping[str, Sequence] | None = None,
    ) -> torch.Tensor:
        """(B,) float32 scores on ``sequences.device``."""


class FunctionReward(Reward):
    """A :data:`RewardFn` (a named built-in or any Python callable) as a :class:`Reward`.

    The function is called as ``fn(prompts, responses, **cols)``: ``cols`` holds every column when ``fn``
    takes ``**kwargs``, else only the columns matching its keyword parameters. Scores come back as the
    function gave them, NaN included: the caller checks them (:func:`check_scores`; a trainer's step guard,
    which can skip the step under ``on_nonfinite: skip``). ``choices()``, when given, lists the rewards that could
    be passed instead, for the missing-column message (:func:`otalign.rewards.reward_choices`).

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: (at call time) ``fn`` needs a column the prompt rows lack, or returns the wrong number
            of scores; both name the function.
    """

    def __init__(self, fn: RewardFn, name: str | None = None, choices: Callable[[], str] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.choices = choices
        self.name = name or getattr(fn, "__name__", "reward_fn")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature: positional only
            params = []
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        keyword = (p for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        self.keywords = {p.name: p.default is p.empty for p in keyword}  # name -> required

    def keyword_columns(self, columns: Mapping[str, Sequence] | None) -> dict[str, list]:
        """The columns ``fn`` receives; ``ValueError`` naming the function if a required one is missing."""
        columns = dict(columns or {})
        if self.takes_all:
            return {k: list(v) for k, v in columns.items()}
        missing = [k for k, required in self.keywords.items() if required and k not in columns]
        if missing:
            instead = f", or pass the reward that fits the prompts: {self.choices()}" if self.choices else ""
            raise ValueError(
                f"reward function {self.name!r} needs column(s) {missing} that the prompt rows do not have "
                f"(columns: {sorted(columns)}); add them to every row of the prompt file{instead}"
            )
        return {k: list(columns[k]) for k in self.keywords if k in columns}

    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        columns: Mapping[str, Sequence] | None = None,
    ) -> torch.Tensor:
        values = self.fn(list(prompts), list(responses), **self.keyword_columns(columns))
        scores = torch.as_tensor(values, dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise ValueError(
                f"reward function {self.name!r} returned {scores.numel()} scores for {len(responses)} responses"
            )
        return scores.to(sequences.device)


def check_scores(scores: torch.Tensor, name: str, rows: Sequence[int] | None = None) -> None:
    """``ValueError`` naming the reward ``name`` and the first row with a non-finite score.

    Args:
        scores: (B,) scores.
        name: the reward's name.
        rows: each batch entry's row in the prompt set (0-based), for the message; default: batch positions.
    """
    bad = (~torch.isfinite(scores)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        where = f"prompt row {rows[i]} (batch entry {i})" if rows is not None else f"batch entry {i}"
        raise ValueError(
            f"reward function {name!r} returned a non-finite score {float(scores[i])} for {where}; "
            f"{bad.numel()} of {scores.numel()} scores are NaN or infinite"
        )
