r"""The truncated OT problem at each position: support, masses with the dust atom, and ground costs.

Steps 1-3 of :mod:`otalign.regularizers.wasserstein`: the support :math:`S = \{y\} \cup \text{top-}k(a)
\cup \text{top-}k(b)` (from full log-probabilities, :func:`select_support`, or from a
:class:`~otalign.regularizers.topk.TopKLogProbs` record, :func:`topk_support`: the same slots), each side's mass
on it plus the dust (the mass outside), and the costs among the support's embeddings and the dust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otalign.ot import euclidean, pairwise_cost

from ..base import chunk_bounds
from ..common import LOG_PROB_FLOOR
from ..topk import TopKLogProbs

METRICS = ("euclidean", "cosine")
KNN_RTOL = 1e-4
"""Relative slack of the neighbour test ``C_ij <= max(r_i, r_j)``, so that rounding differences between
the radii (computed once over the whole vocabulary) and the support's costs do not drop the k1-th
neighbour itself."""


@dataclass(frozen=True)
class Support:
    """Candidate support of each position, before duplicates are dropped.

    Attributes:
        tokens: (n, m) int64 token ids; slot 0 is the sampled token, then the policy's top-k, then the
            reference's top-k (``m = 2k + 1`` when built by :func:`select_support`).
        policy_logprobs: (n, m) policy log-probabilities of the slots' tokens (float32 or float64).
        ref_logprobs: (n, m) reference log-probabilities.
        distinct: (n, m) bool, False where a slot repeats the token of an earlier slot.
    """

    tokens: torch.Tensor
    policy_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    distinct: torch.Tensor

    def __getitem__(self, rows: slice) -> Support:
        return Support(self.tokens[rows], self.policy_logprobs[rows], self.ref_logprobs[rows], self.distinct[rows])

    @staticmethod
    def cat(parts: list[Support]) -> Support:
        """Concatenate supports of equal width along the position axis."""
        return Support(*(torch.cat([getattr(p, name) for p in parts]) for name in Support.__dataclass_fields__))


@dataclass(frozen=True)
class TruncatedProblem:
    """Per-position truncated OT problems on ``s`` support slots plus one dust atom (the last index).

    Attributes:
        a: (n, s + 1) policy masses, summing to 1; slot 0 is the sampled token (mass floored at
            ``exp(LOG_PROB_FLOOR)``), duplicate slots have mass 0, the last entry is the dust.
        b: (n, s + 1) reference masses, same slots.
        cost: (n, s + 1, s + 1) float32 costs, all finite.
        tokens: (n, s) int64 token id of each support slot.
        distinct: (n, s) bool, False for duplicate (zero-mass padding) slots.
    """

    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    tokens: torch.Tensor
    distinct: torch.Tensor


def select_support(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, actions: torch.Tensor, top_k: int
) -> Support:
    """Slots ``[y, top-k(policy), top-k(reference)]`` with their log-probabilities and duplicate flags.

    Args:
        policy_logprobs: (n, V) float32 normalised log-probabilities of the policy.
        ref_logprobs: (n, V) float32 normalised log-probabilities of the reference.
        actions: (n,) int64 sampled tokens.
        top_k: k, 1 <= k <= V.

    Returns:
        :func:`topk_support` of :meth:`~otalign.regularizers.topk.TopKLogProbs.from_log_probs`: width ``2k + 1``.
    """
    return topk_support(TopKLogProbs.from_log_probs(policy_logprobs, ref_logprobs, actions, top_k))


def topk_support(record: TopKLogProbs) -> Support:
    """The support slots ``[y | policy top-k | reference top-k]`` of a top-k record (:meth:`TopKLogProbs.slots`)
    with duplicate flags: among equal tokens the earliest slot is the distinct one, so slot 0 (the sampled token)
    is always distinct.

    Returns:
        :class:`Support` of width ``1 + k_p + k_r``, log-probabilities in ``record.dtype``.
    """
    tokens, policy, ref = record.slots()
    ordered, order = tokens.sort(dim=1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    distinct = ~torch.empty_like(repeat).scatter_(1, order, repeat)
    return Support(tokens, policy, ref, distinct)


def compact(support: Support) -> Support:
    """Move each position's distinct slots first (keeping their order, so slot 0 stays the sampled token)
    and drop the slots that are duplicates at every position: width ``max_n(#distinct)``."""
    order = (~support.distinct).to(torch.uint8).argsort(dim=1, stable=True)
    width = int(support.distinct.sum(1).max()) if support.distinct.numel() else 1
    order = order[:, :width]
    return Support(*(getattr(support, name).gather(1, order) for name in Support.__dataclass_fields__))


def support_masses(support: Support) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference masses (n, s + 1) on the support slots plus dust (the mass outside).

    Duplicate slots get 0, the policy's sampled token (slot 0) at least ``exp(LOG_PROB_FLOOR)``.
    """
    policy = support.policy_logprobs.clone()
    policy[:, 0] = policy[:, 0].clamp_min(LOG_PROB_FLOOR)
    return _with_dust(policy, support.distinct), _with_dust(support.ref_logprobs, support.distinct)


def _with_dust(logprobs: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """Masses of the distinct slots and, appended, ``1 - their sum``; each row renormalised to sum to 1
    (float32 rounding of ``1 - sum``, or the floor, can break that by ~1e-7)."""
    mass = torch.where(distinct, logprobs.exp(), torch.zeros_like(logprobs))
    mass = torch.cat([mass, (1.0 - mass.sum(1, keepdim=True)).clamp_min(0.0)], dim=1)
    return mass / mass.sum(1, keepdim=True)


def support_cost(
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    *,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
    block_positions: int | None = None,
) -> torch.Tensor:
    """Ground costs (n, s + 1, s + 1) among the support tokens and the dust atom (the last index).

    Args:
        embeddings: (V, d) token embeddings, any float dtype (costs are computed in float32 or better).
        tokens: (n, s) int64 support tokens.
        metric: ``euclidean`` or ``cosine`` (1 - cosine similarity).
        radius: optional (V,) k1-NN radii; a pair with ``C_ij > max(r_i, r_j)`` (up to :data:`KNN_RTOL`)
            is not a neighbour pair and costs ``2 * dust_cost``.
        dust_cost: ``"max"`` (per position, the largest cost among the support's tokens) or a number >= 0.
        block_positions: positions per block of the (block, s, d) embedding gather (None: all at once).

    Returns:
        Costs in float32 (float64 for float64 embeddings), all finite; ``cost[:, -1, -1] = 0``.
    """
    n, s = tokens.shape
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    cost = torch.empty(n, s + 1, s + 1, dtype=dtype, device=tokens.device)
    for start, stop in chunk_bounds(n, block_positions or n):
        points = embeddings[tokens[start:stop]]  # a fresh gather: the Euclidean cost may centre it in place
        pair = (
            euclidean(points, points, overwrite=True)
            if metric == "euclidean"
            else pairwise_cost(points, points, metric)
        )
        pair = pair.to(dtype)
        dust = pair.amax(dim=(1, 2)) if dust_cost == "max" else torch.full_like(pair[:, 0, 0], float(dust_cost))
        if radius is not None:
            reach = radius[tokens[start:stop]].to(dtype)
            reach = torch.maximum(reach[:, :, None], reach[:, None, :]) * (1.0 + KNN_RTOL)
            pair = torch.where(pair <= reach, pair, 2.0 * dust[:, None, None])
        block = cost[start:stop]
        block[:, :s, :s] = pair
        block[:, :s, s] = dust[:, None]
        block[:, s, :s] = dust[:, None]
        block[:, s, s] = 0.0
    return cost


def truncated_problem(
    support: Support,
    embeddings: torch.Tensor,
    *,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
    block_positions: int | None = None,
) -> TruncatedProblem:
    """Compact ``support`` and assemble masses and costs (see :func:`support_masses`, :func:`support_cost`)."""
    support = compact(support)
    a, b = support_masses(support)
    cost = support_cost(
        embeddings, support.tokens, metric=metric, radius=radius, dust_cost=dust_cost, block_positions=block_positions
    )
    return TruncatedProblem(a=a, b=b, cost=cost, tokens=support.tokens, distinct=support.distinct)


def build_problem(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    top_k: int = 128,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
) -> TruncatedProblem:
    """The truncated OT problem :class:`WassersteinRegularizer` solves at each of ``n`` positions.

    Masses are float32, or float64 for float64 logits; costs float64 only for float64 embeddings.

    Args:
        policy_logits: (n, V) policy logits (or log-probabilities), any float dtype.
        ref_logits: (n, V) reference logits.
        actions: (n,) sampled token ids.
        embeddings: (V, d) token embeddings.
        top_k, metric, radius, dust_cost: as in :class:`WassersteinRegularizer` (``radius`` from
            :func:`otalign.ot.knn_radius`).
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    policy = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    ref = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    support = select_support(policy, ref, actions.long(), top_k)
    return truncated_problem(support, embeddings, metric=metric, radius=radius, dust_cost=dust_cost)
