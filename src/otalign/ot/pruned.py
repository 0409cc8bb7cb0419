r"""Balanced entropic OT on a pruned support, with the dropped atoms' potentials recovered by c-transform.

Many atoms of a WPR difference problem (excess :math:`\alpha` onto deficit :math:`\beta`) carry a negligible
share of the moved mass. :func:`pruned_sinkhorn` drops, per problem, every atom whose share of its side's
mass is at most ``prune_below``, solves the reduced balanced problem (both sides renormalised to the kept
mass) with :func:`otalign.ot.sinkhorn`, and extends the potentials to the dropped atoms exactly as the
entropic dual does off its support — one soft c-transform of the other side's potential:

.. math::
    u_i = -\varepsilon \log \sum_{j \in \mathrm{kept}} \beta_j \exp\big((v_j - C_{ij})/\varepsilon\big),
    \qquad
    v_j = -\varepsilon \log \sum_{i \in \mathrm{kept}} \alpha_i \exp\big((u_i - C_{ij})/\varepsilon\big)

(product-reference form :math:`P = \alpha_i\beta_j e^{(u_i + v_j - C_{ij})/\varepsilon}`, the convention of
:mod:`otalign.ot`). The extension runs over the *full* other side: ``v`` first from the kept ``u``, then
``polish`` pairs of full half-steps (``u`` from all of ``v`` with the true masses, then ``v`` from all of
``u``), so that a dropped atom's own tiny mass, which can matter to a nearby atom's potential when the two
are close (``exp(-C/eps)`` large), is not lost.

Error: the result reports the L1 marginal error of the returned potentials *on the full problem* (of the
side not updated last; the other side's is exact), the same a-posteriori quantity :func:`otalign.ot.sinkhorn`
stops on: if it is within the caller's tolerance, pruning cost nothing measurable. A priori, with
:math:`\delta` the dropped share of a side's mass (``dropped_mass``, at most ``n * prune_below``), the
reduced problem's marginals are :math:`\delta`-close in total variation to the full ones; the
tests (``tests/test_ot_pruned.py``) check the potentials against the unpruned solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sinkhorn import sinkhorn


@dataclass
class PrunedResult:
    """Solution of a pruned batch, on the full support.

    Attributes:
        u: (B, n) ``a``-side potential (product-reference form), solved on kept atoms, c-transform elsewhere.
        v: (B, m) ``b``-side potential, likewise.
        value: (B,) dual value ``<a, u> + <b, v>`` of the full (normalised) problem at the returned potentials.
        kept_a: (B, n) bool, atoms of ``a`` in the solved problem; ``kept_b`` (B, m) likewise.
        dropped_mass: (B,) the larger of the two sides' dropped mass shares.
        n_iter: Sinkhorn iterations of the reduced solve.
        marginal_error: (B,) L1 marginal error of the returned potentials' plan on the *full* problem (both sides
            normalised), on the side updated first: ``||P1 - a||_1`` when ``polish > 0`` (the columns are exact),
            ``||P^T 1 - b||_1`` when ``polish == 0`` (the rows are): the a-posteriori check that pruning cost no
            accuracy.
        converged: (B,) bool, the reduced solve met its tolerance.
        reduced_size: (k_a, k_b) atoms per side of the reduced (padded) problem.
    """

    u: torch.Tensor
    v: torch.Tensor
    value: torch.Tensor
    kept_a: torch.Tensor
    kept_b: torch.Tensor
    dropped_mass: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    converged: torch.Tensor
    reduced_size: tuple[int, int]


def _keep(mass: torch.Tensor, prune_below: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept mask (B, n), indices of the kept atoms padded to the largest count (B, k), and the dropped share (B,)."""
    share = mass / mass.sum(-1, keepdim=True)
    kept = share > prune_below
    width = max(int(kept.sum(-1).max()), 1)
    # The `width` largest atoms of each problem hold all its kept atoms (kept ones are the largest).
    index = share.topk(width, dim=-1).indices
    return kept, index, torch.where(kept, 0.0, share).sum(-1)


def _soft_c_transform(potential, mass, cost, eps, dim):
    """``-eps log sum_k mass_k exp((potential_k - C)/eps)`` over axis ``dim`` of ``cost`` (1 or 2)."""
    weights = (mass.log() + potential / eps).unsqueeze(-1 if dim == 1 else -2)
    return -eps * torch.logsumexp(weights - cost / eps, dim=dim)


