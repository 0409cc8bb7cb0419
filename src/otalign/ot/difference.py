r"""Entropic transport of the difference of two distributions: one's excess onto its deficit.

For masses :math:`a, b` of equal total on one set of atoms with costs :math:`C`, let
:math:`\delta^+ = (a - b)_+` and :math:`\delta^- = (b - a)_+` (equal masses :math:`m`, the total variation) and
:math:`\alpha = \delta^+/m`, :math:`\beta = \delta^-/m` their normalisations. The *difference transport* is

.. math::
    W(a, b) = m \cdot \min_{P1=\alpha,\ P^\top 1=\beta}
        \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, \alpha\beta^\top).

For a metric cost (zero on the diagonal, triangle inequality) the unregularised problem between :math:`a` and
:math:`b` leaves the shared mass in place, so :math:`W` tends to :math:`W_1(a, b)` as eps -> 0; it is 0 exactly
when :math:`a = b`. Unlike the entropic problem between the whole distributions, whose near-diagonal plan at
eps << cost makes Sinkhorn converge only after tens of thousands of iterations, the excess and deficit have
disjoint supports, and Sinkhorn converges in hundreds.

**Gradient.** With potentials :math:`(u, v)` in the product-reference form
:math:`P = \alpha_i\beta_j e^{(u_i + v_j - C_{ij})/\varepsilon}` (:attr:`~otalign.ot.SinkhornResult.u`),
:math:`W = m(\langle\alpha, u\rangle + \langle\beta, v\rangle)`, and its gradient along the simplex is
:math:`\phi_i = u_i` where :math:`a_i > b_i` and :math:`-v_i` where :math:`a_i < b_i` (the derivative of ``W``
along :math:`e_i - e_k` is :math:`\phi_i - \phi_k`); on an atom with :math:`a_i = b_i > 0` (a kink) the midpoint
:math:`(u_i - v_i)/2` of the soft c-transforms (:func:`~otalign.ot.c_transform`) of the block's potentials.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sinkhorn import sinkhorn
from .transforms import c_transform


@dataclass(frozen=True)
class DifferenceResult:
    """Solution of a batch of difference transports.

    Attributes:
        phi: (B, n) gradient of ``value`` along the simplex in ``a``, unshifted (defined up to one constant per
            problem), cost units per unit mass; 0 on atoms with ``a == b == 0`` and at problems with ``a == b``.
        value: (B,) :math:`W(a, b)`, cost units; 0 where ``a == b``.
        n_iter: Sinkhorn iterations at the target eps (the largest over the batch; 0 when nothing moves).
        marginal_error: (B,) L1 row-marginal error of the block's plan, in ``a``'s mass units.
        converged: (B,) bool, False where the problem stopped at ``max_iter`` (and Newton) above ``tol``; True
            at problems with nothing to move.
    """

    phi: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    converged: torch.Tensor


def difference_transport(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    overrelaxation: float = 1.0,
    newton_steps: int = 0,
) -> DifferenceResult:
    r"""The difference transport (module docstring) of each problem of a batch, one batched Sinkhorn call.

    Sinkhorn runs on the (excess x deficit) block only, about a quarter of the ``n^2`` entries: every atom with
    mass in ``a`` is on one side of it, except exact ties, which get the c-transforms of the block's potentials.

    Args:
        a: (B, n) masses, each row summing to the same total as ``b``'s (e.g. 1).
        b: (B, n) masses on the same atoms.
        cost: (B, n, n) finite costs.
        eps: the entropic regularisation, cost units, > 0.
        max_iter, overrelaxation, newton_steps: as in :func:`otalign.ot.sinkhorn`.
        tol: stopping tolerance on the L1 marginal error in ``a``'s mass units (the normalised block's
            tolerance is ``tol / m``).

    Returns:
        :class:`DifferenceResult`.
    """
    excess, deficit = (a - b).clamp_min(0.0), (b - a).clamp_min(0.0)
    excess_mass, deficit_mass = excess.sum(1, keepdim=True), deficit.sum(1, keepdim=True)
    moved = 0.5 * (excess_mass + deficit_mass)[:, 0]
    live = (excess_mass[:, 0] > 0) & (deficit_mass[:, 0] > 0)
    if not bool(live.any()):
        return DifferenceResult(
            torch.zeros_like(a), torch.zeros_like(moved), 0, torch.zeros_like(moved), live.logical_not()
        )
    # Each side normalised by its own sum, so that both are exactly balanced for the solver.
    alpha, beta = excess[live] / excess_mass[live], deficit[live] / deficit_mass[live]
    m, cost = moved[live], cost[live]
    index_a, index_b = _heaviest(alpha), _heaviest(beta)
    rows = cost.gather(1, index_a.unsqueeze(-1).expand(-1, -1, cost.shape[2]))  # (n, k_a, s + 1)
    block = rows.gather(2, index_b.unsqueeze(1).expand(-1, index_a.shape[1], -1))  # (n, k_a, k_b)
    alpha_r, beta_r = alpha.gather(1, index_a), beta.gather(1, index_b)
    solved = sinkhorn(
        alpha_r,
        beta_r,
        block,
        eps,
        max_iter=max_iter,
        tol=tol / m,
        overrelaxation=overrelaxation,
        newton_steps=newton_steps,
    )
    u = alpha.new_zeros(alpha.shape, dtype=solved.u.dtype).scatter_(1, index_a, solved.u)
    v = beta.new_zeros(beta.shape, dtype=solved.v.dtype).scatter_(1, index_b, solved.v)
    phi = torch.zeros(a.shape, dtype=u.dtype, device=u.device)
    value, error = torch.zeros_like(phi[:, 0]), torch.zeros_like(phi[:, 0])
    phi_live = torch.where(alpha > 0, u, torch.where(beta > 0, -v, 0.0))
    tie = (a[live] > 0) & (alpha == 0) & (beta == 0)
    if bool(tie.any()):
        at = tie.any(1).nonzero()[:, 0]
        u_tie = c_transform(
            solved.v[at],
            beta_r[at].log(),
            cost[at].gather(2, index_b[at].unsqueeze(1).expand(-1, cost.shape[1], -1)),
            eps,
            2,
        )
        v_tie = c_transform(solved.u[at], alpha_r[at].log(), rows[at], eps, 1)
        phi_live[at] = torch.where(tie[at], 0.5 * (u_tie - v_tie), phi_live[at])
    phi[live] = phi_live
    value[live] = m * ((alpha_r * solved.u).sum(1) + (beta_r * solved.v).sum(1))
    error[live] = m * solved.marginal_error
    converged = torch.ones_like(live)
    converged[live] = solved.converged
    return DifferenceResult(phi, value, solved.n_iter, error, converged)


def _heaviest(mass: torch.Tensor) -> torch.Tensor:
    """(n, k) indices of each row's ``k`` largest entries, ``k`` the largest count of positive ones in a row (so
    they hold every positive one; the rest pad with zero-mass atoms)."""
    return mass.topk(max(int((mass > 0).sum(1).max()), 1), dim=1).indices
