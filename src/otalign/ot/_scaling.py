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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ABSORB_AT = 30.0  # rebuild the kernel once |log s| or |log t| exceeds this


def c_transform(
    potential: torch.Tensor, log_mass: torch.Tensor, cost: torch.Tensor, eps: float, dim: int
) -> torch.Tensor:
    r"""Soft c-transform: :math:`-\varepsilon \log \sum_k \exp(\log w_k + (h_k - C_{k\cdot})/\varepsilon)`.

    The sum runs over axis ``dim`` (1 or 2) of ``cost`` (B, n, m); ``potential`` ``h`` and
    ``log_mass`` ``log w`` are indexed along that axis. An atom with no finite cost to a
    positive-mass partner gets 0 (it carries no plan mass, so its potential is arbitrary).
    """
    weights = (log_mass + potential / eps).unsqueeze(-1 if dim == 1 else -2)
    out = -eps * torch.logsumexp(weights - cost / eps, dim=dim)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def kernel(
    u: torch.Tensor, v: torch.Tensor, cost: torch.Tensor, eps: float, support: torch.Tensor | None = None
) -> torch.Tensor:
    """``exp((u_i + v_j - C_ij) / eps)``: (B, n), (B, m), (B, n, m) -> (B, n, m), 0 outside ``support``."""
    exponent = (u.unsqueeze(-1) + v.unsqueeze(-2) - cost) / eps
    if support is not None:
        exponent = torch.where(support, exponent, -math.inf)
    return torch.exp(exponent)


