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

from ._scaling import run_iterations
from ._validation import check_iteration_settings, check_positive_scalar, prepare_problem


@dataclass
class UnbalancedResult:
    """Solution of a batch of unbalanced entropic OT problems.

    Potentials follow the convention of :mod:`otalign.ot` (the same as :class:`~otalign.ot.SinkhornResult`).

    Attributes:
        plan: (B, n, m) optimal plan; ``None`` when solved with ``return_plan=False``.
        f: (B, n) potential of the ``a`` side, in cost units, in the form ``P = exp((f_i + g_j - C_ij)/eps)``,
            i.e. ``f = u + eps log a``; ``-inf`` where ``a`` is 0.
        g: (B, m) potential of the ``b`` side, ``g = v + eps log b``.
        value: (B,) the primal objective of the module docstring at the plan.
        n_iter: iterations run by the slowest problem.
        potential_change: (B,) sup-norm change of (u, v) in the last iteration, cost units.
        u: (B, n) the ``a``-side potential in the product-reference form
            ``P = a_i b_j exp((u_i + v_j - C_ij)/eps)`` (POT's ``eps * log u``); finite on zero-mass atoms.
        v: (B, m) likewise for the ``b`` side.
        converged: (B,) bool, True where ``potential_change <= tol`` (on a fresh kernel) within ``max_iter``.
        iters: (B,) int64 iterations each problem ran before it was frozen.
        row_marginal: (B, n) ``P 1``, available without the plan.
        col_marginal: (B, m) ``P^T 1``.
    """

    plan: torch.Tensor | None
    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: int
    potential_change: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    converged: torch.Tensor
    iters: torch.Tensor
    row_marginal: torch.Tensor
    col_marginal: torch.Tensor


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
    return_plan: bool = True,
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
        tol: a problem stops (is frozen) once the sup-norm change of both its potentials is <= ``tol``
            (cost units).
        scaling: eps-scaling warm start factor in [0, 1) (see :func:`otalign.ot.sinkhorn`).
        check_every: test convergence every this many iterations.
        return_plan: materialise the (B, n, m) plan; without it the result still has the plan's
            marginals, potentials and value, and the solve allocates one (B, n, m) tensor less.

    Returns:
        :class:`UnbalancedResult` in float32 (float64 for float64 inputs); no batch axis
        for 1-D inputs.
    """
    eps = check_positive_scalar("eps", eps)
    rho_a, rho_b = _marginal_weights(rho)
    check_iteration_settings(max_iter, tol, check_every)
    problem = prepare_problem(a, b, cost)
    a, b, cost = problem.a, problem.b, problem.cost

    run = run_iterations(
        a,
        b,
        problem,
        eps,
        scaling,
        lambda eps_k: (_damping(rho_a, eps_k), _damping(rho_b, eps_k)),
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        balanced=False,
        return_plan=return_plan,
    )
    row, col = run.row_marginal, run.col_marginal
    fields = {
        "plan": run.plan,
        "f": run.u + eps * a.log(),
        "g": run.v + eps * b.log(),
        "value": _primal_value(row, col, a, b, run.u, run.v, eps, rho_a, rho_b),
        "potential_change": run.error,
        "u": run.u,
        "v": run.v,
        "converged": run.converged,
        "iters": run.iters,
        "row_marginal": row,
        "col_marginal": col,
    }
    if problem.unbatched:
        fields = {name: None if value is None else value[0] for name, value in fields.items()}
    return UnbalancedResult(n_iter=run.n_iter, **fields)


def _primal_value(
    row: torch.Tensor,
    col: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    rho_a: float,
    rho_b: float,
) -> torch.Tensor:
    r"""Objective at the plan with marginals ``row = P1``, ``col = P^T 1``: ``<P,C> + eps KL(P||ab^T)`` equals
    ``<P1, u> + <P^T1, v> - eps sum P + eps sum(a) sum(b)`` since ``log P = log ab^T + (u+v-C)/eps``,
    which avoids ``0 * inf`` on forbidden pairs."""
    finite_u = torch.where(row > 0, u, torch.zeros_like(u))
    finite_v = torch.where(col > 0, v, torch.zeros_like(v))
    value = (row * finite_u).sum(-1) + (col * finite_v).sum(-1)
    value = value + eps * (a.sum(-1) * b.sum(-1) - row.sum(-1))
    if not math.isinf(rho_a):
        value = value + rho_a * generalized_kl(row, a)
    if not math.isinf(rho_b):
        value = value + rho_b * generalized_kl(col, b)
    return value
