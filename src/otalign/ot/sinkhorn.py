r"""Balanced entropic optimal transport, batched, in the log domain.

For each problem of a batch, with masses ``a`` (n,), ``b`` (m,) of equal total ``m_tot`` and
a cost matrix ``C`` (n, m), :func:`sinkhorn` solves

.. math::
    \mathrm{OT}_\varepsilon(a, b) = \min_{P \ge 0,\ P1 = a,\ P^\top 1 = b}
        \langle P, C\rangle + \varepsilon \sum_{ij} P_{ij}(\log P_{ij} - 1),

the convention of Cuturi (2013) and the WPR paper (Eq. 2 with eps = 1/lambda). Its dual is

.. math::
    \max_{f, g}\ \langle a, f\rangle + \langle b, g\rangle
        - \varepsilon \sum_{ij} \exp\big((f_i + g_j - C_{ij})/\varepsilon\big),

with optimal plan :math:`P_{ij} = \exp((f_i + g_j - C_{ij})/\varepsilon)` and
:math:`\partial\,\mathrm{OT}_\varepsilon / \partial a = f` (the envelope theorem), so on the
simplex ``f`` is the gradient of the value up to an additive constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_equal_mass, check_positive_scalar, prepare_problem


@dataclass
class SinkhornResult:
    """Solution of a batch of balanced entropic OT problems.

    Attributes:
        f: (B, n) dual potential of the ``a`` side, in cost units. ``-inf`` where ``a`` is 0.
        g: (B, m) dual potential of the ``b`` side, in cost units. ``-inf`` where ``b`` is 0.
        value: (B,) entropic OT value ``<P, C> + eps * sum P (log P - 1)``, evaluated as the
            dual objective ``<a, f> + <b, g> - eps * sum(b)`` (exact at convergence).
        n_iter: Sinkhorn iterations run at the target ``eps`` (eps-scaling steps excluded).
        marginal_error: (B,) L1 error ``||P 1 - a||_1`` of the returned plan (its column
            marginals are exact).
        plan: (B, n, m) optimal plan when ``return_plan=True``, else ``None``.
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    plan: torch.Tensor | None = None


def c_transform(
    potential: torch.Tensor, log_mass: torch.Tensor, neg_cost_over_eps: torch.Tensor, eps: float, dim: int
) -> torch.Tensor:
    r"""Soft c-transform in the reference-measure parametrisation.

    Returns :math:`-\varepsilon \log \sum_k \exp(\log w_k + h_k/\varepsilon - C_{k\cdot}/\varepsilon)`
    where the sum runs over axis ``dim`` of ``neg_cost_over_eps`` (B, n, m) and ``potential``
    ``h`` and ``log_mass`` ``log w`` are indexed along that axis. Empty or fully forbidden
    rows give ``+inf``.
    """
    weights = (log_mass + potential / eps).unsqueeze(-1 if dim == 1 else -2)
    return -eps * torch.logsumexp(neg_cost_over_eps + weights, dim=dim)


def _finite_scale(cost: torch.Tensor) -> float:
    finite = cost[torch.isfinite(cost)]
    if finite.numel() == 0:
        return 1.0
    return max(float(finite.max() - finite.min()), 1e-12)


