"""What an RL step carries from stage to stage: the scored rollout and the batch the update consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otalign.generation import Rollout
from otalign.regularizers import PenaltyOutput, SupportGradient


@dataclass
class ScoredRollout:
    """A rollout with everything scored under no grad (B rollouts, T response positions).

    Attributes:
        rollout: the sampled batch. rows: each rollout's prompt row (index into the prompt set).
        old_logprobs, ref_logprobs: (B, T) float32 log-probabilities of the sampled tokens.
        kl, entropy: (B, T) exact full-vocabulary KL(pi || pi_ref) and entropy of pi (nats).
        penalty: the regularizer's :class:`~otalign.regularizers.PenaltyOutput`.
        scores: (B,) weighted sum of the rewards (after the missing-EOS penalty and clipping).
        components: each reward function's (B,) raw scores by name.
        potentials: the loss surrogate's :class:`~otalign.regularizers.SupportGradient` on the (B, T) grid, when
            the penalty is in the loss with rollout potentials and the regularizer has no per-token loss term.
    """

    rollout: Rollout
    rows: list[int]
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    penalty: PenaltyOutput
    scores: torch.Tensor
    components: dict[str, torch.Tensor]
    potentials: SupportGradient | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask


@dataclass
class RolloutBatch:
    """What the update needs of a scored rollout, as the algorithm's :meth:`RLTrainer.advantages` computed it.

    Attributes:
        scored: the :class:`ScoredRollout`.
        advantages: (B, T) per-token advantages (PPO) or (B,) one per response (critic-free).
        units: (B,) each rollout's share of a mini-batch's loss normalizer Z (its token count for a token mean, 1 for
            a mean over sequences, ...); Z sums them over the global mini-batch.
        weights: (B, T) per-token loss weights (0 off the generated positions).
        old_values, returns: (B, T) the critic's values at the rollout and the GAE returns (PPO only).
    """

    scored: ScoredRollout
    advantages: torch.Tensor
    units: torch.Tensor
    weights: torch.Tensor
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
