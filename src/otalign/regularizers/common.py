"""What every regularizer module shares below the interface: the log-probability floor and a value's description
for error messages."""

from __future__ import annotations

import torch

LOG_PROB_FLOOR = -80.0
"""Log-probabilities are floored here (probability ``e^-80 ~ 1.8e-35``) where a penalty needs a finite
log-ratio or mass: a token the reference (or the policy) rules out with a ``-inf`` logit, or whose
probability underflows float32. ``80`` leaves headroom so that ``exp(+-80)`` times the small constants of
the penalties stays inside float32 (max ``3.4e38``)."""


def describe(value: object) -> str:
    """A short description of ``value`` for error messages: dtype and shape of a tensor, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