class ScalingState:
    """Potentials (u, v) of a batch, kept as absorbed part + log-scalings.

    ``u = u0 + eps * log_s`` and ``v = v0 + eps * log_t``; ``E = kernel(u0, v0)`` restricted to
    pairs of positive-mass atoms (zero-mass atoms carry no plan mass; their potentials, which
    may be large, must not turn ``0 * E`` into NaN).
    """

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, u: torch.Tensor, v: torch.Tensor, cost: torch.Tensor, eps: float
    ):
        self.cost, self.eps = cost, eps
        self.support = positive_support(a, b)
        self.absorb(u, v)

    def absorb(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u0, self.v0 = u, v
        self.E = kernel(u, v, self.cost, self.eps, self.support)
        self.log_s = torch.zeros_like(u)
        self.log_t = torch.zeros_like(v)

    @property
    def u(self) -> torch.Tensor:
        return self.u0 + self.eps * self.log_s

    @property
    def v(self) -> torch.Tensor:
        return self.v0 + self.eps * self.log_t

    def row_sums(self, b: torch.Tensor) -> torch.Tensor:
        """``sum_j E_ij b_j t_j``, (B, n)."""
        return torch.bmm(self.E, (b * self.log_t.exp()).unsqueeze(-1)).squeeze(-1)

    def col_sums(self, a: torch.Tensor) -> torch.Tensor:
        """``sum_i a_i s_i E_ij``, (B, m)."""
        return torch.bmm((a * self.log_s.exp()).unsqueeze(1), self.E).squeeze(1)


def anneal(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    eps: float,
    scaling: float,
    damping: Callable[[float], tuple[float, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """eps-scaling warm start: one (u, v) update per eps from the cost range down to ``eps``.

    ``damping(eps_k)`` gives the (kappa_a, kappa_b) exponents at that eps. Returns (u, v), (B, n)
    and (B, m), ending with one update at the target ``eps``.
    """
    if not 0 <= scaling < 1:
        raise ValueError(f"scaling must be in [0, 1), got {scaling}")
    log_a, log_b = a.log(), b.log()
    u, v = torch.zeros_like(a), torch.zeros_like(b)
    schedule = []
    if scaling > 0:
        finite = cost[torch.isfinite(cost)]
        eps_k = max(float(finite.max() - finite.min()), eps) if finite.numel() else eps
        while eps_k > eps:
            schedule.append(eps_k)
            eps_k *= scaling
    support = positive_support(a, b)
    row_live, col_live = live_atoms(a, b, cost)
    for eps_k in [*schedule, eps]:
        damp_a, damp_b = damping(eps_k)
        # One kernel pass per eps: the kernel at the current potentials, then both half-steps as
        # matrix-vector products; the log domain only where the kernel under/overflowed.
        E = kernel(u, v, cost, eps_k, support)
        rows = torch.bmm(E, b.unsqueeze(-1)).squeeze(-1)
        log_s = torch.where(row_live, -damp_a * rows.log() - (1.0 - damp_a) * u / eps_k, 0.0)
        cols = torch.bmm((a * log_s.exp()).unsqueeze(1), E).squeeze(1)
        log_t = torch.where(col_live, -damp_b * cols.log() - (1.0 - damp_b) * v / eps_k, 0.0)
        if torch.isfinite(log_s).all() and torch.isfinite(log_t).all():
            u, v = u + eps_k * log_s, v + eps_k * log_t
        else:
            u = damp_a * c_transform(v, log_b, cost, eps_k, dim=2)
            v = damp_b * c_transform(u, log_a, cost, eps_k, dim=1)
    return u, v


def positive_support(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """(B, n, m) mask of pairs of positive-mass atoms, or None when every atom has mass."""
    positive_a, positive_b = a > 0, b > 0
    if bool(positive_a.all()) and bool(positive_b.all()):
        return None
    return positive_a.unsqueeze(-1) & positive_b.unsqueeze(-2)


def live_atoms(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n), (B, m) masks of atoms that carry plan mass: positive mass and a finite cost to a
    positive-mass partner. The others keep their potentials out of the scaling updates."""
    finite = torch.isfinite(cost)
    row_live = (a > 0) & (finite & (b > 0).unsqueeze(-2)).any(-1)
    col_live = (b > 0) & (finite & (a > 0).unsqueeze(-1)).any(-2)
    return row_live, col_live


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
    tol: float,
    check_every: int,
    balanced: bool,
    return_plan: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, torch.Tensor]:
    """Run Sinkhorn updates from ``(u, v)`` until converged or ``max_iter``.

    Each iteration updates the row scalings, then the column scalings, so the column marginal
    is exact (balanced) or stationary (unbalanced) after it. Convergence, tested every
    ``check_every`` iterations: balanced — L1 row-marginal error ``||P1 - a||_1 <= tol``;
    unbalanced — sup-norm change of (u, v) over the last iteration ``<= tol`` (cost units).
    It is only accepted on a fresh kernel (scalings below e), so entries that underflowed in
    an old kernel cannot hide mass. Zero-mass atoms take no part in the iterations; their
    potentials are filled in at the end with the exact (damped) c-transform.

    Returns:
        ``(u, v, plan, n_iter, error)``: potentials (B, n), (B, m); the plan (B, n, m) that the
        error refers to (``None`` unless ``return_plan``); iterations run; ``error`` (B,) the
        quantity tested against ``tol``.
    """
    log_a, log_b = a.log(), b.log()
    row_live, col_live = live_atoms(a, b, cost)
    state = ScalingState(a, b, u, v, cost, eps)
    good_u, good_v = u, v
    change = torch.full_like(a[:, 0], math.inf)
    n_iter = 0
    while True:
        rows = state.row_sums(b)
        if n_iter % check_every == 0 or n_iter >= max_iter:
            if not (torch.isfinite(state.log_s).all() and torch.isfinite(state.log_t).all()):
                # A kernel row or column underflowed: redo these iterations in the log domain.
                u, v = good_u, good_v
                for _ in range(check_every):
                    u = damp_a * c_transform(v, log_b, cost, eps, dim=2)
                    v = damp_b * c_transform(u, log_a, cost, eps, dim=1)
                state.absorb(u, v)
                rows = state.row_sums(b)
            error = (a * state.log_s.exp() * rows - a).abs().sum(-1) if balanced else change
            largest_scaling = max(state.log_s.abs().max(), state.log_t.abs().max())
            converged = bool((error <= tol).all()) and largest_scaling <= 1.0
            if n_iter >= max_iter or converged:
                break
            good_u, good_v = state.u, state.v
            if largest_scaling > (1.0 if bool((error <= tol).all()) else ABSORB_AT):
                state.absorb(good_u, good_v)
                rows = state.row_sums(b)
        old_s, old_t = state.log_s, state.log_t
        # u = kappa * ct(v) with ct(v) = u0 - eps log(rows), written as a scaling of u0.
        new_s = -damp_a * rows.log() - (1.0 - damp_a) * state.u0 / eps
        state.log_s = torch.where(row_live, new_s, torch.zeros_like(rows))
        cols = state.col_sums(a)
        new_t = -damp_b * cols.log() - (1.0 - damp_b) * state.v0 / eps
        state.log_t = torch.where(col_live, new_t, torch.zeros_like(cols))
        if not balanced:
            step = torch.maximum((state.log_s - old_s).abs().amax(-1), (state.log_t - old_t).abs().amax(-1))
            change = eps * step.nan_to_num(nan=math.inf)
        n_iter += 1

    plan = None
    if return_plan:
        plan = (a * state.log_s.exp()).unsqueeze(-1) * state.E * (b * state.log_t.exp()).unsqueeze(-2)

    u, v = state.u, state.v
    if not bool((a > 0).all()):
        u = torch.where(a > 0, u, damp_a * c_transform(v, log_b, cost, eps, dim=2))
    if not bool((b > 0).all()):
        v = torch.where(b > 0, v, damp_b * c_transform(u, log_a, cost, eps, dim=1))
    return u, v, plan, n_iter, error
