r"""Newton's method on the balanced entropic dual: finishing the problems Sinkhorn leaves unconverged.

Sinkhorn is coordinate ascent on the dual, and converges linearly at the rate of the kernel's second singular
value. A problem whose plan has a *nearly decoupled block* (a group of atoms that trade mass mostly among
themselves, with the rest of the problem reached only through entries of order :math:`e^{-\Delta C/\varepsilon}`)
has that value within ~1e-4 of 1: the marginal error stalls for thousands of iterations while the block's
potentials drift at a constant rate. Newton's method on the same dual (Brauer, Clason, Lorenz and Wirth 2017,
"A Sinkhorn-Newton method for entropic optimal transport") sees the coupling through the Hessian and
converges quadratically; on the few problems that need it, a handful of steps costs less than the iterations
it replaces.

With potentials in the product-reference form :math:`P_{ij} = a_i b_j e^{(u_i + v_j - C_{ij})/\varepsilon}`
(:mod:`otalign.ot`), the dual objective, its gradient and its Hessian are

.. math::
    D(u, v) = \langle a, u\rangle + \langle b, v\rangle - \varepsilon \textstyle\sum_{ij} P_{ij}, \qquad
    \nabla D = \begin{pmatrix} a - P1 \\ b - P^\top 1 \end{pmatrix}, \qquad
    -\nabla^2 D = \frac{1}{\varepsilon} \begin{pmatrix} \mathrm{diag}(P1) & P \\ P^\top & \mathrm{diag}(P^\top 1)
    \end{pmatrix} =: \frac{M}{\varepsilon}.

``M`` is positive semidefinite with the null direction :math:`(1, -1)` (the potentials' shared constant); the
step solves :math:`M\Delta = \varepsilon \nabla D` Jacobi-scaled, :math:`S = D^{-1/2} M D^{-1/2}` with
:math:`D = \mathrm{diag}(M)`, for the solution with no component along the scaled null direction
:math:`z \propto D^{1/2}(1, -1)` (the gradient is orthogonal to :math:`(1, -1)` when the masses are equal),
through the Schur complement of the larger side's diagonal block (:func:`_newton_direction`). Each step is
made safe three ways: it starts with one exact Sinkhorn iteration (an atom whose potential is far off is
fixed by its own update, not by a linearisation of an exponential); no trial moves a potential by more than
``MAX_MOVE`` eps; and a step that does not increase the dual is retried with Levenberg-Marquardt damping
:math:`S + \mu I`, ``mu`` growing tenfold per rejection and shrinking tenfold per acceptance, so that near the
optimum the step is Newton's and converges quadratically. Atoms with zero mass are held out of the step and get
the soft c-transform of the other side at the end, as in :func:`otalign.ot.sinkhorn`.
"""

from __future__ import annotations

import torch

from .transforms import c_transform

CHUNK_BYTES = 32 * 2**20
"""Problems per batched solve are chosen so one chunk's Newton matrices take at most this many bytes."""
ARMIJO = 1e-4
"""Sufficient-increase constant of the backtracking line search."""
TRIES = 12
"""Damped retries per Newton step before a problem is given up on."""
DAMPING_FACTOR = 10.0
"""The Levenberg-Marquardt damping is multiplied by this after a rejected step and divided after an accepted one."""
MAX_MOVE = 10.0
"""A Newton trial moves no potential by more than this many eps."""


def _masked_log(mass: torch.Tensor) -> torch.Tensor:
    return torch.where(mass > 0, mass.log(), -torch.inf)


def _plan(log_a, log_b, u, v, cost, eps):
    """(B, n, m) plan ``a_i b_j exp((u_i + v_j - C_ij)/eps)``; 0 on zero-mass atoms and forbidden pairs."""
    return (log_a[:, :, None] + log_b[:, None, :] + (u[:, :, None] + v[:, None, :] - cost) / eps).exp()


def plan_of(
    a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor, cost: torch.Tensor, eps: float
) -> torch.Tensor:
    """(B, n, m) the plan ``a_i b_j exp((u_i + v_j - C_ij)/eps)`` of product-reference potentials (B, n), (B, m)."""
    return _plan(_masked_log(a), _masked_log(b), u, v, cost, eps)


def _dual(a, b, u, v, plan, eps):
    """(B,) ``<a, u> + <b, v> - eps sum P`` over the atoms with mass."""
    held_u, held_v = torch.where(a > 0, u, 0.0), torch.where(b > 0, v, 0.0)
    return (a * held_u).sum(-1) + (b * held_v).sum(-1) - eps * plan.sum((1, 2))


def _row_error(a, log_a, log_b, u, v, cost, eps):
    """``(v, error)``: ``v`` the exact column update ``ct(u)``, and the L1 row error ``||P 1 - a||_1`` then."""
    v = c_transform(u, log_a, cost, eps, dim=1)
    return v, (_plan(log_a, log_b, u, v, cost, eps).sum(2) - a).abs().sum(-1)


