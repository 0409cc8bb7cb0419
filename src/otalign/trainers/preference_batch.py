"""Batches of (prompt, completion) token sequences and the per-token log-probs (and hidden states) of a model on them.

Layout: each sequence is ``prompt_ids + completion_ids``, right-padded to ``S`` tokens; the completion
tokens are gathered into (N, T) tensors, T the longest completion. Completion token t of row i sits at
sequence position ``p_i + t`` (p_i the prompt length) and is predicted by position ``p_i + t - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    """N padded prompt + completion sequences.

    Attributes:
        input_ids: (N, S) int64, right-padded with the pad token.
        attention_mask: (N, S) bool, True on real tokens.
        positions: (N, T) int64, the sequence position that predicts each completion token (0 on padding).
        targets: (N, T) int64 completion token ids (pad token on padding).
        mask: (N, T) bool, True on completion tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def collate(sequences: list[tuple[list[int], list[int]]], pad_token_id: int, device=None) -> SequenceBatch:
    """A :class:`SequenceBatch` of ``(prompt_ids, completion_ids)`` pairs (each with >= 1 token of both)."""
    width = max(len(p) + len(c) for p, c in sequences)
    steps = max(len(c) for _, c in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.bool)
    positions = torch.zeros((n, steps), dtype=torch.long)
    targets = torch.full((n, steps), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, steps), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(sequences):
        length = len(prompt) + len(completion)
        input_ids[i, :length] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :length] = True
        positions[i, : len(completion)] = torch.arange(len(prompt) - 1, length - 1)
        targets[i, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        mask[i, : len(completion)] = True
    return SequenceBatch(*(t.to(device) for t in (input_ids, attention_mask, positions, targets, mask)))


def completion_logps(
    model, batch: SequenceBatch, *, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""Per-token :math:`\log\pi(y_t | x, y_{<t})` of the completions, optionally last-layer hidden states, and the
    logits' sums for TRL's ``logits/*`` metrics.

    Gradients flow when enabled. Log-probs are computed in float32 (``logit - logsumexp``) on the
    completion positions only.

    Args:
        model: a Hugging Face causal LM (possibly wrapped by accelerate/peft).
        batch: the sequences.
        hidden: also return the last layer's hidden states at the predicting positions, detached.

    Returns:
        ``(token_logps, states, logit_sums)``: (N, T) float32 (0 on padding), (N, T, H) in the model's dtype or
        None, and (N,) float32 detached: each row's sum over its completion tokens of the mean logit over the
        vocabulary at the predicting position (divided by the token count: TRL's mean completion logit).
    """
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask.long(),
        use_cache=False,
        output_hidden_states=hidden,
    )
    index = batch.positions.unsqueeze(-1)
    logits = torch.gather(out.logits, 1, index.expand(-1, -1, out.logits.shape[-1])).float()
    picked = torch.gather(logits, 2, batch.targets.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)).masked_fill(~batch.mask, 0.0)
    logit_sums = logits.detach().mean(-1).masked_fill(~batch.mask, 0.0).sum(1)
    states = None
    if hidden:
        last = out.hidden_states[-1].detach()
        states = torch.gather(last, 1, index.expand(-1, -1, last.shape[-1]))
    return token_logps, states, logit_sums
