r"""Unbalanced entropic optimal transport, batched, in the log domain.

For each problem, with nonnegative masses ``a`` (n,), ``b`` (m,) (any totals) and costs ``C``,
:func:`unbalanced_sinkhorn` solves

.. math::
    \min_{P \ge 0}\ \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, a b^\top)
        + \rho_a\,\mathrm{KL}(P1 \,\|\, a) + \rho_b\,\mathrm{KL}(P^\top 1 \,\|\, b),

with the generalized KL :math:`\mathrm{KL}(x\|y) = \sum x\log(x/y) - x + y`. This is POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=(rho_a, rho_b))`` (``reg_type="kl"``).
The optimal plan is :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)` and the
Sinkhorn updates are the damped soft c-transforms
:math:`f = \tfrac{\rho_a}{\rho_a + \varepsilon}\,\big(-\varepsilon\log\sum_j b_j e^{(g_j - C_{ij})/\varepsilon}\big)`
(and symmetrically for ``g``). ``rho = inf`` makes that side's marginal a hard constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._scaling import anneal, scaling_iterations
from ._validation import check_positive_scalar, prepare_problem


@dataclass
class UnbalancedResult:
    """Solution of a batch of unbalanced entropic OT problems.

    Attributes:
        plan: (B, n, m) optimal plan.
        f: (B, n) potential of the ``a`` side, in cost units, in the parametrisation
            ``P = a_i b_j exp((f_i + g_j - C_ij)/eps)`` (finite on zero-mass atoms).
        g: (B, m) potential of the ``b`` side, same parametrisation.
        value: (B,) the primal objective of the module docstring at ``plan``.
        n_iter: iterations run.
        potential_change: (B,) sup-norm change of (f, g) in the last iteration, cost units.
    """

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: int
    potential_change: torch.Tensor


def _marginal_weights(rho: float | tuple[float, float]) -> tuple[float, float]:
    pair = rho if isinstance(rho, (tuple, list)) else (rho, rho)
    if len(pair) != 2:
        raise ValueError(f"rho must be a number or a pair (rho_a, rho_b), got {rho!r}")
    checked = []
    for name, value in zip(("rho_a", "rho_b"), pair, strict=True):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number > 0 (inf for a hard marginal), got {value!r}") from None
        if math.isnan(value) or value <= 0:
            raise ValueError(f"{name} must be > 0 (inf for a hard marginal), got {value}")
        checked.append(value)
    return checked[0], checked[1]


def _damping(rho: float, eps: float) -> float:
    return 1.0 if math.isinf(rho) else rho / (rho + eps)


def generalized_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum x log(x/y) - x + y`` over the last axis, with 0 log 0 = 0."""
    return (torch.special.xlogy(x, x) - torch.special.xlogy(x, y) - x + y).sum(-1)


def unbalanced_sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    rho: float | tuple[float, float],
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    scaling: float = 0.5,
    check_every: int = 5,
) -> UnbalancedResult:
    """Solve a batch of unbalanced entropic OT problems (see the module docstring).

    Args:
        a: (B, n) or (n,) nonnegative masses; zero-mass padding allowed.
        b: (B, m) or (m,) nonnegative masses.
        cost: (B, n, m) or (n, m) costs; ``+inf`` marks a forbidden pair.
        eps: entropic regularization (> 0), cost units.
        rho: marginal relaxation, one number for both sides or a pair ``(rho_a, rho_b)``;
            ``inf`` enforces that marginal exactly.
        max_iter: maximum number of (f, g) updates.
        tol: stop once the sup-norm change of both potentials is <= ``tol`` (cost units)
            for every problem.
        scaling: eps-scaling warm start factor in [0, 1) (see :func:`otalign.ot.sinkhorn`).
        check_every: test convergence every this many iterations.

    Returns:
        :class:`UnbalancedResult` in float32 (float64 for float64 inputs); no batch axis
        for 1-D inputs.
    """
    eps = check_positive_scalar("eps", eps)
    rho_a, rho_b = _marginal_weights(rho)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    a, b, cost, unbatched = prepare_problem(a, b, cost)

    f, g = anneal(a, b, cost, eps, scaling, lambda eps_k: (_damping(rho_a, eps_k), _damping(rho_b, eps_k)))
    f, g, plan, n_iter, change = scaling_iterations(
        a,
        b,
        cost,
        eps,
        f,
        g,
        damp_a=_damping(rho_a, eps),
        damp_b=_damping(rho_b, eps),
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        balanced=False,
        return_plan=True,
    )
    value = _primal_value(plan, a, b, f, g, eps, rho_a, rho_b)
    result = UnbalancedResult(plan=plan, f=f, g=g, value=value, n_iter=n_iter, potential_change=change)
    if unbatched:
        result = UnbalancedResult(
            plan=plan[0], f=f[0], g=g[0], value=value[0], n_iter=n_iter, potential_change=change[0]
        )
    return result


def _primal_value(
    plan: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    rho_a: float,
    rho_b: float,
) -> torch.Tensor:
    r"""Objective at ``plan``: ``<P,C> + eps KL(P||ab^T)`` equals
    ``<P1, f> + <P^T1, g> - eps sum P + eps sum(a) sum(b)`` since ``log P = log ab^T + (f+g-C)/eps``,
    which avoids ``0 * inf`` on forbidden pairs."""
    row, col = plan.sum(-1), plan.sum(-2)
    finite_f = torch.where(row > 0, f, torch.zeros_like(f))
    finite_g = torch.where(col > 0, g, torch.zeros_like(g))
    value = (row * finite_f).sum(-1) + (col * finite_g).sum(-1)
    value = value + eps * (a.sum(-1) * b.sum(-1) - row.sum(-1))
    if not math.isinf(rho_a):
        value = value + rho_a * generalized_kl(row, a)
    if not math.isinf(rho_b):
        value = value + rho_b * generalized_kl(col, b)
    return value
