"""Deprecated: the preference loss objects and their registry live in :mod:`otalign.losses` (import them from there).

This module re-exports them with a ``DeprecationWarning`` on import.
"""

from __future__ import annotations

import warnings

import torch

from otalign.losses import (
    PAIRWISE_LOSSES,
    PREFERENCE_LOSSES,
    AOTLoss,
    DPOFamilyLoss,
    KTOLoss,
    build_preference_loss,
    loss_options,
)
from otalign.losses.interface import per_token

warnings.warn(
    "otalign.trainers.preference_losses is deprecated; import the preference losses from otalign.losses",
    DeprecationWarning,
    stacklevel=2,
)


def RobustDPOLoss(beta: float, label_smoothing: float = 0.0) -> DPOFamilyLoss:  # noqa: N802 (the old class name)
    """Robust DPO: ``DPOFamilyLoss("robust", beta, label_smoothing)``."""
    return DPOFamilyLoss("robust", beta, label_smoothing)


def loss_inputs(loss, policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    """``(policy, ref)`` divided by the (n,) token counts ``lengths`` when ``loss.average_logps`` is set (the loss
    objects now take the lengths themselves: :func:`otalign.losses.call_loss`)."""
    if getattr(loss, "average_logps", False):
        return per_token(policy, lengths), per_token(ref, lengths)
    return policy, ref


__all__ = [
    "PAIRWISE_LOSSES",
    "PREFERENCE_LOSSES",
    "AOTLoss",
    "DPOFamilyLoss",
    "KTOLoss",
    "RobustDPOLoss",
    "build_preference_loss",
    "loss_inputs",
    "loss_options",
]
