"""The reward interface a PPO trainer calls once per rollout batch.

A reward sees the batch both as text (prompts as the policy saw them, decoded responses) and as the
policy's token ids, right-aligned so that every sequence ends at the last position:

- ``sequences`` (B, L) int64: prompt + response tokens (up to and including EOS), left-padded;
- ``attention_mask`` (B, L) bool: True on real tokens.

It returns one scalar score per sequence, (B,) float32, on the sequences' device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
"""A reward function: ``fn(prompts, responses) -> one float per response``."""


class Reward(ABC):
    """Scores a batch of (prompt, response) pairs: ``reward(prompts, responses, sequences, attention_mask)``."""

    name: str = "reward"

    @abstractmethod
    def __call__(
        self, prompts: list[str], responses: list[str], sequences: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B,) float32 scores on ``sequences.device``."""


class FunctionReward(Reward):
    """A :data:`RewardFn` (a named built-in or any Python callable) as a :class:`Reward`."""

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward_fn")

    def __call__(
        self, prompts: list[str], responses: list[str], sequences: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        scores = torch.as_tensor(self.fn(list(prompts), list(responses)), dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise ValueError(
                f"reward function {self.name!r} returned {scores.numel()} scores for {len(responses)} responses"
            )
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward function {self.name!r} returned a non-finite score: {scores.tolist()}")
        return scores.to(sequences.device)
