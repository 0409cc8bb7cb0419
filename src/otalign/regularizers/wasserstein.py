r"""The Wasserstein policy regularization (WPR) penalty: an entropic OT potential over token embeddings.

At each generated position, with policy :math:`a = \pi_\theta(\cdot)`, reference :math:`b = \pi_{ref}(\cdot)`
and the sampled token :math:`y` (docs/design.md, "WPR penalty"):

1. **Support.** :math:`S = \text{top-}k(a) \cup \text{top-}k(b) \cup \{y\}`, stored in ``2k + 1`` slots
   (slot 0 is :math:`y`); a slot repeating a token of an earlier slot is a *duplicate* and carries no mass,
   so the sampled token's slot always carries its mass. The mass outside :math:`S` of each distribution goes
   to one *dust* atom (the last slot). Duplicates are moved to the end and dropped where a whole chunk has
   them, so Sinkhorn runs on ``s + 1 <= 2k + 2`` atoms, ``s`` the largest number of distinct tokens.
2. **Cost.** :math:`C_{ij}` = Euclidean distance (or 1 - cosine similarity) of the embedding rows of the
   support, computed on the fly with one batched matmul. With ``knn = k1``, a pair is a neighbour pair iff
   :math:`C_{ij} \le \max(r_i, r_j)` with :math:`r_i` the distance of token :math:`i` to its k1-th nearest
   token (:func:`otalign.ot.knn_radius`): "j among the k1 nearest of i, or i among those of j".
3. **Dust.** :math:`C(\text{dust}, \text{dust}) = 0`, :math:`C(\text{dust}, i) = c_d` with :math:`c_d` the
   largest cost among the support's tokens (``dust_cost="max"``) or a given number.
   A non-neighbour pair costs :math:`2 c_d`, the price of the path :math:`i \to \text{dust} \to j`: the
   paper's :math:`+\infty` makes the truncated problem infeasible whenever the policy moves more mass
   between non-neighbours than the dust holds (its Sinkhorn then never converges and the potentials grow
   with the iteration count), which docs/design.md ("WPR penalty", 3) rules out. With finite costs every problem is
   feasible.
4. **Entropic OT** with :math:`\varepsilon = 1/\lambda` by :func:`otalign.ot.sinkhorn` (stabilised,
   with eps-scaling, stopping on the marginal error), all positions of a chunk in one batched call.
   The difference transport (:func:`_solve_difference`; ``transport="difference"``, and the solve under the
   default ``transport="smooth"``) moves only the mass the two distributions do not share: the policy's
   excess :math:`(a-b)_+` onto its deficit :math:`(b-a)_+` (Sinkhorn on the excess x deficit block only; an
   atom with neither, :math:`a_i = b_i > 0`, gets the soft c-transforms of that block's potentials),
   :math:`W = m\cdot\min \langle P,C\rangle + \varepsilon\,\mathrm{KL}(P\|\alpha\beta^\top)` with
   :math:`m` the total variation and :math:`\alpha,\beta` the normalised excess and deficit. For the
   metric costs used here the unregularised optimum leaves the shared mass in place, so both forms tend
   to :math:`W_1(a, b)` as :math:`\lambda\to\infty`; the difference form is 0 at :math:`a = b` and is
   solvable to tolerance at the paper's :math:`\lambda = 100`, where the full form is not (its plan is
   nearly diagonal, Sinkhorn needs tens of thousands of iterations and its potentials swing by whole
   cost units until then — measured on SmolLM2 embeddings, see ``benchmarks/penalty.py``).
   ``transport="full"`` (:func:`_solve_full`) keeps the paper's
   :math:`\mathrm{OT}_\varepsilon(a,b) = \min_{P1=a, P^\top 1=b} \langle P,C\rangle + \varepsilon\sum P(\log P-1)`.
5. **Penalty.** The gradient of the value with respect to the policy's masses along the simplex (the
   sign of docs/design.md ("WPR penalty", 5): large where the policy puts mass the reference lacks): difference form
   :math:`\phi_i = u_i` on excess atoms, :math:`-v_i` on deficit atoms (product-reference potentials,
   :func:`_solve_difference`); full form :math:`\phi = f` (:math:`P = e^{(f_i + g_j - C_{ij})/\varepsilon}`),
   averaged over the problem and its transpose (:func:`_solve_full` says why). Shifted per position by
   :math:`t` so that :math:`\sum_{i \in S \cup \{\text{dust}\}} a_i \phi_i` equals the value (docs/design.md, 6): the
   sampled token's :math:`\phi_y` is then an unbiased one-sample estimate of the distance.
   With ``debias=True`` (full form) the distance is the Sinkhorn divergence
   :math:`\mathrm{OT}_\varepsilon(a,b) - \frac12\mathrm{OT}_\varepsilon(a,a) - \frac12\mathrm{OT}_\varepsilon(b,b)`
   with gradient :math:`\phi = \frac12(f_{ab} + g_{ba}) - \frac12(f_{aa} + g_{aa})`, exactly zero when
   :math:`a = b`.
6. **Smoothing** (``transport="smooth"``, the default; :func:`smooth_distance`). The difference form is
   positively homogeneous in the moved mass, so its penalties stay of the order of the costs however close
   the policy is to the reference: an unbiased but pure-noise reward near the reference. The default
   distance is :math:`D = h_\tau(W)` with :math:`W` the difference-form value and the C1 blend
   :math:`h_\tau(W) = W^2 (2\tau - W)/\tau^2` for :math:`W < \tau`, :math:`W` beyond; its penalty
   :math:`h_\tau'(W)(\phi - W) + D` has a per-token spread that vanishes linearly with the distance
   (:class:`WassersteinRegularizer` gives the argument; ``docs/wpr-penalty.md`` the measurements).

Units: costs, potentials, values and penalties are in the cost's units (embedding distance).
The sampled token's mass is floored at :math:`e^{-80}` (:data:`~otalign.regularizers.base.LOG_PROB_FLOOR`):
a zero-mass atom has potential :math:`-\infty`, and :math:`\phi_y` contains :math:`\varepsilon\log a_y`,
so the floor bounds the penalty of a token the policy gave (numerically) no mass at about
:math:`-80\varepsilon` plus its transport term, instead of :math:`-\infty`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from otalign.ot import knn_radius, pairwise_cost, sinkhorn
from otalign.ot._scaling import c_transform

from .base import (
    DEFAULT_CHUNK_ELEMENTS,
    LOG_PROB_FLOOR,
    Positions,
    Regularizer,
    StatAccumulator,
    SupportGradient,
    chunk_bounds,
    describe,
)
from .embeddings import check_vocab_size, embedding_matrix
from .f_divergence import exact_f_divergence

METRICS = ("euclidean", "cosine")
KNN_RTOL = 1e-4
"""Relative slack of the neighbour test ``C_ij <= max(r_i, r_j)``, so that rounding differences between
the radii (computed once over the whole vocabulary) and the support's costs do not drop the k1-th
neighbour itself."""


@dataclass(frozen=True)
class Support:
    """Candidate support of each position, before duplicates are dropped.

    Attributes:
        tokens: (n, m) int64 token ids; slot 0 is the sampled token, then the policy's top-k, then the
            reference's top-k (``m = 2k + 1`` when built by :func:`select_support`).
        policy_logprobs: (n, m) float32 policy log-probabilities of the slots' tokens.
        ref_logprobs: (n, m) float32 reference log-probabilities.
        distinct: (n, m) bool, False where a slot repeats the token of an earlier slot.
    """

    tokens: torch.Tensor
    policy_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    distinct: torch.Tensor

    def __getitem__(self, rows: slice) -> Support:
        return Support(self.tokens[rows], self.policy_logprobs[rows], self.ref_logprobs[rows], self.distinct[rows])

    @staticmethod
    def cat(parts: list[Support]) -> Support:
        """Concatenate supports of equal width along the position axis."""
        return Support(*(torch.cat([getattr(p, name) for p in parts]) for name in Support.__dataclass_fields__))


@dataclass(frozen=True)
class TruncatedProblem:
    """Per-position truncated OT problems on ``s`` support slots plus one dust atom (the last index).

    Attributes:
        a: (n, s + 1) policy masses, summing to 1; slot 0 is the sampled token (mass floored at
            ``exp(LOG_PROB_FLOOR)``), duplicate slots have mass 0, the last entry is the dust.
        b: (n, s + 1) reference masses, same slots.
        cost: (n, s + 1, s + 1) float32 costs, all finite.
        tokens: (n, s) int64 token id of each support slot.
        distinct: (n, s) bool, False for duplicate (zero-mass padding) slots.
    """

    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    tokens: torch.Tensor
    distinct: torch.Tensor


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


def select_support(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, actions: torch.Tensor, top_k: int
) -> Support:
    """Slots ``[y, top-k(policy), top-k(reference)]`` with their log-probabilities and duplicate flags.

    Args:
        policy_logprobs: (n, V) float32 normalised log-probabilities of the policy.
        ref_logprobs: (n, V) float32 normalised log-probabilities of the reference.
        actions: (n,) int64 sampled tokens.
        top_k: k, 1 <= k <= V.

    Returns:
        :class:`Support` of width ``2k + 1``. Among equal tokens the earliest slot is the distinct one,
        so slot 0 (the sampled token) is always distinct.
    """
    tokens = torch.cat(
        [
            actions[:, None],
            policy_logprobs.topk(top_k, dim=-1, sorted=False).indices,
            ref_logprobs.topk(top_k, dim=-1, sorted=False).indices,
        ],
        dim=1,
    )
    ordered, order = tokens.sort(dim=1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    distinct = ~torch.empty_like(repeat).scatter_(1, order, repeat)
    return Support(tokens, policy_logprobs.gather(1, tokens), ref_logprobs.gather(1, tokens), distinct)


def compact(support: Support) -> Support:
    """Move each position's distinct slots first (keeping their order, so slot 0 stays the sampled token)
    and drop the slots that are duplicates at every position: width ``max_n(#distinct)``."""
    order = (~support.distinct).to(torch.uint8).argsort(dim=1, stable=True)
    width = int(support.distinct.sum(1).max()) if support.distinct.numel() else 1
    order = order[:, :width]
    return Support(*(getattr(support, name).gather(1, order) for name in Support.__dataclass_fields__))


def support_masses(support: Support) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference masses (n, s + 1) on the support slots plus dust (the mass outside).

    Duplicate slots get 0, the policy's sampled token (slot 0) at least ``exp(LOG_PROB_FLOOR)``.
    """
    policy = support.policy_logprobs.clone()
    policy[:, 0] = policy[:, 0].clamp_min(LOG_PROB_FLOOR)
    return _with_dust(policy, support.distinct), _with_dust(support.ref_logprobs, support.distinct)


def _with_dust(logprobs: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """Masses of the distinct slots and, appended, ``1 - their sum``; each row renormalised to sum to 1
    (float32 rounding of ``1 - sum``, or the floor, can break that by ~1e-7)."""
    mass = torch.where(distinct, logprobs.exp(), torch.zeros_like(logprobs))
    mass = torch.cat([mass, (1.0 - mass.sum(1, keepdim=True)).clamp_min(0.0)], dim=1)
    return mass / mass.sum(1, keepdim=True)


def support_cost(
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    *,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
    block_positions: int | None = None,
) -> torch.Tensor:
    """Ground costs (n, s + 1, s + 1) among the support tokens and the dust atom (the last index).

    Args:
        embeddings: (V, d) token embeddings, any float dtype (costs are computed in float32 or better).
        tokens: (n, s) int64 support tokens.
        metric: ``euclidean`` or ``cosine`` (1 - cosine similarity).
        radius: optional (V,) k1-NN radii; a pair with ``C_ij > max(r_i, r_j)`` (up to :data:`KNN_RTOL`)
            is not a neighbour pair and costs ``2 * dust_cost``.
        dust_cost: ``"max"`` (per position, the largest cost among the support's tokens) or a number >= 0.
        block_positions: positions per block of the (block, s, d) embedding gather (None: all at once).

    Returns:
        Costs in float32 (float64 for float64 embeddings), all finite; ``cost[:, -1, -1] = 0``.
    """
    n, s = tokens.shape
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    cost = torch.empty(n, s + 1, s + 1, dtype=dtype, device=tokens.device)
    for start, stop in chunk_bounds(n, block_positions or n):
        points = embeddings[tokens[start:stop]]
        pair = pairwise_cost(points, points, metric).to(dtype)
        dust = pair.amax(dim=(1, 2)) if dust_cost == "max" else torch.full_like(pair[:, 0, 0], float(dust_cost))
        if radius is not None:
            reach = radius[tokens[start:stop]].to(dtype)
            reach = torch.maximum(reach[:, :, None], reach[:, None, :]) * (1.0 + KNN_RTOL)
            pair = torch.where(pair <= reach, pair, 2.0 * dust[:, None, None])
        block = cost[start:stop]
        block[:, :s, :s] = pair
        block[:, :s, s] = dust[:, None]
        block[:, s, :s] = dust[:, None]
        block[:, s, s] = 0.0
    return cost


def truncated_problem(
    support: Support,
    embeddings: torch.Tensor,
    *,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
    block_positions: int | None = None,
) -> TruncatedProblem:
    """Compact ``support`` and assemble masses and costs (see :func:`support_masses`, :func:`support_cost`)."""
    support = compact(support)
    a, b = support_masses(support)
    cost = support_cost(
        embeddings, support.tokens, metric=metric, radius=radius, dust_cost=dust_cost, block_positions=block_positions
    )
    return TruncatedProblem(a=a, b=b, cost=cost, tokens=support.tokens, distinct=support.distinct)


def build_problem(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    top_k: int = 128,
    metric: str = "euclidean",
    radius: torch.Tensor | None = None,
    dust_cost: str | float = "max",
) -> TruncatedProblem:
    """The truncated OT problem :class:`WassersteinRegularizer` solves at each of ``n`` positions.

    Masses are float32, or float64 for float64 logits; costs float64 only for float64 embeddings.

    Args:
        policy_logits: (n, V) policy logits (or log-probabilities), any float dtype.
        ref_logits: (n, V) reference logits.
        actions: (n,) sampled token ids.
        embeddings: (V, d) token embeddings.
        top_k, metric, radius, dust_cost: as in :class:`WassersteinRegularizer` (``radius`` from
            :func:`otalign.ot.knn_radius`).
    """
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)
    policy = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    ref = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    support = select_support(policy, ref, actions.long(), top_k)
    return truncated_problem(support, embeddings, metric=metric, radius=radius, dust_cost=dust_cost)


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

    ``transport="difference"`` (:func:`_solve_difference`) moves only the mass the two distributions
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
        potential, value, n_iter, error, converged = _solve_difference(
            problem, lam, max_iter=max_iter, tol=tol, overrelaxation=overrelaxation, newton_steps=newton_steps
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


def _solve_difference(
    problem: TruncatedProblem,
    lam: float,
    *,
    max_iter: int,
    tol: float,
    overrelaxation: float = 1.0,
    newton_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    r"""Entropic transport of the policy's excess onto its deficit.

    With :math:`\delta^+ = (a - b)_+`, :math:`\delta^- = (b - a)_+` (equal masses :math:`m`, the total
    variation) and their normalisations :math:`\alpha = \delta^+/m`, :math:`\beta = \delta^-/m`:

    .. math::
        W(a, b) = m \cdot \min_{P1=\alpha,\ P^\top 1=\beta}
            \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, \alpha\beta^\top).

    For a metric cost (zero on the diagonal, triangle inequality — Euclidean/cosine distances with the dust
    priced as here) the unregularised problem leaves the shared mass in place, so :math:`W` tends to the
    full problem's :math:`W_1` as eps -> 0; it is 0 exactly when :math:`a = b`. Unlike the full problem,
    whose near-diagonal plan at eps << cost makes Sinkhorn converge only after tens of thousands of
    iterations (and its potentials swing by whole cost units meanwhile), the excess and deficit have
    disjoint supports, and Sinkhorn converges in hundreds.

    With potentials :math:`(u, v)` in the product-reference form
    :math:`P = \alpha_i\beta_j e^{(u_i + v_j - C_{ij})/\varepsilon}` (:attr:`~otalign.ot.SinkhornResult.u`),
    :math:`W = m(\langle\alpha, u\rangle + \langle\beta, v\rangle)`, and its gradient along the simplex
    is :math:`\phi_i = u_i` where :math:`a_i > b_i` and :math:`-v_i` where :math:`a_i < b_i` (the
    derivative of ``W`` along :math:`e_i - e_k` is :math:`\phi_i - \phi_k`); on an atom with
    :math:`a_i = b_i` (a kink) the midpoint :math:`(u_i - v_i)/2`. Positions with ``a == b``
    get value 0 and phi 0. The tolerance and the reported marginal error are in the policy's mass units
    (``m`` times the normalised problem's).

    Returns:
        ``(phi, value, n_iter, marginal_error, converged)``, phi (n, s + 1) unshifted, converged (n,) bool.
    """
    a, b, cost = problem.a, problem.b, problem.cost
    excess, deficit = (a - b).clamp_min(0.0), (b - a).clamp_min(0.0)
    excess_mass, deficit_mass = excess.sum(1, keepdim=True), deficit.sum(1, keepdim=True)
    moved = 0.5 * (excess_mass + deficit_mass)[:, 0]
    live = (excess_mass[:, 0] > 0) & (deficit_mass[:, 0] > 0)
    if not bool(live.any()):
        return torch.zeros_like(a), torch.zeros_like(moved), 0, torch.zeros_like(moved), torch.ones_like(live)
    # Each side normalised by its own sum, so that both are exactly balanced for the solver.
    alpha, beta = excess[live] / excess_mass[live], deficit[live] / deficit_mass[live]
    m = moved[live]
    # Excess and deficit have disjoint supports: Sinkhorn runs on the (excess x deficit) block only, about a
    # quarter of the (s + 1)^2 entries. Every atom with policy mass is on one side of it, except exact ties.
    eps, cost = 1.0 / lam, cost[live]
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
    return phi, value, solved.n_iter, error, converged


def _heaviest(mass: torch.Tensor) -> torch.Tensor:
    """(n, k) indices of each row's ``k`` largest entries, ``k`` the largest count of positive ones in a row (so
    they hold every positive one; the rest pad with zero-mass atoms)."""
    return mass.topk(max(int((mass > 0).sum(1).max()), 1), dim=1).indices


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


class WassersteinRegularizer(Regularizer):
    r"""The WPR penalty (module docstring) for PPO: ``penalty(policy_logits, ref_logits, actions, mask)``.

    **Default distance** (``transport="smooth"``). With :math:`W(a, b)` the difference-form value
    (:func:`_solve_difference`) and :math:`\tau` = ``smooth_tau`` (cost units), the distance at each position is

    .. math::
        D(a, b) = h_\tau(W(a, b)),\qquad
        h_\tau(W) = \begin{cases} W^2 (2\tau - W)/\tau^2 & W < \tau \\ W & W \ge \tau \end{cases}

    (:func:`smooth_distance`): exactly the difference-form distance once it exceeds :math:`\tau`, quadratic
    (:math:`\approx 2W^2/\tau`, second order in :math:`a - b` like the KL) below, 0 only at :math:`a = b`.
    **Gradient.** :math:`h_\tau` is C1, so along the simplex :math:`\nabla D = h_\tau'(W)\,\nabla W` with
    :math:`h_\tau'(W) = x(4 - 3x)`, :math:`x = \min(W/\tau, 1)`. With :math:`\phi` the difference form's
    penalties (shifted so that :math:`\sum_i a_i\phi_i = W`) the penalty of atom :math:`i` is

    .. math::
        \psi_i = h_\tau'(W)\,(\phi_i - W) + D, \qquad \textstyle\sum_i a_i \psi_i = D,

    so the sampled token's :math:`\psi_y` is an unbiased one-sample estimate of :math:`D` (and
    :meth:`solve` gives :math:`\psi` on the whole support + dust, for a penalty-in-the-loss surrogate
    :math:`\sum_i \pi_\theta(i)\psi_i`).
    **Variance.** :math:`W` is positively homogeneous in the moved mass (it is :math:`m` times a transport
    cost between the normalised excess and deficit), so :math:`\phi` is 0-homogeneous: its spread over
    tokens, :math:`\sigma_\phi = \mathrm{std}_{y\sim a}\,\phi_y`, stays of the order of the costs as
    :math:`b \to a`. The smooth penalty's spread is :math:`h_\tau'(W)\,\sigma_\phi \le 4 (W/\tau)\,\sigma_\phi`,
    and :math:`W \le m\,c_{max}` with :math:`m = \frac12\|a - b\|_1`: it vanishes linearly with the
    distance to the reference (policy logits at distance :math:`\delta` give :math:`m = O(\delta)`), and is
    the difference form's spread once :math:`W \ge \tau` (as :math:`\lambda` grows, :math:`D \to h_\tau(W_1)`,
    :math:`= W_1` wherever :math:`W_1 \ge \tau`). The default
    :math:`\tau` = :data:`SMOOTH_MASS` x the mean embedding distance (:func:`default_smooth_tau`: moving 5%
    of the mass a typical token distance) meets, on SmolLM2 embeddings at lambda = 100, a spread
    <= 1e-3 at logit noise 1e-6 and <= 1e-2 at 1e-4 (``benchmarks/penalty_noise.py``, ``docs/wpr-penalty.md``).
    It costs one difference-form solve, so it runs at that form's speed.

    Stats (means over generated positions unless noted): ``penalty/mean``; ``wasserstein/value`` (the
    distance: :math:`D` for ``smooth``, the entropic OT value, or the Sinkhorn divergence when debiased);
    ``sinkhorn/iters`` and ``sinkhorn/marginal_err`` (largest over chunks); ``sinkhorn/unconverged_frac`` (share of
    positions whose solve stopped at ``max_iter`` above ``tol``); ``wasserstein/support_size``
    (distinct support tokens, dust excluded); ``wasserstein/dust_mass`` (mass outside the support, averaged
    over policy and reference); ``kl/exact`` (full-vocabulary :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})`).

    Args:
        embeddings: (V, d) token embeddings defining the cost (e.g. :func:`embedding_matrix` of the
            reference model). Moved to the logits' device on first use.
        lam: lambda > 0; eps = 1 / lam in cost units (paper: 100).
        top_k: k2, tokens kept from each distribution, 1 <= k <= V (paper: 128).
        metric: ``euclidean`` (paper) or ``cosine``.
        knn: optional k1 (paper: 512): pairs that are not k1-nearest neighbours cost twice the dust cost.
        knn_cache_dir: folder caching the k1-NN radii under the embedding's content hash.
        dust_cost: ``"max"`` or a number >= 0 (module docstring, step 3).
        transport: ``"smooth"`` (default, above); ``"difference"``: the difference-form distance :math:`W`
            itself and its penalties :math:`\phi` (:func:`_solve_difference`; 0 at equality, converges at
            lambda = 100, but pure noise near the reference); ``"full"``: the paper's entropic OT between the
            whole distributions (:func:`_solve_full`), which at lambda * cost >> 1 needs far more than
            ``max_iter`` iterations (see ``sinkhorn/marginal_err``).
        smooth_tau: (``smooth``) :math:`\tau` in cost units, >= 0 (0: the difference form), or None
            (:func:`default_smooth_tau` of ``embeddings``); the value used is :attr:`tau`.
        max_iter: Sinkhorn iterations allowed at the target eps. With ``newton_steps`` (difference and smooth
            forms) this is where Sinkhorn hands the problems still above ``tol`` to Newton: the default 50 with
            ``tol`` 1e-7 and ``w`` 1.7 met ``benchmarks/penalty.py``'s accuracy guard at the lowest cost. The full
            form takes no Newton steps and needs ``max_iter`` in the thousands.
        tol: stopping tolerance on the L1 marginal error, in the policy's mass units. The per-token penalty's error
            is this times the problem's conditioning, which for nearly decoupled problems is large: 1e-5 left
            errors of 2e-3 in the benchmark, 1e-7 (below float32 Sinkhorn's resolution, so reached by Newton in
            float64) 3e-5.
        overrelaxation: Sinkhorn over-relaxation ``w`` in (0, 2) (:func:`otalign.ot.sinkhorn`): the same
            penalty in 3-4x fewer iterations at ``w`` = 1.7 (``benchmarks/penalty.py``); 1 is plain Sinkhorn.
        newton_steps: a position whose Sinkhorn solve is still above ``tol`` after ``max_iter`` iterations gets
            up to this many damped Newton steps on the dual in float64 (:mod:`otalign.ot.newton`), which converge
            quadratically where Sinkhorn stalls (nearly decoupled problems). 0 turns it off. Difference and
            smooth forms only (:func:`solve_problem`).
        debias: (``transport="full"``) penalize with the Sinkhorn divergence (zero at equality).
        max_chunk_elements: see :class:`~otalign.regularizers.base.Regularizer`. Log-softmax runs on
            ``max_chunk_elements // V`` positions at a time, Sinkhorn on ``max_chunk_elements // (c (2k+2)^2)``
            (c = 1 for the difference and smooth forms, 2 full, 4 debiased), the embedding gather on
            ``max_chunk_elements // ((2k+1) d)``.
    """

    name = "wasserstein"
    distance_stat = "wasserstein/value"

    @classmethod
    def from_config(cls, config, reference_model, **defaults) -> WassersteinRegularizer:
        """From an RL config's ``wpr_*`` fields, the cost embeddings taken from ``reference_model``
        (``wpr_embeddings``: its input or output embeddings)."""
        return cls(
            embedding_matrix(reference_model, source=config.wpr_embeddings).float(),
            **{
                **defaults,
                "lam": config.wpr_lambda,
                "top_k": config.wpr_top_k,
                "metric": config.wpr_metric,
                "knn": config.wpr_knn,
                "transport": config.wpr_transport,
                "smooth_tau": config.wpr_smooth_tau,
                "debias": config.wpr_debias,
                "max_iter": config.wpr_max_iter,
                "tol": config.wpr_tol,
                "overrelaxation": config.wpr_overrelaxation,
                "newton_steps": config.wpr_newton_steps,
            },
        )

    def __init__(
        self,
        embeddings: torch.Tensor,
        *,
        lam: float = 100.0,
        top_k: int = 128,
        metric: str = "euclidean",
        knn: int | None = None,
        knn_cache_dir: str | os.PathLike | None = None,
        dust_cost: str | float = "max",
        transport: str = "smooth",
        smooth_tau: float | None = None,
        max_iter: int = 50,
        tol: float = 1e-7,
        overrelaxation: float = 1.7,
        newton_steps: int = 20,
        debias: bool = False,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(max_chunk_elements=max_chunk_elements)
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be a floating-point (V, d) tensor, got {describe(embeddings)}")
        vocab = embeddings.shape[0]
        lam = float(lam)
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, V] = [1, {vocab}], got {top_k!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if dust_cost != "max":
            number = None if isinstance(dust_cost, (str, bool)) else float(dust_cost)
            if number is None or not (math.isfinite(number) and number >= 0):
                raise ValueError(f"dust_cost must be 'max' or a finite number >= 0, got {dust_cost!r}")
            dust_cost = number
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if debias and transport != "full":
            raise ValueError(f"debias=True needs transport='full' (transport={transport!r} is already 0 at equality)")
        if smooth_tau is not None:
            number = None if isinstance(smooth_tau, (str, bool)) else float(smooth_tau)
            if number is None or not (math.isfinite(number) and number >= 0):
                raise ValueError(f"smooth_tau must be None or a finite number >= 0, got {smooth_tau!r}")
            smooth_tau = number
        if max_iter < 1 or not tol > 0:
            raise ValueError(f"need max_iter >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
        if not 0 < overrelaxation < 2:
            raise ValueError(f"overrelaxation must be in (0, 2), got {overrelaxation}")
        if isinstance(newton_steps, bool) or not isinstance(newton_steps, int) or newton_steps < 0:
            raise ValueError(f"newton_steps must be an integer >= 0, got {newton_steps!r}")
        self.embeddings = embeddings.detach()
        self.radius = None
        if knn is not None:
            self.radius = knn_radius(self.embeddings, knn, metric=metric, cache_dir=knn_cache_dir)
        self.lam, self.top_k, self.metric, self.knn = lam, top_k, metric, knn
        self.dust_cost, self.max_iter, self.tol, self.debias = dust_cost, max_iter, tol, debias
        self.transport, self.overrelaxation, self.newton_steps = transport, float(overrelaxation), newton_steps
        self.tau = default_smooth_tau(self.embeddings, metric) if smooth_tau is None else smooth_tau
        """tau of the smooth form in cost units (used only when ``transport="smooth"``)."""

    def __repr__(self) -> str:
        return (
            f"WassersteinRegularizer(V={self.embeddings.shape[0]}, d={self.embeddings.shape[1]}, lam={self.lam}, "
            f"top_k={self.top_k}, metric={self.metric!r}, knn={self.knn}, dust_cost={self.dust_cost!r}, "
            f"transport={self.transport!r}, tau={self.tau:.4g}, debias={self.debias})"
        )

    def solve(self, problem: TruncatedProblem) -> WassersteinSolution:
        """Solve ``problem`` (e.g. from :func:`build_problem` with this regularizer's settings) as
        :meth:`penalty` does: ``.potential`` (n, s + 1) is the per-support gradient (the penalty of every
        support atom and the dust, ``-inf`` where the policy has no mass), ``.penalty`` the sampled token's,
        ``.value`` the distance."""
        return solve_problem(
            problem,
            self.lam,
            transport=self.transport,
            tau=self.tau,
            debias=self.debias,
            max_iter=self.max_iter,
            tol=self.tol,
            overrelaxation=self.overrelaxation,
            newton_steps=self.newton_steps,
        )

    def _penalize(self, positions: Positions) -> tuple[torch.Tensor, StatAccumulator]:
        check_vocab_size(self.embeddings, positions.vocab)
        device = positions.actions.device
        if self.embeddings.device != device:
            self.embeddings = self.embeddings.to(device)
            self.radius = None if self.radius is None else self.radius.to(device)
        stats = StatAccumulator()
        values = torch.empty(positions.count, dtype=torch.float32, device=device)
        if positions.count == 0:
            return values, stats

        parts = []
        for start, stop in chunk_bounds(positions.count, self.max_chunk_elements // positions.vocab):
            policy, ref = positions.log_probs(start, stop)
            stats.add_mean("kl/exact", exact_f_divergence(policy, ref, "rkl"))
            parts.append(select_support(policy, ref, positions.actions[start:stop], self.top_k))
        support = Support.cat(parts)

        slots = 2 * self.top_k + 2
        per_problem = slots * slots * (1 if self.transport != "full" else 4 if self.debias else 2)
        gather = self.max_chunk_elements // ((slots - 1) * self.embeddings.shape[1])
        for start, stop in chunk_bounds(positions.count, self.max_chunk_elements // per_problem):
            problem = truncated_problem(
                support[start:stop],
                self.embeddings,
                metric=self.metric,
                radius=self.radius,
                dust_cost=self.dust_cost,
                block_positions=max(1, gather),
            )
            solution = self.solve(problem)
            values[start:stop] = solution.penalty
            stats.add_mean("wasserstein/value", solution.value)
            stats.add_max("sinkhorn/iters", solution.n_iter)
            stats.add_max("sinkhorn/marginal_err", solution.marginal_error)
            stats.add_mean("sinkhorn/unconverged_frac", (~solution.converged).float())
            stats.add_mean("wasserstein/support_size", problem.distinct.sum(1))
            stats.add_mean("wasserstein/dust_mass", 0.5 * (problem.a[:, -1] + problem.b[:, -1]))
        return values, stats

    def _support_gradient(self, positions: Positions) -> SupportGradient:
        r"""The potentials :meth:`solve` returns (whose slot 0 is the sampled token's penalty; for ``smooth``
        :math:`h_\tau'(W)(\phi - W) + h_\tau(W)`, the gradient of :math:`h_\tau(W)` up to a constant) on the
        support slots and the dust, padded to ``2k + 1`` slots; slots without policy mass get phi 0."""
        check_vocab_size(self.embeddings, positions.vocab)
        device = positions.actions.device
        if self.embeddings.device != device:
            self.embeddings = self.embeddings.to(device)
            self.radius = None if self.radius is None else self.radius.to(device)
        dtype = torch.promote_types(positions.policy_logits.dtype, torch.float32)
        n, width = positions.count, 2 * self.top_k + 1
        tokens = torch.zeros(n, width, dtype=torch.long, device=device)
        distinct = torch.zeros(n, width, dtype=torch.bool, device=device)
        phi = torch.zeros(n, width, dtype=dtype, device=device)
        dust, value = torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)
        parts = [
            select_support(*positions.log_probs(start, stop, dtype), positions.actions[start:stop], self.top_k)
            for start, stop in chunk_bounds(n, self.max_chunk_elements // positions.vocab)
        ]
        support = Support.cat(parts) if parts else None
        per_problem = (width + 1) ** 2 * (1 if self.transport != "full" else 4 if self.debias else 2)
        for start, stop in chunk_bounds(n, self.max_chunk_elements // per_problem):
            problem = truncated_problem(
                support[start:stop], self.embeddings, metric=self.metric, radius=self.radius, dust_cost=self.dust_cost
            )
            solution = self.solve(problem)
            potential = torch.where(problem.a > 0, solution.potential, torch.zeros_like(solution.potential))
            s = problem.tokens.shape[1]
            tokens[start:stop, :s], distinct[start:stop, :s] = problem.tokens, problem.distinct
            phi[start:stop, :s], dust[start:stop] = potential[:, :s], potential[:, s]
            value[start:stop] = solution.value
        return SupportGradient(tokens=tokens, distinct=distinct, phi=phi, dust=dust, value=value)
