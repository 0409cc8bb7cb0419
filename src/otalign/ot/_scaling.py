r"""The Sinkhorn iteration engine shared by the balanced and unbalanced solvers.

Both solvers look for potentials (u, v) in the reference parametrisation

.. math::
    P_{ij} = a_i b_j \exp\big((u_i + v_j - C_{ij})/\varepsilon\big),

through damped soft c-transforms :math:`u \leftarrow \kappa_a\,\mathrm{ct}(v)`,
:math:`v \leftarrow \kappa_b\,\mathrm{ct}(u)` (``kappa = 1`` balanced, ``rho/(rho+eps)`` unbalanced).

Log-domain updates need one exp per matrix entry per iteration. Here they run as *absorbed
scaling* iterations (Schmitzer 2019, "Stabilized sparse scaling algorithms"): the kernel
:math:`E_{ij} = \exp((u^0_i + v^0_j - C_{ij})/\varepsilon)` is built once for the current
potentials, and the iterations update small scalings (s, t) with one batched matrix-vector
product each — ``u = u0 + eps log s`` — absorbing them into (u0, v0) and rebuilding E whenever
they grow. A non-finite scaling (a row of E that underflowed) falls back to exact log-domain
c-transforms from the last good state, so the result never depends on float range.

Over-relaxation (``overrelaxation = w``, balanced problems only; Thibault et al. 2017, "Overrelaxed
Sinkhorn-Knopp algorithm for regularized optimal transport"): each half-step moves the potential ``w`` times
as far as the plain update would, :math:`u \leftarrow u + w\,(\mathrm{ct}(v) - u)`, which has the same fixed
point and, for ``1 < w < 2``, converges several times faster when eps is small against the costs (measured
in ``benchmarks/penalty.py``). The column half-step before every convergence test is a plain one, so the
test sees exact column marginals and its L1 row error means what it means without relaxation. ``w = 1`` is
plain Sinkhorn; there is no global convergence guarantee above 1 and ``w`` close to 2 can stall (a
non-converged problem reports ``converged`` False).

Every decision is per problem: a problem's kernel is rebuilt only when its own scalings grew,
and a problem that has converged is frozen (its solution stored) and dropped from the batch, so
the batch is not held back by its slowest member. The kernel lives in one buffer for the whole
solve (rebuilt in place, the active problems compacted to its front): on CPU every fresh
allocation of a large tensor costs page faults that are as slow as the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .transforms import c_transform

ABSORB_AT = 30.0  # rebuild a problem's kernel once its |log s| or |log t| exceeds this
DROP_FRACTION = 0.125
"""Converged problems leave the batch once they are at least this fraction of it (or all of it): compacting
the kernel buffer costs about one iteration, so dropping one problem at a time would not pay."""


def kernel(u: torch.Tensor, v: torch.Tensor, cost: torch.Tensor, eps: float, out: torch.Tensor | None = None):
    """``exp((u_i + v_j - C_ij) / eps)``: (B, n), (B, m), (B, n, m) -> (B, n, m), written into ``out`` if given.

    A potential of ``-inf`` (see :func:`held_potentials`) gives an all-zero row or column.
    """
    out = torch.sub(u.unsqueeze(-1), cost, out=out) if out is not None else u.unsqueeze(-1) - cost
    return out.add_(v.unsqueeze(-2)).div_(eps).exp_()


def row_sums(E: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``E x``: (B, n, m), (B, m) -> (B, n), as ``x E^T`` (a transposed batched GEMM: on CPU about twice as
    fast as the batched matrix-vector product ``E @ x[..., None]``)."""
    return torch.bmm(x.unsqueeze(1), E.transpose(1, 2)).squeeze(1)


