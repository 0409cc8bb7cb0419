"""Sequence log-probabilities from per-token log-probabilities, optionally token-weighted."""

from __future__ import annotations

import torch


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""Weighted sum of per-token log-probabilities over the valid positions of each sequence.

    .. math::
        \log\pi_w(y|x) = \sum_t \mathrm{mask}_t\, w_t \log\pi(y_t | x, y_{<t})

    Use the same ``weights`` for the policy and the reference log-probabilities of a response,
    so that a pairwise loss sees the weighted log-ratio :math:`\sum_t w_t \log(\pi_\theta/\pi_{ref})`
    (OTPO, paper Eq. 11). Without weights this is the plain sequence log-probability.

    Args:
        token_logps: (B, L) log-probabilities of the response tokens, nats; padded positions may
            hold anything (even ``-inf``).
        mask: (B, L) bool, True on response tokens.
        weights: optional (B, L) token weights (e.g. from :func:`otpo_weights`), treated as
            given (their gradient, if any, is kept).

    Returns:
        (B,) sequence log-probabilities, float32 (float64 for float64 inputs).
    """
    if token_logps.dim() != 2 or mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps and mask must both be (B, L), got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    values = token_logps.to(torch.promote_types(token_logps.dtype, torch.float32))
    if weights is not None:
        if weights.shape != token_logps.shape:
            raise ValueError(f"weights must be (B, L) = {tuple(token_logps.shape)}, got {tuple(weights.shape)}")
        values = values * weights.to(values.dtype)
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)
