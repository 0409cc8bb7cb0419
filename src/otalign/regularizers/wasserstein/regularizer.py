"""The WPR penalty as a :class:`~otalign.regularizers.Regularizer`: one solve per position for the penalty, its
statistics and the support gradient, from full logits or from a top-k record."""

from __future__ import annotations

import math
import os
import re

import torch

from otalign.ot import knn_radius

from ..base import (
    DEFAULT_CHUNK_ELEMENTS,
    Evaluation,
    PenaltyOutput,
    Positions,
    Regularizer,
    StatAccumulator,
    SupportGradient,
    chunk_bounds,
)
from ..common import describe
from ..embeddings import check_vocab_size, embedding_matrix
from ..f_divergence import exact_f_divergence
from ..topk import TopKLogProbs
from .problem import METRICS, TruncatedProblem, topk_support, truncated_problem
from .solve import TRANSPORTS, WassersteinSolution, default_smooth_tau, solve_problem

CONFIG_FIELDS = {
    "lam": "wpr_lambda",
    "top_k": "wpr_top_k",
    "metric": "wpr_metric",
    "knn": "wpr_knn",
    "transport": "wpr_transport",
    "smooth_tau": "wpr_smooth_tau",
    "debias": "wpr_debias",
    "max_iter": "wpr_max_iter",
    "tol": "wpr_tol",
    "overrelaxation": "wpr_overrelaxation",
    "newton_steps": "wpr_newton_steps",
}
"""The RL config field (``--wpr_*`` option) that sets each argument of :class:`WassersteinRegularizer`."""