def _c_transforms(a, b, cost, eps):
    """``(u_from, v_from)``: the soft c-transforms ``u = ct(v)`` (sum over the columns with ``b > 0``) and
    ``v = ct(u)`` (over the rows with ``a > 0``) of the full problem ``(a, b, cost)``, (B, n), (B, m), (B, n, m),
    each computed on those rows or columns of ``cost`` only."""
    _, rows_held, _ = _keep(a, 0.0)
    _, cols_held, _ = _keep(b, 0.0)
    n, m = cost.shape[1], cost.shape[2]
    from_rows = cost.gather(1, rows_held.unsqueeze(-1).expand(-1, -1, m))  # (B, p, m)
    from_cols = cost.gather(2, cols_held.unsqueeze(1).expand(-1, n, -1))  # (B, n, q)
    a_held, b_held = a.gather(1, rows_held), b.gather(1, cols_held)

    def u_from(v):
        return _soft_c_transform(v.gather(1, cols_held), b_held, from_cols, eps, dim=2)

    def v_from(u):
        return _soft_c_transform(u.gather(1, rows_held), a_held, from_rows, eps, dim=1)

    return u_from, v_from


def _marginal_error(potential, mass, transform, eps):
    """L1 marginal error ``sum_i mass_i |exp((potential_i - transform_i)/eps) - 1|`` of one side, from its potential
    and the soft c-transform of the other side's (0 on zero-mass atoms, whose terms would be ``0 * inf``)."""
    terms = mass * torch.expm1((potential - transform) / eps).abs()
    return torch.where(mass > 0, terms, 0.0).sum(-1)


def pruned_sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    *,
    prune_below: float = 1e-6,
    polish: int = 2,
    **kwargs,
) -> PrunedResult:
    """Solve balanced problems on the atoms holding more than ``prune_below`` of their side's mass.

    Args:
        a: (B, n) nonnegative masses (e.g. the normalised excess of the WPR difference form).
        b: (B, m) nonnegative masses with the same total per problem.
        cost: (B, n, m) finite costs.
        eps: entropic regularization.
        prune_below: an atom whose share of its side's mass is at most this is left out of the iterations
            (0 keeps every atom with mass; exactly the unpruned solve, up to the zero-mass atoms' handling).
        polish: full-problem Sinkhorn half-step pairs after the extension (log domain, O(n m) each).
        **kwargs: passed to :func:`otalign.ot.sinkhorn` (``max_iter``, ``tol``, ``scaling``, ...).

    Returns:
        :class:`PrunedResult` with potentials on all ``n`` and ``m`` atoms.
    """
    if not 0 <= prune_below < 1:
        raise ValueError(f"prune_below must be in [0, 1), got {prune_below}")
    kept_a, index_a, dropped_a = _keep(a, prune_below)
    kept_b, index_b, dropped_b = _keep(b, prune_below)
    # Reduced problem: kept atoms, both sides renormalised to mass 1 (padding slots get mass 0).
    a_r = torch.where(kept_a, a, 0.0).gather(1, index_a)
    b_r = torch.where(kept_b, b, 0.0).gather(1, index_b)
    a_r, b_r = a_r / a_r.sum(-1, keepdim=True), b_r / b_r.sum(-1, keepdim=True)
    rows = cost.gather(1, index_a.unsqueeze(-1).expand(-1, -1, cost.shape[2]))  # (B, k_a, m)
    cost_r = rows.gather(2, index_b.unsqueeze(1).expand(-1, index_a.shape[1], -1))  # (B, k_a, k_b)
    solved = sinkhorn(a_r, b_r, cost_r, eps, **kwargs)
    # Extend to every atom: v from u on the kept a atoms, then `polish` full half-steps (u from all of v, v from
    # all of u, with the true masses): the dropped atoms of one side weigh in on the other side's potentials.
    # A c-transform sums over the other side's atoms with mass only (the rest add exp(-inf) = 0), so each runs on
    # those rows or columns of the cost: about half of it when one side's mass sits on half the atoms.
    v = _soft_c_transform(solved.u, a_r, rows, eps, dim=1)
    a_n, b_n = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    u_from, v_from = _c_transforms(a_n, b_n, cost, eps)
    for _ in range(polish):
        u = u_from(v)
        v = v_from(u)
    if polish == 0:
        u = u_from(v)
    # Error of the extended solution on the full problem, on the side that was not updated last (the other's
    # marginal is exact): P 1 = a * exp((u - ct(v)) / eps), P^T 1 = b * exp((v - ct(u)) / eps).
    full_error = _marginal_error(v, b_n, v_from(u), eps) if polish == 0 else _marginal_error(u, a_n, u_from(v), eps)
    value = (a_n * torch.where(a_n > 0, u, 0.0)).sum(-1) + (b_n * torch.where(b_n > 0, v, 0.0)).sum(-1)
    return PrunedResult(
        u=u,
        v=v,
        value=value,
        kept_a=kept_a,
        kept_b=kept_b,
        dropped_mass=torch.maximum(dropped_a, dropped_b),
        n_iter=solved.n_iter,
        marginal_error=full_error,
        converged=solved.converged,
        reduced_size=(index_a.shape[1], index_b.shape[1]),
    )
