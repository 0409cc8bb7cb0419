r"""Solving the truncated problems: the difference, full and smooth transports on top of :mod:`otalign.ot`.

Steps 4-6 of :mod:`otalign.regularizers.wasserstein`: one batched solve per chunk of positions, the policy-side
potentials shifted so that :math:`\sum_i a_i\phi_i` is the distance, and the smoothing :math:`h_\tau` of the
default ``transport="smooth"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from otalign.ot import difference_transport, pairwise_cost, sinkhorn

from .problem import TruncatedProblem


@dataclass(frozen=True)
class WassersteinSolution:
    """Shifted potentials and values of a batch of truncated problems.

    Attributes:
        potential: (n, s + 1) policy-side potential ``phi`` shifted so that ``sum(a * phi) == value``;
            ``-inf`` on slots with no policy mass. ``potential[:, 0]`` is the sampled token's penalty.
        value: (n,) entropic OT value (the Sinkhorn divergence when debiased), cost units.
        n_iter: Sinkhorn iterations at the target eps (eps-scaling excluded).
        marginal_error: (n,) L1 row-marginal error of the solved plan(s), mass units (the largest of the
            three problems when debiased).
        converged: (n,) bool, False where a Sinkhorn problem of the position stopped at ``max_iter`` above
            ``tol`` (its value and potential are approximate); True at positions with nothing to move.
    """

    potential: torch.Tensor
    value: torch.Tensor
    n_iter: int
    marginal_error: torch.Tensor
    converged: torch.Tensor

    @property
    def penalty(self) -> torch.Tensor:
        """(n,) the sampled token's shifted potential."""
        return self.potential[:, 0]


TRANSPORTS = ("smooth", "difference", "full")
SMOOTH_MASS = 0.05
"""Default smoothing scale of ``transport="smooth"`` as a share of moved mass: ``tau`` is this times the mean
embedding distance (:func:`default_smooth_tau`), the difference-form distance of moving 5% of the mass a
typical token distance."""


def default_smooth_tau(
    embeddings: torch.Tensor, metric: str = "euclidean", *, mass: float = SMOOTH_MASS, sample: int = 1024
) -> float:
    """``mass`` times the mean cost between distinct embedding rows, from ``sample`` evenly spaced rows.

    Args:
        embeddings: (V, d) token embeddings.
        metric: ``euclidean`` or ``cosine``, as the cost.
        mass: share of moved mass, >= 0.
        sample: rows used (all when V <= sample), spaced evenly over the vocabulary (deterministic).

    Returns:
        tau in cost units (0 for a single row).
    """
    vocab = embeddings.shape[0]
    if vocab < 2:
        return 0.0
    rows = torch.linspace(0, vocab - 1, min(vocab, sample), device=embeddings.device).round().long().unique()
    points = embeddings[rows].to(torch.promote_types(embeddings.dtype, torch.float32))
    cost = pairwise_cost(points, points, metric)
    count = rows.numel()
    return float(mass * (cost.sum() - cost.diagonal().sum()) / (count * (count - 1)))