class WassersteinRegularizer(Regularizer):
    r"""The WPR penalty (module docstring) for PPO: ``penalty(policy_logits, ref_logits, actions, mask)``.

    **Default distance** (``transport="smooth"``). With :math:`W(a, b)` the difference-form value
    (:func:`otalign.ot.difference_transport`) and :math:`\tau` = ``smooth_tau`` (cost units), the distance at each
    position is

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
            reference model). Copied to the logits' device on first use (the copy is kept for later calls).
        lam: lambda > 0; eps = 1 / lam in cost units (paper: 100).
        top_k: k2, tokens kept from each distribution, 1 <= k <= V (paper: 128).
        metric: ``euclidean`` (paper) or ``cosine``.
        knn: optional k1 (paper: 512): pairs that are not k1-nearest neighbours cost twice the dust cost.
        knn_cache_dir: folder caching the k1-NN radii under the embedding's content hash.
        dust_cost: ``"max"`` or a number >= 0 (module docstring, step 3).
        transport: ``"smooth"`` (default, above); ``"difference"``: the difference-form distance :math:`W`
            itself and its penalties :math:`\phi` (:func:`otalign.ot.difference_transport`; 0 at equality, converges at
            lambda = 100, but pure noise near the reference); ``"full"``: the paper's entropic OT between the
            whole distributions (:func:`.solve._solve_full`), which at lambda * cost >> 1 needs far more than
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
        """From an RL config's ``wpr_*`` fields (:data:`CONFIG_FIELDS`), the cost embeddings taken from
        ``reference_model`` (``wpr_embeddings``: its input or output embeddings). A ``ValueError`` names the config
        fields (``wpr_top_k``), not the arguments they feed (``top_k``)."""
        embeddings = embedding_matrix(reference_model, source=config.wpr_embeddings).float()
        options = {argument: getattr(config, name) for argument, name in CONFIG_FIELDS.items()}
        try:
            return cls(embeddings, **{**defaults, **options})
        except ValueError as err:
            pattern = rf"\b({'|'.join(CONFIG_FIELDS)})\b"
            raise ValueError(re.sub(pattern, lambda m: CONFIG_FIELDS[m.group(1)], str(err))) from None

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
        finite = torch.isfinite(embeddings).all(-1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise ValueError(
                f"embeddings row {row} (token id {row}) has NaN or inf entries; the cost needs finite ones"
            )
        vocab = embeddings.shape[0]
        lam = float(lam)
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, V] = [1, {vocab}], got {top_k!r}")
        if knn is not None and (isinstance(knn, bool) or not isinstance(knn, int) or not 1 <= knn < vocab):
            raise ValueError(f"knn must be None or an integer in [1, V-1] = [1, {vocab - 1}], got {knn!r}")
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
        self._moved: tuple[torch.device, torch.Tensor, torch.Tensor | None] | None = None
        """The embeddings and radii copied to another device (:meth:`_embeddings_on`)."""
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

    def evaluate_topk(self, record: TopKLogProbs, *, support_gradient: bool = False, check: bool = True) -> Evaluation:
        """The penalty, its statistics and (with ``support_gradient``) the support gradient from a top-k record, with
        no V-sized tensor: the support is the record's ``[y | policy top-k | reference top-k]``, the dust what its
        distinct ids do not hold. With the record of :meth:`TopKLogProbs.from_log_probs
        <otalign.regularizers.topk.TopKLogProbs.from_log_probs>` at this regularizer's ``top_k`` the answer is the
        full-logits call's (:meth:`evaluate`, which is this method on records built from one log-softmax per chunk).

        Args:
            record: :class:`~otalign.regularizers.topk.TopKLogProbs` of N positions, on any device (validated by
                :meth:`~otalign.regularizers.topk.TopKLogProbs.check` against the embeddings' vocabulary).
            support_gradient: also return the :class:`SupportGradient` (width ``1 + k_p + k_r``).
            check: validate the record first (False for a record built by ``TopKLogProbs.from_log_probs``).

        Returns:
            :class:`Evaluation` with ``penalty.per_token`` (N,) float32 and the stats of :class:`WassersteinRegularizer`
            except ``kl/exact`` (it needs the whole vocabulary).
        """
        if not isinstance(record, TopKLogProbs):
            raise ValueError(f"record must be a TopKLogProbs, got {describe(record)}")
        if check:
            record.check(vocab=self.embeddings.shape[0])
        with torch.no_grad():
            stats = StatAccumulator()
            values, gradient = self._solve_record(record, stats, support_gradient)
            stats.add_mean("penalty/mean", values)
        return Evaluation(PenaltyOutput(per_token=values, stats=stats.result(record.count)), gradient)

    def _evaluate(
        self, positions: Positions, gradient: bool
    ) -> tuple[torch.Tensor, StatAccumulator, SupportGradient | None]:
        """The full-logits path: one log-softmax per chunk of ``max_chunk_elements // V`` positions gives ``kl/exact``
        and the top-k record; then :meth:`_solve_record` on the records of all chunks."""
        check_vocab_size(self.embeddings, positions.vocab)
        dtype = torch.promote_types(positions.policy_logits.dtype, torch.float32)
        stats, records = StatAccumulator(), []
        for start, stop in chunk_bounds(positions.count, self.max_chunk_elements // positions.vocab):
            policy, ref = positions.log_probs(start, stop, dtype)
            if positions.kl_diagnostic:
                stats.add_mean("kl/exact", exact_f_divergence(policy, ref, "rkl"))
            records.append(TopKLogProbs.from_log_probs(policy, ref, positions.actions[start:stop], self.top_k))
        if not records:
            values = torch.empty(0, dtype=torch.float32, device=positions.actions.device)
            return values, stats, self._empty_gradient(positions.actions.device, dtype) if gradient else None
        values, out = self._solve_record(TopKLogProbs.cat(records), stats, gradient)
        return values, stats, out

    def _penalize(self, positions: Positions) -> tuple[torch.Tensor, StatAccumulator]:
        values, stats, _ = self._evaluate(positions, False)
        return values, stats

    def _support_gradient(self, positions: Positions) -> SupportGradient:
        r"""The potentials :meth:`solve` returns (whose slot 0 is the sampled token's penalty; for ``smooth``
        :math:`h_\tau'(W)(\phi - W) + h_\tau(W)`, the gradient of :math:`h_\tau(W)` up to a constant) on the
        support slots and the dust, padded to ``2k + 1`` slots; slots without policy mass get phi 0."""
        return self._evaluate(positions, True)[2]

    def _solve_record(
        self, record: TopKLogProbs, stats: StatAccumulator, gradient: bool
    ) -> tuple[torch.Tensor, SupportGradient | None]:
        """The one chunked path: build and solve the problems of ``max_chunk_elements // (c (w + 1)^2)`` positions
        at a time (``w = 1 + k_p + k_r`` slots, c = 1 for the difference and smooth forms, 2 full, 4 debiased;
        embeddings gathered ``max_chunk_elements // (w d)`` positions at a time), adding the stats to ``stats``.

        Returns:
            The penalties (N,) float32 and, when ``gradient``, the :class:`SupportGradient` padded to ``w`` slots.
        """
        device = record.actions.device
        embeddings, radius = self._embeddings_on(device)
        support = topk_support(record)
        n, width = support.tokens.shape
        values = torch.empty(n, dtype=torch.float32, device=device)
        out = self._empty_gradient(device, support.policy_logprobs.dtype, n, width) if gradient else None
        per_problem = (width + 1) ** 2 * (1 if self.transport != "full" else 4 if self.debias else 2)
        gather = max(1, self.max_chunk_elements // (width * embeddings.shape[1]))
        for start, stop in chunk_bounds(n, self.max_chunk_elements // per_problem):
            problem = truncated_problem(
                support[start:stop],
                embeddings,
                metric=self.metric,
                radius=radius,
                dust_cost=self.dust_cost,
                block_positions=gather,
            )
            solution = self.solve(problem)
            values[start:stop] = solution.penalty
            stats.add_mean("wasserstein/value", solution.value)
            stats.add_max("sinkhorn/iters", solution.n_iter)
            stats.add_max("sinkhorn/marginal_err", solution.marginal_error)
            stats.add_mean("sinkhorn/unconverged_frac", (~solution.converged).float())
            stats.add_mean("wasserstein/support_size", problem.distinct.sum(1))
            stats.add_mean("wasserstein/dust_mass", 0.5 * (problem.a[:, -1] + problem.b[:, -1]))
            if out is not None:
                potential = torch.where(problem.a > 0, solution.potential, torch.zeros_like(solution.potential))
                s = problem.tokens.shape[1]
                out.tokens[start:stop, :s], out.distinct[start:stop, :s] = problem.tokens, problem.distinct
                out.phi[start:stop, :s], out.dust[start:stop] = potential[:, :s], potential[:, s]
                out.value[start:stop] = solution.value
        return values, out

    def _empty_gradient(self, device: torch.device, dtype: torch.dtype, n: int = 0, width: int | None = None):
        """A zero :class:`SupportGradient` of ``n`` positions and ``width`` slots (default ``2k + 1``), to fill."""
        width = 2 * self.top_k + 1 if width is None else width
        zeros = torch.zeros(n, dtype=dtype, device=device)
        return SupportGradient(
            tokens=torch.zeros(n, width, dtype=torch.long, device=device),
            distinct=torch.zeros(n, width, dtype=torch.bool, device=device),
            phi=torch.zeros(n, width, dtype=dtype, device=device),
            dust=zeros,
            value=zeros.clone(),
        )

    def _embeddings_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings and k1-NN radii on ``device``: ``self.embeddings`` itself there, else a copy made on first
        use and kept for the next call (``self.embeddings`` is never replaced)."""
        if self.embeddings.device == device:
            return self.embeddings, self.radius
        if self._moved is None or self._moved[0] != device:
            radius = None if self.radius is None else self.radius.to(device)
            self._moved = (device, self.embeddings.to(device), radius)
        return self._moved[1], self._moved[2]