def _newton_direction(a, b, plan, eps, damping):
    """``(step, gradient, factored)``: the (B, n + m) damped Newton step and gradient, 0 on zero-mass atoms (module
    docstring), and the (B,) bool mask of the problems whose matrix factored (the step is 0 elsewhere).

    Solved Jacobi-scaled, ``S = D^-1/2 M D^-1/2 = [[I, Q], [Q^T, I]]`` with ``D = diag(M)`` and
    ``Q = D_a^-1/2 P D_b^-1/2``: atom masses span many orders of magnitude (the top-k tails of a distribution), and
    unscaled ``M`` is too ill-conditioned for its step to be an ascent direction. ``damping`` ``mu`` (B,) is added
    to the unit diagonal (Levenberg-Marquardt). The ``a`` block is eliminated: with ``d = 1 + mu``,

        (d I - Q^T Q / d) x_b = r_b - Q^T r_a / d =: h,    x_a = (r_a - Q x_b) / d,

    an ``m x m`` Cholesky solve (the side with fewer atoms is kept: a ninth of the work of the full system at
    ``n = m``). ``w ∝ D_b^1/2 1`` is an eigenvector of that matrix, eigenvalue ``d - 1/d`` (0 undamped: the
    potentials' shared constant), so its component is set apart: ``x_b = y + c w`` with
    ``(d I - Q^T Q / d + w w^T) y = h - (w.h) w`` (positive definite, ``y`` orthogonal to ``w``) and
    ``c = w.r_b / (d + 1)``, which is ``w.h / (d - 1/d)`` when the masses are equal (then ``w.Q^T r_a = w.r_b``)
    and its limit at ``mu = 0``: the step of the full system with no component along its null direction."""
    if a.shape[1] < b.shape[1]:
        step, gradient, factored = _newton_direction(b, a, plan.transpose(1, 2), eps, damping)
        m = b.shape[1]
        return torch.cat([step[:, m:], step[:, :m]], 1), torch.cat([gradient[:, m:], gradient[:, :m]], 1), factored
    rows, cols = plan.sum(2), plan.sum(1)
    held_a, held_b = a > 0, b > 0
    gradient = torch.cat([torch.where(held_a, a - rows, 0.0), torch.where(held_b, b - cols, 0.0)], dim=1)
    scale_a = torch.where(held_a & (rows > 0), rows, 1.0).rsqrt()
    scale_b = torch.where(held_b & (cols > 0), cols, 1.0).rsqrt()
    q = plan * scale_a[:, :, None] * scale_b[:, None, :]
    n, d = a.shape[1], (1.0 + damping)[:, None]
    r_a, r_b = eps * gradient[:, :n] * scale_a, eps * gradient[:, n:] * scale_b
    null = torch.where(held_b, scale_b.reciprocal(), 0.0)
    null = null / null.norm(dim=1, keepdim=True)
    damped = q / d.sqrt()[:, :, None]
    schur = torch.baddbmm(null[:, :, None] * null[:, None, :], damped.transpose(1, 2), damped, alpha=-1.0)
    schur.diagonal(dim1=1, dim2=2).add_(d)
    rhs = r_b - torch.bmm(r_a.unsqueeze(1), q).squeeze(1) / d
    rhs = rhs - (rhs * null).sum(1, keepdim=True) * null
    # Cholesky, not LU: the matrix is symmetric positive definite unless a problem is numerically singular (then
    # `info` flags it and the caller damps it more), and batched LU in MKL fails outright on some such batches.
    factor, info = torch.linalg.cholesky_ex(schur)
    factored = info == 0
    factor = torch.where(
        factored[:, None, None], factor, torch.eye(schur.shape[1], dtype=schur.dtype, device=schur.device)
    )
    x_b = torch.cholesky_solve(rhs.unsqueeze(-1), factor)[..., 0]
    x_b = x_b + (r_b * null).sum(1, keepdim=True) / (d + 1.0) * null
    x_a = (r_a - torch.bmm(q, x_b.unsqueeze(-1)).squeeze(-1)) / d
    step = torch.cat([x_a * scale_a, x_b * scale_b], dim=1)
    return torch.where(factored[:, None], step, 0.0), gradient, factored