def smooth_distance(value: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The C1 blend :math:`h_\tau` of ``transport="smooth"`` and its derivative, elementwise.

    .. math::
        h_\tau(W) = \begin{cases} W^2 (2\tau - W)/\tau^2 & 0 \le W < \tau \\ W & W \ge \tau \end{cases},
        \qquad h_\tau'(W) = x(4 - 3x),\ x = \min(W/\tau, 1).

    :math:`h(0) = h'(0) = 0`, :math:`h(\tau) = \tau`, :math:`h'(\tau) = 1`; :math:`0 \le h(W) \le W`
    (:math:`W - h = W(\tau - W)^2/\tau^2`) and :math:`0 \le h' \le 4/3` (largest at :math:`W = 2\tau/3`).
    Negative values (solver rounding) map to 0. ``tau = 0`` is the identity.

    Returns:
        ``(h(value), h'(value))``, each shaped like ``value`` (cost units, and unitless).
    """
    if tau <= 0:
        return value, torch.ones_like(value)
    x = (value / tau).clamp(0.0, 1.0)
    inside = value < tau
    distance = torch.where(inside, value.clamp_min(0.0) * x * (2.0 - x), value)
    return distance, torch.where(inside, x * (4.0 - 3.0 * x), torch.ones_like(value))


def solve_problem(
    problem: TruncatedProblem,
    lam: float,
    *,
    transport: str = "difference",
    tau: float | None = None,
    debias: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-4,
    overrelaxation: float = 1.0,
    newton_steps: int = 0,
) -> WassersteinSolution:
    r"""Solve a batch of truncated problems and shift the policy-side potentials so that
    ``sum_i a_i phi_i`` equals the value (the module docstring, steps 5 and 6).

    ``transport="difference"`` (:func:`otalign.ot.difference_transport`) moves only the mass the two distributions
    do not share; ``"smooth"`` is its distance through :func:`smooth_distance`, with penalty
    :math:`h_\tau'(W)(\phi - W) + h_\tau(W)` (:class:`WassersteinRegularizer`); ``"full"``
    (:func:`_solve_full`) is the entropic OT between the whole distributions.

    The returned ``potential`` is the per-support gradient (penalty of every support atom and the dust);
    ``penalty`` (slot 0) is the sampled token's. Use this one function for both, so that they agree.
    The regularizer's default (``smooth``, its :attr:`~WassersteinRegularizer.tau`) is
    :meth:`WassersteinRegularizer.solve`; this function's default is the plain difference form.

    Args:
        problem: the problems (n positions).
        lam: lambda; eps = 1 / lam.
        transport: ``smooth``, ``difference`` or ``full``.
        tau: (``smooth`` only, required) the smoothing scale in cost units, >= 0 (:func:`default_smooth_tau`).
        debias: (``full`` only) use the Sinkhorn divergence.
        max_iter: Sinkhorn iterations allowed at the target eps.
        tol: stop once every problem's L1 marginal error is <= tol (mass units of the policy).
        overrelaxation: Sinkhorn over-relaxation ``w`` in (0, 2) (:func:`otalign.ot.sinkhorn`; 1: plain).
        newton_steps: (``difference`` and ``smooth``) Newton steps at most for a problem still above ``tol``
            after ``max_iter`` iterations (:func:`otalign.ot.sinkhorn`; 0: none). The full form has no use for
            them: its near-diagonal plan couples the atoms only through entries of order exp(-C/eps), so its
            Hessian is numerically singular in every atom's direction.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport == "smooth" and (tau is None or not (math.isfinite(tau) and tau >= 0)):
        raise ValueError(
            f"transport='smooth' needs tau, a finite number >= 0 in cost units (see default_smooth_tau), got {tau!r}"
        )
    if transport != "full":
        if debias:
            raise ValueError(f"debias applies to transport='full'; transport={transport!r} is already 0 at equality")
        solved = difference_transport(
            problem.a,
            problem.b,
            problem.cost,
            1.0 / lam,
            max_iter=max_iter,
            tol=tol,
            overrelaxation=overrelaxation,
            newton_steps=newton_steps,
        )
        potential, value, n_iter, error, converged = (
            solved.phi,
            solved.value,
            solved.n_iter,
            solved.marginal_error,
            solved.converged,
        )
    else:
        potential, value, n_iter, error, converged = _solve_full(
            problem, lam, debias=debias, max_iter=max_iter, tol=tol, overrelaxation=overrelaxation
        )
    a = problem.a
    held = a > 0
    potential = torch.where(held, potential, torch.full_like(potential, -math.inf))
    shift = value - torch.where(held, a * potential, torch.zeros_like(potential)).sum(1)
    potential = potential + shift[:, None]
    if transport == "smooth":
        distance, slope = smooth_distance(value, tau)
        smoothed = slope[:, None] * (potential - value[:, None]) + distance[:, None]
        potential, value = torch.where(held, smoothed, potential), distance
    return WassersteinSolution(
        potential=potential, value=value, n_iter=n_iter, marginal_error=error, converged=converged
    )


def _solve_full(
    problem: TruncatedProblem,
    lam: float,
    *,
    debias: bool,
    max_iter: int,
    tol: float,
    overrelaxation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    r"""The paper's entropic OT between the whole truncated distributions, one batched Sinkhorn call.

    The policy's potential is the average :math:`\phi = \frac12(f_{ab} + g_{ba})` of its potentials in
    :math:`\mathrm{OT}(a, b)` and in the transposed problem :math:`\mathrm{OT}(b, a)` (the costs are
    symmetric). Both are gradients of the same value, but at small eps (lambda * cost >> 1) Sinkhorn
    leaves the split of :math:`f_i + g_i` between the two sides of a token that is (nearly) balanced,
    :math:`a_i \approx b_i`, at whatever its alternating updates reached: the potentials of a
    single solve can be off by a sizeable fraction of the costs when the policy is close to the reference.
    Averaging the two orders cancels that split (exactly when :math:`a = b`), at twice the Sinkhorn work.
    With ``debias`` the self terms use :math:`\frac12(f_{aa} + g_{aa})`, which has no such ambiguity.

    Returns:
        ``(phi, value, n_iter, marginal_error, converged)``, phi (n, s + 1) unshifted, -inf where ``a`` is 0;
        a position has converged when all its problems have.
    """
    a, b, cost = problem.a, problem.b, problem.cost
    firsts, seconds = [a, b], [b, a]
    if debias:
        firsts, seconds = firsts + [a, b], seconds + [a, b]
    solved = sinkhorn(
        torch.cat(firsts),
        torch.cat(seconds),
        cost.repeat(len(firsts), 1, 1),
        1.0 / lam,
        max_iter=max_iter,
        tol=tol,
        overrelaxation=overrelaxation,
    )
    f, g = solved.f.unflatten(0, (len(firsts), -1)), solved.g.unflatten(0, (len(firsts), -1))
    values = solved.value.unflatten(0, (len(firsts), -1))
    potential = 0.5 * (f[0] + g[1])
    value = 0.5 * (values[0] + values[1])
    if debias:
        potential = potential - 0.5 * (f[2] + g[2])
        value = value - 0.5 * (values[2] + values[3])
    error = solved.marginal_error.unflatten(0, (len(firsts), -1)).amax(0)
    converged = solved.converged.unflatten(0, (len(firsts), -1)).all(0)
    return potential, value, solved.n_iter, error, converged
