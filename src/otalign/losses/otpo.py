r"""OTPO token weights (Li et al. 2025): unbalanced OT between the tokens of the chosen and rejected response.

For each pair, with the policy's last-layer hidden states :math:`h^c_i` (chosen tokens,
i = 1..n) and :math:`h^r_j` (rejected tokens, j = 1..m), taken detached at the positions that
predict each token:

.. math::
    M_{ij} = \|h^c_i - h^r_j\|_2 / \max_{kl}\|h^c_k - h^r_l\|_2, \qquad
    \Gamma = \arg\min_{G \ge 0} \langle G, M\rangle + \varepsilon_1 \mathrm{KL}(G\|ab^\top)
        + \varepsilon_2\big(\mathrm{KL}(G1\|a) + \mathrm{KL}(G^\top 1\|b)\big)

with a = 1_n, b = 1_m (mass 1 per token; POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, M,
reg=eps1, reg_m=eps2)``), and the weights

.. math::
    w^c = \Gamma 1 \cdot \tau / \textstyle\sum\Gamma, \qquad w^r = \Gamma^\top 1 \cdot \tau / \sum\Gamma,
    \qquad \tau = \min(n, m),

so each side's weights sum to tau. They multiply the per-token log-ratios of both policy and
reference (:func:`otalign.losses.sequence_logps`), in any pairwise loss.
"""

from __future__ import annotations

import math

import torch

from otalign.ot import euclidean, unbalanced_sinkhorn

from ._validation import check_positive


def _check_side(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"{name}_hidden must be (B, L, H) and {name}_mask (B, L); got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}_mask must be a bool tensor, got {mask.dtype}")
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} responses of pairs {empty} have no valid token")


BUCKET_OVERHEAD_FLOPS = 1e8
"""Fixed cost of one batched solve in the bucketing model of :func:`length_buckets`, in the model's flops
(``2 H + 256`` per padded cost entry): the per-call overhead of the cost matmul and the Sinkhorn loop (a
few hundred small tensor operations) plus the efficiency a larger batched matmul gains. Chosen by a sweep
on a CPU (``benchmarks/otpo.py``): 2e7 to 3e8 measured alike, 1e9 and above pad too much."""


def length_buckets(long: torch.Tensor, short: torch.Tensor, hidden: int, overhead: float = BUCKET_OVERHEAD_FLOPS):
    """Group pairs into buckets solved one batched call each, minimising padded work plus per-call overhead.

    Pair ``k`` is an ``long[k] x short[k]`` problem. Pairs are sorted by ``long`` (then ``short``), decreasing,
    and split into contiguous runs by dynamic programming over the model
    ``cost(run) = overhead + len(run) * max(long) * max(short) * (2 * hidden + 256)``; a run pads its pairs to
    its largest lengths.

    Args:
        long, short: (B,) int lengths, ``long >= short``.
        hidden: hidden size H (sets the work per padded entry).
        overhead: per-call cost in the model's units (flops).

    Returns:
        A list of (count,) int64 tensors of pair indices, one per bucket, covering every pair once.
    """
    order = sorted(range(len(long)), key=lambda k: (-int(long[k]), -int(short[k])))
    n = [int(long[k]) for k in order]
    m = [int(short[k]) for k in order]
    per_entry = 2.0 * hidden + 256.0
    best, cut = [0.0], [0]
    for stop in range(1, len(order) + 1):
        widest, choice, value = 0, 0, math.inf
        for start in range(stop - 1, -1, -1):  # run order[start:stop]; its largest long length is n[start]
            widest = max(widest, m[start])
            candidate = best[start] + overhead + (stop - start) * n[start] * widest * per_entry
            if candidate < value:
                choice, value = start, candidate
        best.append(value)
        cut.append(choice)
    buckets, stop = [], len(order)
    while stop > 0:
        start = cut[stop]
        buckets.append(torch.tensor(order[start:stop], dtype=torch.int64))
        stop = start
    return buckets[::-1]