def _ascent_step(a, b, log_a, log_b, cost, eps, u, v, damping):
    """One damped Newton step from ``(u, v)`` for every problem, raising ``damping`` (in place) and retrying
    where the step does not increase the dual. Returns ``(u, v, accepted)``: the new potentials where a step
    was accepted (else the old ones) and the (B,) bool mask."""
    n = a.shape[1]
    plan = _plan(log_a, log_b, u, v, cost, eps)
    objective = _dual(a, b, u, v, plan, eps)
    accepted = torch.zeros_like(objective, dtype=torch.bool)
    new_u, new_v = u.clone(), v.clone()
    for _ in range(TRIES):
        todo = (~accepted).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        step, gradient, factored = _newton_direction(a[todo], b[todo], plan[todo], eps, damping[todo])
        # Far from the optimum the quadratic model can overshoot by whole cost units: no trial moves a potential
        # by more than MAX_MOVE * eps (a kernel entry by more than e^(2 MAX_MOVE)).
        t = (MAX_MOVE * eps / step.abs().amax(1).clamp_min(1e-300)).clamp(max=1.0)[:, None]
        trial_u, trial_v = u[todo] + t * step[:, :n], v[todo] + t * step[:, n:]
        trial_plan = _plan(log_a[todo], log_b[todo], trial_u, trial_v, cost[todo], eps)
        trial = _dual(a[todo], b[todo], trial_u, trial_v, trial_plan, eps)
        slope = (gradient * step).sum(1) * t[:, 0]
        ok = factored & torch.isfinite(trial) & (trial >= objective[todo] + ARMIJO * slope)
        new_u[todo] = torch.where(ok[:, None], trial_u, new_u[todo])
        new_v[todo] = torch.where(ok[:, None], trial_v, new_v[todo])
        accepted[todo] = ok
        damping[todo] = torch.where(
            ok, damping[todo] / DAMPING_FACTOR, (damping[todo] * DAMPING_FACTOR).clamp_min(1e-6)
        )
    damping[damping < 1e-9] = 0.0
    return new_u, new_v, accepted


def _finish_chunk(a, b, cost, eps, u, v, tol, max_steps):
    log_a, log_b = _masked_log(a), _masked_log(b)
    v, error = _row_error(a, log_a, log_b, u, v, cost, eps)
    best_u, best_v, best_error = u.clone(), v.clone(), error.clone()
    damping = torch.zeros_like(error)
    active = error > tol
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        idx = active.nonzero()[:, 0]
        a_k, b_k, c_k, la_k, lb_k = a[idx], b[idx], cost[idx], log_a[idx], log_b[idx]
        # One Sinkhorn iteration first: an atom whose potential is far off (its plan row all but underflowed)
        # is fixed by its exact update, where the linearised step would be huge and point nowhere useful.
        u_k = c_transform(v[idx], lb_k, c_k, eps, dim=2)
        v_k = c_transform(u_k, la_k, c_k, eps, dim=1)
        damping_k = damping[idx]
        new_u, new_v, accepted = _ascent_step(a_k, b_k, la_k, lb_k, c_k, eps, u_k, v_k, damping_k)
        damping[idx] = damping_k
        new_v, new_error = _row_error(a_k, la_k, lb_k, new_u, new_v, c_k, eps)
        u[idx], v[idx] = new_u, new_v
        improved = new_error < best_error[idx]
        best_u[idx] = torch.where(improved[:, None], new_u, best_u[idx])
        best_v[idx] = torch.where(improved[:, None], new_v, best_v[idx])
        best_error[idx] = torch.where(improved, new_error, best_error[idx])
        # No ascent step found even damped (roundoff at the optimum): that problem stops with its best potentials.
        active[idx] = accepted & (best_error[idx] > tol[idx])
    u, v = best_u, best_v
    # Zero-mass atoms: the soft c-transform of the other side, as the Sinkhorn solver leaves them.
    u = torch.where(a > 0, u, c_transform(v, log_b, cost, eps, dim=2))
    v = torch.where(b > 0, v, c_transform(u, log_a, cost, eps, dim=1))
    return u, v, best_error


def newton_finish(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    tol: torch.Tensor,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Damped Newton steps on the dual from Sinkhorn's potentials, per problem, until ``tol`` or ``max_steps``.

    Runs in float64 whatever the input dtype, in chunks of at most :data:`CHUNK_BYTES` of Newton matrices and plans.

    Args:
        a: (B, n) nonnegative masses; b: (B, m) with the same total per problem.
        cost: (B, n, m) costs (``+inf`` forbidden).
        eps: entropic regularization, in cost units.
        u: (B, n), v: (B, m) starting potentials (product-reference form, e.g. Sinkhorn's).
        tol: (B,) L1 row-marginal tolerance, in mass units (the :func:`otalign.ot.sinkhorn` criterion).
        max_steps: Newton steps at most per problem.

    Returns:
        ``(u, v, error)`` in the input dtype: the potentials (``v`` the exact column update of ``u``, so the
        column marginals are exact) and the L1 row error ``||P 1 - a||_1`` of their plan, computed in float64.
        A problem keeps its input potentials (with the column update) when no step improved its error.
    """
    dtype = u.dtype
    a, b, cost, u, v, tol = (t.double() for t in (a, b, cost, u, v, tol))
    # Equal masses in float64 too: a float32 balance leaves |sum a - sum b| ~ 1e-7, a floor under the row error.
    b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
    per_problem = 8 * min(a.shape[1], b.shape[1]) ** 2 * 2 + 8 * a.shape[1] * b.shape[1] * 4
    chunk = max(1, CHUNK_BYTES // per_problem)
    pieces = []
    for start in range(0, a.shape[0], chunk):
        part = slice(start, start + chunk)
        pieces.append(
            _finish_chunk(a[part], b[part], cost[part], eps, u[part].clone(), v[part].clone(), tol[part], max_steps)
        )
    u, v, error = (torch.cat(parts) for parts in zip(*pieces, strict=True))
    return u.to(dtype), v.to(dtype), error.to(dtype)
