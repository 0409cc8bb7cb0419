"""The RL trainers' reward: a weighted sum of reward functions or models, each one's scores kept for logging."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from otalign.generation import Rollout
from otalign.rewards import Reward, build_reward

RESERVED = ("mean", "std", "total", "group_std", "zero_std_frac")
"""Metric names under ``reward/`` that a reward's own name must not take."""


class RewardSum:
    """Named rewards and their weights; calling it scores a rollout.

    Args:
        rewards: :class:`otalign.rewards.Reward` objects (or callables ``fn(prompts, responses, **columns)``);
            equal names are made unique (``name_2``, ...).
        weights: one weight per reward (None: all 1).
        missing_eos_penalty: subtracted from the sum for a response without EOS (None: off).
        eos_token_id: the EOS id (for ``missing_eos_penalty``).
        clip: clip the sum to ``[-clip, clip]`` (None: off).

    Raises:
        ValueError: no reward, or a weight count that does not match.
    """

    def __init__(
        self,
        rewards: list,
        weights: list[float] | None = None,
        *,
        missing_eos_penalty: float | None = None,
        eos_token_id: int | None = None,
        clip: float | None = None,
    ) -> None:
        given = [r if isinstance(r, Reward) else build_reward(r) for r in rewards]
        if not given:
            raise ValueError("no reward: give reward_fn, reward_model_name_or_path or a reward")
        self.rewards: dict[str, Reward] = {}
        for r in given:
            name, k = r.name, 2
            while name in self.rewards or name in RESERVED:
                name, k = f"{r.name}_{k}", k + 1
            self.rewards[name] = r
        weights = weights or [1.0] * len(self.rewards)
        if len(weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.rewards)} reward function(s)")
        self.weights = [float(w) for w in weights]
        self.missing_eos_penalty, self.eos_token_id, self.clip = missing_eos_penalty, eos_token_id, clip

    def check_columns(self, column_names: Sequence[str]) -> None:
        """``ValueError`` naming the reward and the columns it needs if the prompt rows (``column_names``) lack a
        column a reward function requires: before any step samples, not at the first scoring."""
        for reward in self.rewards.values():
            if hasattr(reward, "keyword_columns"):
                reward.keyword_columns({name: [] for name in column_names})

    def __call__(
        self, rollout: Rollout, rows: list[int], columns: dict[str, list], pad_token_id: int, watch=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B,) weighted sum of the rewards (missing-EOS penalty and clipping applied) and each one's scores.

        Args:
            rollout: the sampled batch. rows: each response's prompt row (for messages).
            columns: the prompt set's extra columns for these rows, by name.
            pad_token_id: the tokenizer's pad id (reward models read right-aligned ids).
            watch: optional ``watch(quantity, scores, cause)`` finite check of each reward's scores.

        Raises:
            ValueError: a reward returning the wrong number of scores, naming it.
        """
        ids, attention = rollout.right_aligned(pad_token_id)
        total = torch.zeros(len(rows), device=ids.device)
        components = {}
        for (name, reward), weight in zip(self.rewards.items(), self.weights, strict=True):
            try:
                scores = reward(rollout.prompt_texts, rollout.response_texts, ids, attention, columns)
            except ValueError as err:  # name the prompt rows behind the batch entries the message counts
                raise ValueError(f"{err} (prompt rows of the batch entries: {rows})") from None
            scores = torch.as_tensor(scores).float().flatten().to(ids.device)
            if scores.numel() != len(rows):
                raise ValueError(f"reward {name!r} returned {scores.numel()} scores for {len(rows)} responses")
            if watch is not None:
                bad = [rows[i] for i in (~torch.isfinite(scores)).nonzero()[:, 0].tolist()]
                watch(f"the score of reward {name!r}", scores, f"it returned NaN or inf for prompt rows {bad}")
            components[name] = scores
            total = total + weight * scores
        if self.missing_eos_penalty is not None:
            finished = (rollout.responses == self.eos_token_id).any(1)
            total = total - self.missing_eos_penalty * (~finished).float()
        if self.clip is not None:
            total = total.clamp(-self.clip, self.clip)
        return total, components
