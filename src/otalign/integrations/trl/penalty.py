"""A regularizer's per-token penalty from the final hidden states of TRL's passes, through the LM heads in chunks.

Each chunk of ``n`` positions builds ``(n, V)`` logits, never ``(B, T, V)``: ``n = regularizer.max_chunk_elements //
V`` (at least 1).
"""

from __future__ import annotations

import torch

from otalign.regularizers import Regularizer
from otalign.scoring import output_head

from .capture import causal_lm


def lm_heads(policy: torch.nn.Module, reference: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The LM heads of the policy and the reference (the same module under PEFT, where the reference is the model
    with its adapters disabled).

    Raises:
        ValueError: a head that is not a plain linear layer (logit scaling or soft-capping, an adapter on the head).
    """
    heads = tuple(output_head(causal_lm(m)) for m in (policy, reference))
    if any(head is None for head in heads):
        raise ValueError(
            "the regularizer needs LM heads that are plain linear layers (no logit scaling, soft-capping or adapter "
            "on the head)"
        )
    return heads


def tempered_log_probs(head: torch.nn.Module, states: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, V) float32 log-softmax of ``head(states) / temperature`` for (n, d) ``states``: TRL's tempered
    distribution (differentiable)."""
    logits = head(states).float() / temperature
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def chunk_rows(regularizer: Regularizer, head: torch.nn.Linear, count: int):
    """Slices covering ``range(count)`` positions, ``max_chunk_elements // V`` at a time."""
    per_chunk = max(1, regularizer.max_chunk_elements // head.out_features)
    return [slice(start, start + per_chunk) for start in range(0, count, per_chunk)]


def mean_stats(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Per-chunk statistics (means over each chunk's positions) averaged over all positions: ``parts`` lists
    ``(positions, stats)``."""
    total = max(sum(count for count, _ in parts), 1)
    merged: dict[str, float] = {}
    for count, stats in parts:
        for name, value in stats.items():
            merged[name] = merged.get(name, 0.0) + value * count / total
    return merged


@torch.no_grad()
def penalties(
    regularizer: Regularizer,
    heads: tuple[torch.nn.Linear, torch.nn.Linear],
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The regularizer's per-token penalty (:meth:`~otalign.regularizers.Regularizer.penalty`) at the generated
    positions.

    Args:
        regularizer: the otalign regularizer.
        heads: the policy's and the reference's LM heads (:func:`lm_heads`).
        policy_hidden: (B, T, d) the policy's final hidden states predicting each completion token.
        ref_hidden: (B, T, d) the reference's.
        actions: (B, T) the completion tokens.
        mask: (B, T) bool, True on generated tokens.
        temperature: TRL's sampling temperature (the logits are divided by it).

    Returns:
        ``(per_token, stats)``: (B, T) float32 (0 outside ``mask``) and the regularizer's statistics.
    """
    states, ref_states, tokens = policy_hidden[mask], ref_hidden[mask].to(policy_hidden.device), actions[mask]
    values, parts = [], []
    for rows in chunk_rows(regularizer, heads[0], tokens.shape[0]):
        evaluation = regularizer.evaluate(
            tempered_log_probs(heads[0], states[rows], temperature)[None],
            tempered_log_probs(heads[1], ref_states[rows], temperature)[None],
            tokens[rows][None],
            normalized=True,
        )
        values.append(evaluation.penalty.per_token[0])
        parts.append((tokens[rows].shape[0], evaluation.penalty.stats))
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if values:
        per_token = per_token.masked_scatter(mask, torch.cat(values))
    return per_token, mean_stats(parts)