def held_potentials(potential: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``potential`` with ``-inf`` on zero-mass atoms, so that their kernel rows/columns are 0: such an atom
    carries no plan mass, and its potential, which may be large, must not turn ``0 * E`` into NaN."""
    return torch.where(mass > 0, potential, -math.inf)


def live_atoms(a: torch.Tensor, b: torch.Tensor, finite: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n), (B, m) masks of atoms that carry plan mass: positive mass and a finite cost to a
    positive-mass partner (``finite``: the (B, n, m) mask of finite costs, None when all are finite).
    The others keep their potentials out of the scaling updates."""
    held_a, held_b = a > 0, b > 0
    if finite is None:
        return held_a & held_b.any(-1, keepdim=True), held_b & held_a.any(-1, keepdim=True)
    row_live = held_a & (finite & held_b.unsqueeze(-2)).any(-1)
    col_live = held_b & (finite & held_a.unsqueeze(-1)).any(-2)
    return row_live, col_live


def anneal(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    scaling: float,
    damping: Callable[[float], tuple[float, float]],
    *,
    cost_range: float,
    finite: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps-scaling warm start: one (u, v) update per eps from the cost range down to (excluding) ``eps``.

    ``damping(eps_k)`` gives the (kappa_a, kappa_b) exponents at that eps; ``cost_range`` is the
    spread of the finite costs. Returns (u, v), (B, n) and (B, m); zeros when the cost range is
    below ``eps`` (the first iteration at ``eps`` then does all the work of a warm start).
    """
    if not 0 <= scaling < 1:
        raise ValueError(f"scaling must be in [0, 1), got {scaling}")
    u, v = torch.zeros_like(a), torch.zeros_like(b)
    schedule = []
    if scaling > 0:
        eps_k = max(cost_range, eps)
        while eps_k > eps:
            schedule.append(eps_k)
            eps_k *= scaling
    if not schedule:
        return u, v
    log_a, log_b = a.log(), b.log()
    row_live, col_live = live_atoms(a, b, finite)
    E = torch.empty_like(cost)
    for eps_k in schedule:
        damp_a, damp_b = damping(eps_k)
        # One kernel pass per eps: the kernel at the current potentials, then both half-steps as
        # matrix-vector products; the log domain only where the kernel under/overflowed.
        kernel(held_potentials(u, a), held_potentials(v, b), cost, eps_k, out=E)
        rows = row_sums(E, b)
        log_s = torch.where(row_live, -damp_a * rows.log() - (1.0 - damp_a) * u / eps_k, 0.0)
        cols = torch.bmm((a * log_s.exp()).unsqueeze(1), E).squeeze(1)
        log_t = torch.where(col_live, -damp_b * cols.log() - (1.0 - damp_b) * v / eps_k, 0.0)
        if torch.isfinite(log_s).all() and torch.isfinite(log_t).all():
            u, v = u + eps_k * log_s, v + eps_k * log_t
        else:
            u = damp_a * c_transform(v, log_b, cost, eps_k, dim=2)
            v = damp_b * c_transform(u, log_a, cost, eps_k, dim=1)
    return u, v


class ScalingState:
    """The active problems of a batch: their data, and potentials kept as absorbed part + log-scalings.

    ``u = u0 + eps * log_s`` and ``v = v0 + eps * log_t``; ``E = kernel(u0, v0)`` with zero rows and
    columns for zero-mass atoms (:func:`held_potentials`). ``index`` maps each active problem to its
    position in the caller's batch. :meth:`keep` compacts the active problems to the front of the
    kernel buffer instead of allocating a new one.
    """

    def __init__(self, a, b, cost, eps, u, v, tol, row_live, col_live, max_cost):
        self.a, self.b, self.cost, self.eps, self.tol = a, b, cost, eps, tol
        self.row_live, self.col_live, self.max_cost = row_live, col_live, max_cost
        self.all_live = (bool(row_live.all()), bool(col_live.all()))
        held_log = [torch.where(mass > 0, mass.log(), math.inf).amin(-1) for mass in (a, b)]
        self.log_mass_floor = held_log[0] + held_log[1]
        self.log_tiny = math.log(torch.finfo(a.dtype).tiny) + 1.0
        self.index = torch.arange(a.shape[0], device=a.device)
        self._buffer = torch.empty_like(cost)
        self.E = self._buffer
        self._own_cost = False
        self.absorb(u, v)

    @property
    def size(self) -> int:
        return self.a.shape[0]

    def absorb(self, u: torch.Tensor, v: torch.Tensor, which: torch.Tensor | None = None) -> None:
        """Absorb (u, v) and rebuild the kernel, of every problem or only those where ``which`` (B,) is True."""
        if which is None or bool(which.all()):
            self.u0, self.v0 = u, v
            kernel(held_potentials(u, self.a), held_potentials(v, self.b), self.cost, self.eps, out=self.E)
            self.log_s, self.log_t = torch.zeros_like(u), torch.zeros_like(v)
            self.exponent_floor = self._exponent_floor()
            return
        self.exponent_floor = torch.where(which, self._exponent_floor(u, v), self.exponent_floor)
        rows = which.nonzero().flatten()
        self.u0 = torch.where(which[:, None], u, self.u0)
        self.v0 = torch.where(which[:, None], v, self.v0)
        self.E[rows] = kernel(
            held_potentials(u[rows], self.a[rows]), held_potentials(v[rows], self.b[rows]), self.cost[rows], self.eps
        )
        self.log_s = torch.where(which[:, None], 0.0, self.log_s)
        self.log_t = torch.where(which[:, None], 0.0, self.log_t)

    def _exponent_floor(self, u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) lower bound on ``log(a_i b_j E_ij)`` over held pairs for a kernel built at (u, v) (default: u0, v0)."""
        u = self.u0 if u is None else u
        v = self.v0 if v is None else v
        low_u = torch.where(self.a > 0, u, math.inf).amin(-1)
        low_v = torch.where(self.b > 0, v, math.inf).amin(-1)
        return (low_u + low_v - self.max_cost) / self.eps + self.log_mass_floor

    def exact(self, low_s: torch.Tensor, low_t: torch.Tensor) -> torch.Tensor:
        """(B,) True where no term ``a_i s_i E_ij b_j t_j`` of the scaled kernel can have left the float's normal
        range, so the current scalings are as accurate as a fresh kernel's, however large they are.
        ``low_s``, ``low_t``: (B,) the smallest log-scalings."""
        return self.exponent_floor + low_s + low_t > self.log_tiny

    def scaling_step(self, sums: torch.Tensor, damp: float, rows: bool) -> torch.Tensor:
        """New log-scalings ``-damp log(sums) - (1 - damp) u0 / eps`` (rows; ``v0`` for columns), 0 off the live
        atoms."""
        step = sums.log_().mul_(-damp)  # sums is a fresh matrix-vector product: overwrite it
        if damp != 1.0:
            step.sub_((self.u0 if rows else self.v0), alpha=(1.0 - damp) / self.eps)
        live = self.row_live if rows else self.col_live
        return step if bool(self.all_live[0 if rows else 1]) else torch.where(live, step, 0.0)

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the problems where ``keep`` (B,) is False."""
        kept = keep.nonzero().flatten()
        self.E = _compact(self._buffer, kept)
        if self._own_cost:
            self.cost = _compact(self._cost_buffer, kept)
        else:  # the caller's tensor: copied once, compacted in place from then on
            self._cost_buffer = self.cost = self.cost[kept]
            self._own_cost = True
        names = ("a", "b", "tol", "row_live", "col_live", "index", "u0", "v0", "log_s", "log_t")
        for name in (*names, "log_mass_floor", "exponent_floor"):
            setattr(self, name, getattr(self, name)[kept])
        self.all_live = (bool(self.row_live.all()), bool(self.col_live.all()))

    @property
    def u(self) -> torch.Tensor:
        return self.u0 + self.eps * self.log_s

    @property
    def v(self) -> torch.Tensor:
        return self.v0 + self.eps * self.log_t

    def row_sums(self) -> torch.Tensor:
        """``sum_j E_ij b_j t_j``, (B, n)."""
        return row_sums(self.E, self.b * self.log_t.exp())

    def col_sums(self) -> torch.Tensor:
        """``sum_i a_i s_i E_ij``, (B, m)."""
        return torch.bmm((self.a * self.log_s.exp()).unsqueeze(1), self.E).squeeze(1)


class Iterations(NamedTuple):
    """What :func:`scaling_iterations` returns; every tensor is over the caller's whole batch (B problems)."""

    u: torch.Tensor
    """(B, n) potentials, product-reference form."""
    v: torch.Tensor
    """(B, m)."""
    plan: torch.Tensor | None
    """(B, n, m) the plan the error refers to, or None unless asked for."""
    row_marginal: torch.Tensor
    """(B, n) ``P 1`` of that plan."""
    col_marginal: torch.Tensor
    """(B, m) ``P^T 1``."""
    n_iter: int
    """Iterations run by the slowest problem."""
    iters: torch.Tensor
    """(B,) int64 iterations each problem ran before it was frozen."""
    error: torch.Tensor
    """(B,) the quantity tested against ``tol``."""
    converged: torch.Tensor
    """(B,) bool: error <= tol on a fresh kernel when the problem was frozen."""


def scaling_iterations(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    damp_a: float,
    damp_b: float,
    max_iter: int,
    tol: float | torch.Tensor,
    check_every: int,
    balanced: bool,
    return_plan: bool,
    finite: torch.Tensor | None,
    max_cost: float,
    overrelaxation: float = 1.0,
) -> Iterations:
    """Run Sinkhorn updates from ``(u, v)`` until every problem has converged or ``max_iter``.

    Each iteration updates the row scalings, then the column scalings, so the column marginal
    is exact (balanced) or stationary (unbalanced) after it. Convergence, tested every
    ``check_every`` iterations and per problem: balanced — L1 row-marginal error
    ``||P1 - a||_1 <= tol``; unbalanced — sup-norm change of (u, v) over the last iteration
    ``<= tol`` (cost units). It is only accepted on a fresh kernel (scalings below e), so entries
    that underflowed in an old kernel cannot hide mass — or on any kernel where a bound shows that no
    term underflowed (:meth:`ScalingState.exact`). A converged problem is frozen: its
    potentials, marginals and plan are stored and no longer change. Zero-mass atoms take no part
    in the iterations; their potentials are filled in at the end with the exact (damped)
    c-transform. ``finite``: (B, n, m) mask of finite costs, None when all are; ``max_cost``: the
    largest finite cost; ``overrelaxation``: ``w`` of the module docstring (1: plain updates).
    """
    batch, device = a.shape[0], a.device
    tol = torch.as_tensor(tol, dtype=a.dtype, device=device).expand(batch)
    row_live, col_live = live_atoms(a, b, finite)
    out = {
        "u": torch.empty_like(a),
        "v": torch.empty_like(b),
        "rows": torch.empty_like(a),
        "cols": torch.empty_like(b),
        "error": torch.empty_like(a[:, 0]),
        "iters": torch.zeros(batch, dtype=torch.int64, device=device),
        "converged": torch.zeros(batch, dtype=torch.bool, device=device),
    }
    plan_out = torch.empty_like(cost) if return_plan else None
    state = ScalingState(a, b, cost, eps, u, v, tol, row_live, col_live, max_cost)
    good_u, good_v = u, v
    change = torch.full_like(a[:, 0], math.inf)
    n_iter = 0
    while True:
        rows = state.row_sums()
        if n_iter % check_every == 0 or n_iter >= max_iter:
            low_s, high_s = torch.aminmax(state.log_s, dim=-1)
            low_t, high_t = torch.aminmax(state.log_t, dim=-1)
            largest = torch.maximum(torch.maximum(high_s, -low_s), torch.maximum(high_t, -low_t))
            bad = ~torch.isfinite(largest)  # NaN propagates through aminmax, inf shows in it
            if bool(bad.any()):
                # A kernel row or column underflowed: redo these problems' iterations in the log domain.
                fixed_u, fixed_v = _log_domain_steps(state, good_u[bad], good_v[bad], bad, damp_a, damp_b, check_every)
                new_u, new_v = state.u.clone(), state.v.clone()
                new_u[bad], new_v[bad] = fixed_u, fixed_v
                state.absorb(new_u, new_v, which=bad)
                rows = state.row_sums()
                low_s, high_s = torch.aminmax(state.log_s, dim=-1)
                low_t, high_t = torch.aminmax(state.log_t, dim=-1)
                largest = torch.maximum(torch.maximum(high_s, -low_s), torch.maximum(high_t, -low_t))
            error = (state.a * state.log_s.exp() * rows - state.a).abs().sum(-1) if balanced else change
            met = error <= state.tol
            trusted = (largest <= 1.0) | state.exact(low_s, low_t)
            done = met & trusted
            converged = done
            if n_iter >= max_iter:
                done = torch.ones_like(done)
            n_done = int(done.sum())
            if n_done == state.size or (n_done and n_done >= DROP_FRACTION * state.size):
                _freeze(state, done, rows, error, converged, n_iter, out, plan_out)
                if n_done == state.size:
                    break
                keep = ~done
                state.keep(keep)
                rows, met, trusted, largest, change = rows[keep], met[keep], trusted[keep], largest[keep], change[keep]
            good_u, good_v = state.u, state.v
            stale = largest > torch.where(met & ~trusted, 1.0, ABSORB_AT)
            if bool(stale.any()):
                state.absorb(good_u, good_v, which=stale)
                rows = state.row_sums()
        old_s, old_t = state.log_s, state.log_t
        # u = kappa * ct(v) with ct(v) = u0 - eps log(rows), written as a scaling of u0.
        state.log_s = _relax(old_s, state.scaling_step(rows, damp_a, rows=True), overrelaxation)
        n_iter += 1
        plain = n_iter % check_every == 0 or n_iter >= max_iter  # a test follows: exact columns
        state.log_t = _relax(old_t, state.scaling_step(state.col_sums(), damp_b, rows=False), overrelaxation, plain)
        if not balanced and (n_iter % check_every == 0 or n_iter >= max_iter):
            step = torch.maximum((state.log_s - old_s).abs().amax(-1), (state.log_t - old_t).abs().amax(-1))
            change = eps * step.nan_to_num(nan=math.inf)

    u, v = out["u"], out["v"]
    _fill_zero_mass(u, a, v, b, cost, eps, damp_a, dim=2)
    _fill_zero_mass(v, b, u, a, cost, eps, damp_b, dim=1)
    return Iterations(
        u=u,
        v=v,
        plan=plan_out,
        row_marginal=out["rows"],
        col_marginal=out["cols"],
        n_iter=n_iter,
        iters=out["iters"],
        error=out["error"],
        converged=out["converged"],
    )


PLAIN_MAX_EXPONENT = 30.0
""":func:`plain_iterations` runs when every cost lies in ``[0, PLAIN_MAX_EXPONENT * eps]``: the kernel
``exp(-C/eps)`` then lies in ``[e^-30, 1]``, far from float32 underflow, and needs no stabilisation."""


def run_iterations(
    a: torch.Tensor,
    b: torch.Tensor,
    problem,
    eps: float,
    scaling: float,
    damping: Callable[[float], tuple[float, float]],
    *,
    max_iter: int,
    tol: float | torch.Tensor,
    check_every: int,
    balanced: bool,
    return_plan: bool,
    overrelaxation: float = 1.0,
) -> Iterations:
    """Solve from scratch: :func:`plain_iterations` when the batch is well conditioned (and it succeeds),
    else the eps-scaling warm start (:func:`anneal`) and :func:`scaling_iterations`.

    ``problem`` is the :class:`~otalign.ot._validation.Problem` of ``(a, b)`` (its cost and cost statistics);
    ``damping(eps_k)`` gives (kappa_a, kappa_b) at ``eps_k``; ``overrelaxation`` (balanced only) is ``w`` of the
    module docstring.
    """
    if not 0 < overrelaxation < 2 or (overrelaxation != 1.0 and not balanced):
        raise ValueError(f"overrelaxation must be in (0, 2) and 1 for unbalanced problems, got {overrelaxation}")
    damp_a, damp_b = damping(eps)
    common = {"max_iter": max_iter, "tol": tol, "check_every": check_every, "balanced": balanced}
    common["overrelaxation"] = overrelaxation
    if not 0 <= scaling < 1:
        raise ValueError(f"scaling must be in [0, 1), got {scaling}")
    conditioned = problem.finite is None and problem.min_cost >= 0 and problem.max_cost <= PLAIN_MAX_EXPONENT * eps
    if conditioned and (scaling == 0 or problem.cost_range <= eps):  # (no eps-scaling step would run)
        run = plain_iterations(a, b, problem.cost, eps, damp_a=damp_a, damp_b=damp_b, return_plan=return_plan, **common)
        if run is not None:
            return run
    u, v = anneal(a, b, problem.cost, eps, scaling, damping, cost_range=problem.cost_range, finite=problem.finite)
    return scaling_iterations(
        a,
        b,
        problem.cost,
        eps,
        u,
        v,
        damp_a=damp_a,
        damp_b=damp_b,
        return_plan=return_plan,
        finite=problem.finite,
        max_cost=problem.max_cost,
        **common,
    )


def plain_iterations(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    *,
    damp_a: float,
    damp_b: float,
    max_iter: int,
    tol: float | torch.Tensor,
    check_every: int,
    balanced: bool,
    return_plan: bool,
    overrelaxation: float = 1.0,
) -> Iterations | None:
    """Kernel-domain Sinkhorn for well-conditioned batches (every cost in ``[0, 30 eps]``, all finite).

    ``s = (K (b t))^(-kappa_a)``, ``t = (K^T (a s))^(-kappa_b)`` with ``K = exp(-C/eps)``, i.e. the same
    damped c-transforms as :func:`scaling_iterations` with ``u = eps log s``, at a fraction of its
    per-iteration bookkeeping (which dominates small problems). Zero-mass atoms need no special case:
    their scaling is already the damped c-transform. The batch iterates until every problem meets
    ``tol`` (same tests as :func:`scaling_iterations`). Returns None if a scaling left the float range
    (extreme masses); the caller then runs :func:`scaling_iterations`.
    """
    batch = a.shape[0]
    tol = torch.as_tensor(tol, dtype=a.dtype, device=a.device).expand(batch)
    K = torch.div(cost, -eps).exp_()
    s, t = torch.ones_like(a), torch.ones_like(b)
    last_s, last_t = s, t
    n_iter = 0
    while True:
        rows = row_sums(K, b * t)
        if n_iter % check_every == 0 or n_iter >= max_iter:
            if balanced:
                error = (a * s * rows - a).abs().sum(-1)
            elif n_iter == 0:
                error = torch.full_like(a[:, 0], math.inf)
            else:
                step = torch.maximum((s / last_s).log_().abs_().amax(-1), (t / last_t).log_().abs_().amax(-1))
                error = eps * step
            # A non-finite s, t or rows makes the error NaN or inf (from the next check on, at the latest).
            if n_iter and not bool(torch.isfinite(error).all()):
                return None
            converged = error <= tol
            if n_iter >= max_iter or bool(converged.all()):
                break
        if not balanced and ((n_iter + 1) % check_every == 0 or n_iter + 1 >= max_iter):
            last_s, last_t = s, t  # the change is measured over the iteration that ends at a check
        s = _relax_scaling(s, rows.pow_(-damp_a), overrelaxation)
        cols = torch.bmm((a * s).unsqueeze(1), K).squeeze(1)
        n_iter += 1
        plain = n_iter % check_every == 0 or n_iter >= max_iter
        t = _relax_scaling(t, cols.pow_(-damp_b), overrelaxation, plain)
    scale_a, scale_b = a * s, b * t
    cols = torch.bmm(scale_a.unsqueeze(1), K).squeeze(1)
    plan = K.mul_(scale_a.unsqueeze(-1)).mul_(scale_b.unsqueeze(-2)) if return_plan else None
    return Iterations(
        u=eps * s.log(),
        v=eps * t.log(),
        plan=plan,
        row_marginal=scale_a * rows,
        col_marginal=scale_b * cols,
        n_iter=n_iter,
        iters=torch.full((batch,), n_iter, dtype=torch.int64, device=a.device),
        error=error,
        converged=converged,
    )


def _relax(old: torch.Tensor, new: torch.Tensor, weight: float, plain: bool = False) -> torch.Tensor:
    """Over-relaxed update ``old + weight * (new - old)`` of log-scalings (``new`` itself when ``weight`` is 1 or
    ``plain``)."""
    return new if weight == 1.0 or plain else torch.lerp(old, new, weight)


def _relax_scaling(old: torch.Tensor, new: torch.Tensor, weight: float, plain: bool = False) -> torch.Tensor:
    """Over-relaxed update of kernel-domain scalings, ``old^(1 - weight) * new^weight`` (:func:`_relax` in logs)."""
    return new if weight == 1.0 or plain else old.pow(1.0 - weight).mul_(new.pow_(weight))


def _compact(buffer: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Move problems ``kept`` (increasing indices) of ``buffer`` to its front, in place; return that front."""
    for new, old in enumerate(kept.tolist()):
        if new != old:  # kept is increasing, so a move never overwrites a problem still to be moved
            buffer[new].copy_(buffer[old])
    return buffer[: len(kept)]


def _fill_zero_mass(potential, mass, other, other_mass, cost, eps, damp, dim) -> None:
    """Set ``potential`` on its zero-mass atoms, in place, to the damped soft c-transform of ``other``
    (:func:`c_transform`), computed on those atoms' cost rows (``dim=2``) or columns (``dim=1``) only."""
    problem, atom = (mass <= 0).nonzero(as_tuple=True)
    if not len(problem):
        return
    lines = cost[problem, atom, :] if dim == 2 else cost[problem, :, atom]
    weights = other_mass[problem].log() + other[problem] / eps
    value = -eps * torch.logsumexp(weights - lines / eps, dim=-1)
    potential[problem, atom] = damp * torch.where(torch.isinf(value), torch.zeros_like(value), value)


def _log_domain_steps(state, u, v, which, damp_a, damp_b, steps):
    """``steps`` exact log-domain iterations, from (u, v), of the active problems where ``which`` is True."""
    a, b, cost = state.a[which], state.b[which], state.cost[which]
    log_a, log_b = a.log(), b.log()
    for _ in range(steps):
        u = damp_a * c_transform(v, log_b, cost, state.eps, dim=2)
        v = damp_b * c_transform(u, log_a, cost, state.eps, dim=1)
    return u, v


def _freeze(state, done, rows, error, converged, n_iter, out, plan_out) -> None:
    """Store the solution of the active problems where ``done`` is True into the batch-wide outputs."""
    every = bool(done.all())
    sel = done.nonzero().flatten()
    E = state.E if every else state.E[sel]
    target = state.index[sel]
    scale_a = state.a[sel] * state.log_s[sel].exp()
    scale_b = state.b[sel] * state.log_t[sel].exp()
    out["u"][target] = state.u[sel]
    out["v"][target] = state.v[sel]
    out["rows"][target] = scale_a * rows[sel]
    out["cols"][target] = scale_b * torch.bmm(scale_a.unsqueeze(1), E).squeeze(1)
    out["error"][target] = error[sel]
    out["iters"][target] = n_iter
    out["converged"][target] = converged[sel]
    if plan_out is not None:
        plan_out[target] = (
            E.mul_(scale_a.unsqueeze(-1)).mul_(scale_b.unsqueeze(-2))
            if every
            else (scale_a.unsqueeze(-1) * E * scale_b.unsqueeze(-2))
        )