def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    scaling: float = 0.5,
    check_every: int = 5,
    return_plan: bool = False,
    mass_rtol: float = 1e-4,
) -> SinkhornResult:
    r"""Solve a batch of balanced entropic OT problems with log-domain Sinkhorn.

    See the module docstring for the objective and the potentials' convention.

    Args:
        a: (B, n) or (n,) nonnegative masses; zero-mass atoms allowed.
        b: (B, m) or (m,) nonnegative masses with the same total as ``a`` per problem.
        cost: (B, n, m) or (n, m) costs; ``+inf`` marks a forbidden pair.
        eps: entropic regularization (> 0) in cost units (``1 / lambda`` in the WPR paper).
        max_iter: iterations allowed at the target ``eps``.
        tol: stop once every problem's L1 marginal error ``||P1 - a||_1`` is <= ``tol``
            (absolute, in mass units).
        scaling: eps-scaling factor in (0, 1): the solver starts at the cost range and
            multiplies eps by ``scaling`` each iteration until it reaches ``eps``. ``0``
            disables eps-scaling.
        check_every: test convergence every this many iterations (a device sync on GPU).
        return_plan: also return the (B, n, m) plan.
        mass_rtol: relative tolerance on ``sum(a) == sum(b)``.

    Returns:
        :class:`SinkhornResult`, in float32 for half/float32 inputs, float64 for float64.
        A single problem (1-D masses) gives results without the batch axis.

    Raises:
        ValueError: bad shapes, negative/non-finite masses, unequal masses, NaN costs,
            non-positive eps.
    """
    eps = check_positive_scalar("eps", eps)
    if not 0 <= scaling < 1:
        raise ValueError(f"scaling must be in [0, 1), got {scaling}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    a, b, cost, unbatched = prepare_problem(a, b, cost)
    check_equal_mass(a, b, mass_rtol)

    log_a, log_b = a.log(), b.log()
    # Potentials in the reference parametrisation P = a_i b_j exp((u_i + v_j - C_ij)/eps):
    # unlike f = u + eps log a they stay finite on zero-mass atoms.
    u = torch.zeros_like(a)
    v = torch.zeros_like(b)

    if scaling > 0:
        eps_k = _finite_scale(cost)
        while eps_k > eps:
            neg_cost = -cost / eps_k
            v = c_transform(u, log_a, neg_cost, eps_k, dim=1)
            u = c_transform(v, log_b, neg_cost, eps_k, dim=2)
            eps_k *= scaling

    neg_cost = -cost / eps
    v = c_transform(u, log_a, neg_cost, eps, dim=1)
    n_iter = 0
    while True:
        u_new = c_transform(v, log_b, neg_cost, eps, dim=2)
        n_iter += 1
        if n_iter % check_every == 0 or n_iter >= max_iter:
            # The plan at (u, v) has exact columns (v is the c-transform of u) and rows
            # a_i exp((u_i - u_new_i) / eps).
            err = _row_marginal_error(a, log_a, u, u_new, eps)
            if n_iter >= max_iter or bool((err <= tol).all()):
                break
        u = u_new
        v = c_transform(u, log_a, neg_cost, eps, dim=1)

    f = u + eps * log_a
    g = v + eps * log_b
    value = _dual_value(a, b, u, v, eps)
    plan = None
    if return_plan:
        plan = torch.exp(log_a.unsqueeze(-1) + log_b.unsqueeze(-2) + (u.unsqueeze(-1) + v.unsqueeze(-2)) / eps + neg_cost)
    result = SinkhornResult(f=f, g=g, value=value, n_iter=n_iter, marginal_error=err, plan=plan)
    return _squeeze(result) if unbatched else result


def _row_marginal_error(
    a: torch.Tensor, log_a: torch.Tensor, u: torch.Tensor, u_new: torch.Tensor, eps: float
) -> torch.Tensor:
    log_row = log_a + (u - u_new) / eps
    return (torch.exp(log_row) - a).abs().nan_to_num(nan=math.inf).sum(-1)


def _dual_value(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``<a, f> + <b, g> - eps * sum(b)`` with f = u + eps log a, written to be 0*inf safe."""
    entropy_terms = torch.special.xlogy(a, a).sum(-1) + torch.special.xlogy(b, b).sum(-1)
    finite_u = torch.where(a > 0, u, torch.zeros_like(u))
    finite_v = torch.where(b > 0, v, torch.zeros_like(v))
    return (a * finite_u).sum(-1) + (b * finite_v).sum(-1) + eps * (entropy_terms - b.sum(-1))


def _squeeze(result: SinkhornResult) -> SinkhornResult:
    return SinkhornResult(
        f=result.f[0],
        g=result.g[0],
        value=result.value[0],
        n_iter=result.n_iter,
        marginal_error=result.marginal_error[0],
        plan=None if result.plan is None else result.plan[0],
    )