@torch.no_grad()
def otpo_weights(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    eps1: float = 1.0,
    eps2: float = 0.2,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OTPO token weights of a batch of pairs (equations in the module docstring).

    Pairs are bucketed by length (:func:`length_buckets`) and each bucket's problems are solved in one
    batched :func:`~otalign.ot.unbalanced_sinkhorn` call, padded to the bucket's longest lengths: padded
    tokens carry zero mass, so they neither receive weight nor change any other token's weight. Each
    problem is posed with its longer response first (the objective is symmetric in the two sides, the
    plan of the swapped problem is the transpose), which keeps a bucket's padding small. The valid
    tokens of a row need not be contiguous.

    Args:
        chosen_hidden: (B, Lc, H) hidden states of the chosen responses' tokens (any float dtype;
            position t is the state that predicts token t). Used detached.
        rejected_hidden: (B, Lr, H) the same for the rejected responses.
        chosen_mask: (B, Lc) bool, True on real tokens; at least one per pair.
        rejected_mask: (B, Lr) bool, same for the rejected responses.
        eps1: entropic regularization of the plan (> 0), in units of the normalized cost.
        eps2: marginal relaxation (> 0); smaller lets more mass be created or destroyed.
        max_iter: Sinkhorn iteration cap.
        tol: a pair's solve stops when its potentials change by at most this (normalized-cost units).

    Returns:
        ``(chosen_weights, rejected_weights)``: (B, Lc) and (B, Lr), no gradient, zero on padded
        positions, each row summing to min(|y_c|, |y_r|); float32 (float64 for float64 input).
    """
    _check_side("chosen", chosen_hidden, chosen_mask)
    _check_side("rejected", rejected_hidden, rejected_mask)
    if chosen_hidden.shape[0] != rejected_hidden.shape[0] or chosen_hidden.shape[2] != rejected_hidden.shape[2]:
        raise ValueError(
            f"chosen_hidden {tuple(chosen_hidden.shape)} and rejected_hidden {tuple(rejected_hidden.shape)} "
            "need the same batch and hidden sizes"
        )
    eps1, eps2 = check_positive("eps1", eps1), check_positive("eps2", eps2)

    dtype = torch.promote_types(torch.promote_types(chosen_hidden.dtype, rejected_hidden.dtype), torch.float32)
    masks = (chosen_mask, rejected_mask)
    sides = [_Side(hidden.detach(), mask) for hidden, mask in zip((chosen_hidden, rejected_hidden), masks, strict=True)]
    weights = [torch.zeros(mask.shape, dtype=dtype, device=mask.device) for mask in masks]
    pairs_count = chosen_mask.shape[0]
    lengths = [side.lengths for side in sides]
    flipped = [lengths[1][k] > lengths[0][k] for k in range(pairs_count)]  # rejected is the longer side
    long_len = [max(c, r) for c, r in zip(*lengths, strict=True)]
    short_len = [min(c, r) for c, r in zip(*lengths, strict=True)]
    long, short = torch.tensor(long_len), torch.tensor(short_len)
    # Per pair, the joint mean of its valid states: distances are computed on centred copies (float32
    # accuracy of the expansion ||x||^2 + ||y||^2 - 2<x, y> needs it when states share a large offset).
    centres = [
        (sides[0].rows(k).sum(0, dtype=dtype) + sides[1].rows(k).sum(0, dtype=dtype)) / (lengths[0][k] + lengths[1][k])
        for k in range(pairs_count)
    ]

    for bucket in length_buckets(long, short, chosen_hidden.shape[-1]):
        pairs = bucket.tolist()
        width = (int(long[bucket].max()), int(short[bucket].max()))
        states, masses = [], []
        for role in (0, 1):  # 0: the longer side of each pair, 1: the shorter
            x = torch.empty(len(pairs), width[role], chosen_hidden.shape[-1], dtype=dtype, device=weights[0].device)
            mass = torch.zeros(len(pairs), width[role], dtype=dtype, device=x.device)
            for row, k in enumerate(pairs):
                side = role ^ flipped[k]
                count = lengths[side][k]
                torch.sub(sides[side].rows(k), centres[k], out=x[row, :count])
                x[row, count:] = 0.0
                mass[row, :count] = 1.0
            states.append(x)
            masses.append(mass)
        cost = euclidean(states[0], states[1], centred=True)
        del states
        for row, k in enumerate(pairs):  # zero the padding's costs (slices: no (count, n, m) mask)
            cost[row, long_len[k] :] = 0.0
            cost[row, :, short_len[k] :] = 0.0
        peak = cost.amax(dim=(-2, -1), keepdim=True)
        cost = cost.div_(torch.where(peak > 0, peak, 1.0))  # identical states on both sides: all-zero cost
        solved = unbalanced_sinkhorn(
            masses[0], masses[1], cost, eps=eps1, rho=eps2, max_iter=max_iter, tol=tol, check_every=1, return_plan=False
        )
        marginals = (solved.row_marginal, solved.col_marginal)
        tau = torch.minimum(masses[0].sum(-1), masses[1].sum(-1))
        scale = (tau / marginals[0].sum(-1)).unsqueeze(-1)
        for role in (0, 1):
            scaled = marginals[role] * scale
            for row, k in enumerate(pairs):
                side = role ^ flipped[k]
                sides[side].scatter(weights[side], k, scaled[row, : lengths[side][k]])
    return weights[0], weights[1]


class _Side:
    """One side's states and mask: each row's valid states as a view when they are a prefix of the row."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor):
        self.hidden, self.mask = hidden, mask
        self.lengths = mask.sum(-1).tolist()
        self.prefix = (mask.cumprod(-1).sum(-1) == mask.sum(-1)).tolist()

    def rows(self, k: int) -> torch.Tensor:
        """(n_k, H) the valid states of row ``k``."""
        return self.hidden[k, : self.lengths[k]] if self.prefix[k] else self.hidden[k, self.mask[k]]

    def scatter(self, out: torch.Tensor, k: int, values: torch.Tensor) -> None:
        """Write ``values`` (n_k,) to the valid positions of row ``k`` of ``out``."""
        if self.prefix[k]:
            out[k, : self.lengths[k]] = values
        else:
            out[k, self.mask[k]] = values
