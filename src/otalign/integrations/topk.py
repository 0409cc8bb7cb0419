r"""The part of a top-k integration every framework shares: the policy's full logits (with gradient) and the
reference's top-k (ids and log-probabilities, e.g. from an inference engine) make one
:class:`~otalign.regularizers.TopKLogProbs` record per position, and the regularizer's penalty, distance and
support-gradient surrogate come from it.

**Support.** A framework that serves the reference as a top-k "teacher" returns the reference's log-probabilities
at its own top-k ids only, so the support is the reference's top-k ids :math:`R` plus the sampled token :math:`y`
when the framework passes it (and the dust: all other tokens). The record lists :math:`R` on both sides
(``policy_ids = ref_ids``), :math:`\log\pi_\theta` gathered there from the policy's logits. otalign's own path
(``evaluate`` on full logits) also lists the policy's top-k: the two agree wherever the policy's top-k lies in
:math:`R \cup \{y\}` (tested), and otherwise the policy's mass outside :math:`R` is priced as dust.

**Gradient.** The surrogate :math:`S = \sum_i \pi_\theta(i)\phi_i + (1 - \sum_i \pi_\theta(i))\phi_{dust}`
(:meth:`~otalign.regularizers.SupportGradient.surrogate_at_slots`) has the value of the distance :math:`D` and,
with :math:`\phi` detached, :math:`\nabla_\theta S = \nabla_\theta D` on the fixed support; it is differentiable in
the policy's logits through ``logits.gather(ids) - logsumexp(logits)`` only (no log-softmax of the whole row is
stored beyond what ``logsumexp`` keeps for its backward: the logits themselves).
"""

from __future__ import annotations

import torch

from otalign.regularizers import Regularizer, TopKLogProbs
from otalign.regularizers.base import Evaluation

ROWS_PER_CHUNK = 4096
"""Positions per ``logsumexp`` chunk in :func:`gathered_log_probs` (memory only, not numerics)."""


def gathered_log_probs(logits: torch.Tensor, ids: torch.Tensor, rows: int = ROWS_PER_CHUNK) -> torch.Tensor:
    r"""(N, m) :math:`\log\mathrm{softmax}(\text{logits})` at ``ids`` in float32 (float64 for float64 logits),
    differentiable in ``logits``.

    Args:
        logits: (N, V) logits, any float dtype.
        ids: (N, m) int64 token ids in [0, V).
        rows: positions per chunk (the float32 ``logsumexp`` of ``rows x V`` at a time).
    """
    if logits.dim() != 2 or ids.dim() != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must be (N, V) and ids (N, m), got {tuple(logits.shape)} and {tuple(ids.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    pieces = []
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows].to(dtype)
        pieces.append(chunk.gather(1, ids[start : start + rows]) - chunk.logsumexp(1, keepdim=True))
    return torch.cat(pieces) if pieces else logits.new_zeros(ids.shape, dtype=dtype)


def reference_topk_record(
    policy_logits: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_logprobs: torch.Tensor,
    actions: torch.Tensor | None = None,
    ref_at_actions: torch.Tensor | None = None,
) -> TopKLogProbs:
    r"""The record of N positions on the support ``[y | R | R]`` (see the module), the policy's fields gathered from
    its logits (differentiable).

    Args:
        policy_logits: (N, V) the policy's logits (tempered as the framework tempers them).
        ref_ids: (N, k) int64 the reference's top-k ids :math:`R` (distinct per position).
        ref_logprobs: (N, k) :math:`\log\pi_{ref}` there, normalised over the whole vocabulary.
        actions: (N,) the sampled tokens, or None when the framework passes none (then slot 0 repeats the first
            listed id: the support is :math:`R` alone).
        ref_at_actions: (N,) :math:`\log\pi_{ref}(y)`; needed with ``actions``.
    """
    if (actions is None) != (ref_at_actions is None):
        raise ValueError("actions and ref_at_actions go together: give both or neither")
    ref_ids = ref_ids.long()
    if actions is None:
        actions, ref_at_actions = ref_ids[:, 0], ref_logprobs[:, 0]
    actions = actions.long()
    policy = gathered_log_probs(policy_logits, torch.cat([actions[:, None], ref_ids], dim=1))
    ref_logprobs = ref_logprobs.to(policy.dtype)
    return TopKLogProbs(
        actions=actions,
        policy_ids=ref_ids,
        policy_logprobs=policy[:, 1:],
        ref_ids=ref_ids,
        ref_logprobs=ref_logprobs,
        policy_at_ref_ids=policy[:, 1:],
        ref_at_policy_ids=ref_logprobs,
        policy_at_actions=policy[:, 0],
        ref_at_actions=ref_at_actions.to(policy.dtype),
    )


def topk_surrogate(
    regularizer: Regularizer, policy_logits: torch.Tensor, record: TopKLogProbs, *, check: bool = True
) -> tuple[torch.Tensor, Evaluation]:
    """The support-gradient surrogate at N positions and the evaluation it came from (one solve per position).

    Args:
        regularizer: a regularizer with a top-k support gradient (``wasserstein``).
        policy_logits: (N, V) the policy's logits the record's policy fields were gathered from (the surrogate is
            differentiable in them).
        record: the N positions' record (:func:`reference_topk_record`).
        check: validate the record's values first (:meth:`TopKLogProbs.check`, against the regularizer's vocabulary).

    Returns:
        ``(surrogate, evaluation)``: (N,) (float32, or float64 from float64 logits) whose value is
        ``evaluation.gradient.value`` (the distance) and whose gradient is the distance's on the fixed support;
        ``evaluation.penalty.per_token`` (N,) is the penalty at the sampled token.
    """
    evaluation = regularizer.evaluate_topk(record, support_gradient=True, check=check)
    gradient = evaluation.gradient
    surrogate = gradient.surrogate_at_slots(gathered_log_probs(policy_logits, gradient.tokens))
    return surrogate, evaluation
