"""Rollouts of the PPO trainer: the sampling of :mod:`otalign.generation` (re-exported here) and the critic's values."""

from __future__ import annotations

import torch

from otalign.generation import (
    SEED_STRIDE,
    GumbelSampler,
    Rollout,
    SamplingParams,
    encode_prompts,
    generate,
    left_pad,
    positions,
    response_logits,
    sample_batches,
    sample_seeds,
)

__all__ = [
    "SEED_STRIDE",
    "GumbelSampler",
    "Rollout",
    "SamplingParams",
    "encode_prompts",
    "generate",
    "left_pad",
    "positions",
    "response_logits",
    "sample_batches",
    "sample_seeds",
    "response_values",
]


def response_values(critic, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """(b, T) critic values of the states before each response token."""
    steps = rollout.responses.shape[1]
    values = critic(
        input_ids=rollout.sequences[rows],
        attention_mask=rollout.attention_mask[rows].long(),
        position_ids=rollout.position_ids[rows],
    )
    return values[:, -(steps + 1) : -1]
