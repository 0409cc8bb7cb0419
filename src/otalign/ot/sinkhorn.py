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

from dataclasses import dataclass

import torch

from ._scaling import run_iterations
from ._validation import (
    check_equal_mass,
    check_feasible,
    check_iteration_settings,
    check_positive_scalar,
    prepare_problem,
)
from .newton import newton_finish, plan_of


@dataclass
class SinkhornResult:
    """Solution of a batch of balanced entropic OT problems.

    Attributes:
        f: (B, n) dual potential of the ``a`` side, in cost units. ``-inf`` where ``a`` is 0.
        g: (B, m) dual potential of the ``b`` side, in cost units. ``-inf`` where ``b`` is 0.
        value: (B,) entropic OT value ``<P, C> + eps * sum P (log P - 1)``, evaluated as the
            dual objective ``<a, f> + <b, g> - eps * sum(b)`` (exact at convergence).
        n_iter: Sinkhorn iterations run at the target ``eps`` (eps-scaling steps excluded).
        marginal_error: (B,) L1 error ``||P 1 - a||_1`` of the returned plan, as computed by
            the iterations (its column marginals are exact up to rounding; in float32 the
            materialised plan carries an extra relative error of about 1e-7 * cost / eps).
        u: (B, n) the same potentials in the product-reference form
            ``P_ij = a_i b_j exp((u_i + v_j - C_ij)/eps)``, i.e. ``u = f - eps log a``; finite on zero-mass
            atoms (there: the soft c-transform ``-eps log sum_j b_j exp((v_j - C_ij)/eps)``).
        v: (B, m) likewise, ``v = g - eps log b``.
        converged: (B,) bool, True where the problem reached ``tol`` (on a fresh kernel) within ``max_iter``.
        iters: (B,) int64 iterations each problem ran at the target ``eps`` before it was frozen (converged
            problems stop iterating while the rest of the batch goes on; ``n_iter`` is their maximum).
        plan: (B, n, m) optimal plan when ``return_plan=True``, else ``None``.
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    converged: torch.Tensor
    iters: torch.Tensor
    plan: torch.Tensor | None = None


def sinkhorn(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    *,
    max_iter: int = 1000,
    tol: float | torch.Tensor = 1e-6,
    scaling: float = 0.5,
    check_every: int = 5,
    return_plan: bool = False,
    mass_rtol: float | None = None,
    overrelaxation: float = 1.0,
    newton_steps: int = 0,
) -> SinkhornResult:
    r"""Solve a batch of balanced entropic OT problems with stabilised Sinkhorn.

    See the module docstring for the objective and the potentials' convention. A log-domain
    eps-scaling warm start is followed by absorbed scaling iterations (one batched
    matrix-vector product per half-step; see :mod:`otalign.ot._scaling`), which fall back to
    log-domain updates wherever the kernel underflows.

    Args:
        a: (B, n) or (n,) nonnegative masses; zero-mass atoms allowed.
        b: (B, m) or (m,) nonnegative masses with the same total as ``a`` per problem.
        cost: (B, n, m) or (n, m) costs; ``+inf`` marks a forbidden pair.
        eps: entropic regularization (> 0) in cost units (``1 / lambda`` in the WPR paper).
        max_iter: iterations allowed at the target ``eps``.
        tol: a problem stops (is frozen) once its L1 marginal error ``||P1 - a||_1`` is <= ``tol``
            (absolute, in mass units): a number, or a (B,) tensor of per-problem tolerances.
        scaling: eps-scaling factor in [0, 1): a warm start runs one log-domain update per
            eps from the cost range down to ``eps``, multiplying by ``scaling`` each time.
            ``0`` disables eps-scaling.
        check_every: test convergence every this many iterations (a device sync on GPU).
        return_plan: also return the (B, n, m) plan.
        mass_rtol: relative tolerance on ``sum(a) == sum(b)``; by default 1e-4, or the input
            dtype's resolution if coarser (bfloat16: 7.8e-3). Within it, ``b`` is rescaled to
            the mass of ``a``.
        overrelaxation: ``w`` in (0, 2): each half-step moves the potential ``w`` times the plain update,
            ``u <- u + w (ct(v) - u)`` (same solution; 1.5-1.8 needs 2-5x fewer iterations at small eps, no
            global guarantee above 1; see :mod:`otalign.ot._scaling`). 1 is plain Sinkhorn.
        newton_steps: a problem still above ``tol`` after ``max_iter`` iterations gets up to this many damped
            Newton steps on the dual, in float64 (:mod:`otalign.ot.newton`); ``converged`` then reports the
            result. 0 (default): Sinkhorn only. ``n_iter`` and ``iters`` count Sinkhorn iterations only.

    Returns:
        :class:`SinkhornResult`, in float32 for half/float32 inputs, float64 for float64.
        A single problem (1-D masses) gives results without the batch axis.

    Raises:
        ValueError: bad shapes, an empty batch, negative/non-finite masses, unequal masses, NaN costs, an atom
            with mass whose every cost is ``+inf`` (no plan exists), non-positive eps, ``max_iter`` or
            ``check_every`` < 1, negative or non-finite ``tol``.
    """
    eps = check_positive_scalar("eps", eps)
    check_iteration_settings(max_iter, tol, check_every)
    if newton_steps < 0:
        raise ValueError(f"newton_steps must be >= 0, got {newton_steps}")
    if mass_rtol is None:
        input_resolution = [
            torch.finfo(t.dtype).eps for t in (a, b) if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        mass_rtol = max([1e-4, *input_resolution])
    problem = prepare_problem(a, b, cost)
    a, b, cost = problem.a, problem.b, problem.cost
    check_equal_mass(a, b, mass_rtol)
    check_feasible(problem)
    b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))

    # Potentials in the reference parametrisation P = a_i b_j exp((u_i + v_j - C_ij)/eps):
    # unlike f = u + eps log a they stay finite on zero-mass atoms.
    run = run_iterations(
        a,
        b,
        problem,
        eps,
        scaling,
        lambda _: (1.0, 1.0),
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        balanced=True,
        return_plan=return_plan,
        overrelaxation=overrelaxation,
    )
    u, v, error, converged, plan = run.u, run.v, run.error, run.converged, run.plan
    if newton_steps and not bool(converged.all()):
        stalled = (~converged).nonzero()[:, 0]
        tols = torch.as_tensor(tol, dtype=a.dtype, device=a.device).expand(a.shape[0])[stalled]
        finished = newton_finish(
            a[stalled], b[stalled], cost[stalled], eps, u[stalled], v[stalled], tol=tols, max_steps=newton_steps
        )
        u, v, error, converged = u.clone(), v.clone(), error.clone(), converged.clone()
        u[stalled], v[stalled], error[stalled] = finished
        converged[stalled] = finished[2] <= tols
        if plan is not None:
            plan[stalled] = plan_of(a[stalled], b[stalled], u[stalled], v[stalled], cost[stalled], eps)
    result = SinkhornResult(
        f=u + eps * a.log(),
        g=v + eps * b.log(),
        value=_dual_value(a, b, u, v, eps),
        n_iter=run.n_iter,
        marginal_error=error,
        plan=plan,
        u=u,
        v=v,
        converged=converged,
        iters=run.iters,
    )
    return _squeeze(result) if problem.unbatched else result


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
        u=result.u[0],
        v=result.v[0],
        converged=result.converged[0],
        iters=result.iters[0],
    )
