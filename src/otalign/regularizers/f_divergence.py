r"""f-divergence penalties: reverse KL (with the k1/k2/k3 estimators), forward KL, JS, alpha, TV, chi^2.

For :math:`D_f(\pi_\theta \| \pi_{ref}) = \mathbb{E}_{\pi_{ref}}[f(\pi_\theta / \pi_{ref})]` and a token
:math:`y \sim \pi_\theta` with ratio :math:`x = \pi_\theta(y) / \pi_{ref}(y)`, the per-token penalty is the
one-sample estimate :math:`f(x)/x`, since :math:`\mathbb{E}_{y\sim\pi_\theta}[f(x)/x] = D_f` (WPR paper
Eq. 16 and Table 11). Each penalty is written in terms of the log-ratio :math:`r = \log x` with
``expm1``/``log1p`` so that it is accurate near :math:`x = 1` and finite for
:math:`|r| \le 80` (log-probabilities are floored at :data:`~otalign.regularizers.base.LOG_PROB_FLOOR`).
"""

from __future__ import annotations

import math

import torch

from .base import (
    DEFAULT_CHUNK_ELEMENTS,
    Evaluation,
    PenaltyOutput,
    Positions,
    Regularizer,
    StatAccumulator,
    SupportGradient,
    chunk_bounds,
)
from .common import LOG_PROB_FLOOR, describe
from .topk import TopKLogProbs

F_DIVERGENCES = ("rkl", "fkl", "js", "alpha", "tv", "chi2")
KL_ESTIMATORS = ("k1", "k2", "k3")
ALIASES = {"kl": "rkl"}


def f_over_x(log_ratio: torch.Tensor, kind: str, *, alpha: float = 0.5, estimator: str = "k1") -> torch.Tensor:
    r"""Per-token penalty :math:`f(x)/x` at :math:`x = e^r` for ``log_ratio`` :math:`r` (any shape).

    ============ =============================================== ==========================================
    kind         :math:`f(u)`                                    :math:`f(x)/x` in terms of :math:`r`
    ============ =============================================== ==========================================
    ``rkl``      :math:`u\log u`                                 k1: :math:`r`; k2: :math:`r^2/2`;
                                                                 k3: :math:`e^{-r} - 1 + r`
    ``fkl``      :math:`-\log u`                                 :math:`-r e^{-r}`
    ``js``       :math:`u\log u - (u+1)\log\frac{u+1}{2}`        :math:`r - (1+e^{-r})\log(1 + (e^r-1)/2)`
    ``alpha``    :math:`\frac{u^{1-a} - (1-a)u - a}{a(a-1)}`     :math:`\frac{(e^{-ar} - 1) - a(e^{-r}-1)}{a(a-1)}`
    ``tv``       :math:`\frac12|u-1|`                            :math:`\frac12|e^{-r} - 1|`
    ``chi2``     :math:`(u-1)^2`                                 :math:`-(e^r - 1)(e^{-r} - 1)`
    ============ =============================================== ==========================================

    ``estimator`` applies to ``rkl`` only: k1 and k3 are unbiased for :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})`
    under :math:`y \sim \pi_\theta` (k3 is nonnegative and has lower variance), k2 is biased but low-variance.
    """
    r = log_ratio
    if kind == "rkl":
        if estimator == "k1":
            return r.clone()
        if estimator == "k2":
            return 0.5 * r * r
        return torch.expm1(-r) + r
    if kind == "fkl":
        return -r * torch.exp(-r)
    if kind == "js":
        return r - (1.0 + torch.exp(-r)) * torch.log1p(0.5 * torch.expm1(r))
    if kind == "alpha":
        return (torch.expm1(-alpha * r) - alpha * torch.expm1(-r)) / (alpha * (alpha - 1.0))
    if kind == "tv":
        return 0.5 * torch.expm1(-r).abs()
    if kind == "chi2":
        return -torch.expm1(r) * torch.expm1(-r)
    raise ValueError(f"unknown f-divergence {kind!r}; choose one of {F_DIVERGENCES}")


def f_prime(log_ratio: torch.Tensor, kind: str, *, alpha: float = 0.5) -> torch.Tensor:
    r""":math:`f'(x)` at :math:`x = e^r`: the derivative of :math:`D_f = \sum_y b_y f(a_y/b_y)` in the policy's
    mass :math:`a_y` (any shape). rkl :math:`r + 1`; fkl :math:`-e^{-r}`; js :math:`r - \log(1 + (e^r - 1)/2)`;
    alpha :math:`-(e^{-ar} - 1)/a`; tv :math:`\tfrac12\mathrm{sign}(r)`; chi2 :math:`2(e^r - 1)`."""
    r = log_ratio
    if kind == "rkl":
        return r + 1.0
    if kind == "fkl":
        return -torch.exp(-r)
    if kind == "js":
        return r - torch.log1p(0.5 * torch.expm1(r))
    if kind == "alpha":
        return -torch.expm1(-alpha * r) / alpha
    if kind == "tv":
        return 0.5 * torch.sign(r)
    if kind == "chi2":
        return 2.0 * torch.expm1(r)
    raise ValueError(f"unknown f-divergence {kind!r}; choose one of {F_DIVERGENCES}")


def exact_f_divergence(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str, *, alpha: float = 0.5
) -> torch.Tensor:
    r""":math:`D_f(\pi_\theta\|\pi_{ref}) = \sum_y \pi_\theta(y)\, f(x_y)/x_y` over the last axis.

    Args:
        policy_logprobs: (..., V) normalised log-probabilities of the policy (``-inf`` allowed).
        ref_logprobs: (..., V) normalised log-probabilities of the reference.
        kind: one of :data:`F_DIVERGENCES`.
        alpha: the alpha-divergence's parameter.

    Returns:
        (...,) divergence of the distributions with both log-probabilities floored at
        :data:`LOG_PROB_FLOOR` (so a token one side rules out contributes a large finite amount instead
        of ``inf``); float32 for float32 inputs.
    """
    policy = policy_logprobs.clamp_min(LOG_PROB_FLOOR)
    ratio = ref_logprobs.clamp_min(LOG_PROB_FLOOR).neg_().add_(policy)
    terms = ratio if kind == "rkl" else f_over_x(ratio, kind, alpha=alpha)  # rkl (k1): f(x)/x is the log-ratio
    if torch.is_grad_enabled() and (policy.requires_grad or terms.requires_grad):
        return (policy.exp() * terms).sum(-1)
    return policy.exp_().mul_(terms).sum(-1)  # in place: three V-sized buffers instead of six


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    r"""GRPO's per-token KL estimate :math:`e^{\ell_{ref} - \ell} - (\ell_{ref} - \ell) - 1 \ge 0` from the sampled
    tokens' log-probabilities (any equal shapes; differentiable), floored at :data:`LOG_PROB_FLOOR`."""
    diff = ref_logprobs.clamp_min(LOG_PROB_FLOOR) - logprobs.clamp_min(LOG_PROB_FLOOR)
    return torch.expm1(diff) - diff


def canonical_kind(kind: str) -> str:
    """The f-divergence name for ``kind`` (``kl`` means ``rkl``); ``ValueError`` if unknown."""
    name = ALIASES.get(kind, kind)
    if name not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {kind!r}; choose one of {F_DIVERGENCES} (or 'kl' for 'rkl')")
    return name


class FDivergenceRegularizer(Regularizer):
    r"""Penalty :math:`f(x)/x` at the sampled token for one of the f-divergences of :func:`f_over_x`.

    Stats: ``penalty/mean``; ``kl/exact`` (the full-vocabulary :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})`) and
    ``<kind>/exact`` (the full-vocabulary :math:`D_f`), each averaged over the generated positions.

    From a top-k record (:meth:`evaluate_topk`) the sampled-token penalty is exact (it needs the two log-probabilities
    at the sampled token only); the exact divergences and the support gradient need the whole vocabulary, and are
    not estimated from a top-k (for the KL in a loss, the k3 estimator needs only the sampled token).

    Args:
        kind: ``rkl`` (alias ``kl``), ``fkl``, ``js``, ``alpha``, ``tv`` or ``chi2``.
        alpha: parameter of the alpha-divergence, in (0, 1) (0.5: the paper's choice).
        estimator: ``k1`` (log-ratio), ``k2`` or ``k3`` (reverse KL only).
        max_chunk_elements: see :class:`~otalign.regularizers.base.Regularizer`; a chunk holds
            ``max_chunk_elements // V`` positions.
    """

    def __init__(
        self,
        kind: str = "rkl",
        *,
        alpha: float = 0.5,
        estimator: str = "k1",
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(max_chunk_elements=max_chunk_elements)
        self.kind = canonical_kind(kind)
        self.name = self.kind
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
        if estimator != "k1" and self.kind != "rkl":
            raise ValueError(f"estimator={estimator!r} applies to the reverse KL only, not to {self.kind!r}")
        alpha = float(alpha)
        if self.kind == "alpha" and not (0.0 < alpha < 1.0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.alpha = alpha
        self.estimator = estimator

    @classmethod
    def from_config(cls, config, reference_model, **defaults) -> FDivergenceRegularizer:
        """From an RL config: ``f_alpha`` for the alpha-divergence, ``kl_estimator`` for the reverse KL."""
        kind = canonical_kind(defaults.get("kind", "rkl"))
        options = {"alpha": {"alpha": config.f_alpha}, "rkl": {"estimator": config.kl_estimator}}.get(kind, {})
        return cls(**{**defaults, **options})

    @property
    def distance_stat(self) -> str:
        """``<kind>/exact``: the full-vocabulary divergence per token (``rkl/exact`` is the KL)."""
        return f"{self.kind}/exact"

    def loss_term(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor | None:
        """The reverse KL's k3 estimate (:func:`k3`, as GRPO); None for the other divergences (the surrogate)."""
        return k3(logprobs, ref_logprobs) if self.kind == "rkl" else None

    def __repr__(self) -> str:
        extra = f", alpha={self.alpha}" if self.kind == "alpha" else ""
        extra += f", estimator={self.estimator!r}" if self.kind == "rkl" else ""
        return f"FDivergenceRegularizer({self.kind!r}{extra})"

    def evaluate_topk(self, record: TopKLogProbs, *, support_gradient: bool = False, check: bool = True) -> Evaluation:
        """The sampled-token penalty :math:`f(x)/x` from a top-k record: it needs only the two log-probabilities at
        the sampled token (:meth:`~otalign.regularizers.topk.TopKLogProbs.sampled_log_ratio`), so it equals
        :meth:`penalty`'s. Stats: ``penalty/mean`` only: the exact divergences sum over the whole vocabulary.

        Raises:
            NotImplementedError: with ``support_gradient``: the f-divergence's gradient covers the whole vocabulary
                (for the KL in a loss use the k3 estimator, which needs only the sampled token).
        """
        if not isinstance(record, TopKLogProbs):
            raise ValueError(f"record must be a TopKLogProbs, got {describe(record)}")
        if support_gradient:
            raise NotImplementedError(
                f"the {self.kind} support gradient needs the whole vocabulary (full logits); for the KL in a loss "
                "use the k3 estimator"
            )
        if check:
            record.check()
        with torch.no_grad():
            values = f_over_x(record.sampled_log_ratio(), self.kind, alpha=self.alpha, estimator=self.estimator)
            stats = StatAccumulator()
            stats.add_mean("penalty/mean", values)
        return Evaluation(PenaltyOutput(per_token=values.float(), stats=stats.result(record.count)), None)

    def _evaluate(
        self, positions: Positions, gradient: bool
    ) -> tuple[torch.Tensor, StatAccumulator, SupportGradient | None]:
        """One log-softmax per chunk of ``max_chunk_elements // V`` positions gives the penalties, the exact
        divergences and (when ``gradient``) the support gradient."""
        dtype = torch.promote_types(positions.policy_logits.dtype, torch.float32)
        device = positions.actions.device
        stats = StatAccumulator()
        values = torch.empty(positions.count, dtype=torch.float32, device=device)
        out = None
        if gradient:
            phi = torch.empty(positions.count, positions.vocab, dtype=dtype, device=device)
            value = torch.empty(positions.count, dtype=dtype, device=device)
            out = SupportGradient(tokens=None, distinct=None, phi=phi, dust=torch.zeros_like(value), value=value)
        for start, stop in chunk_bounds(positions.count, self.max_chunk_elements // positions.vocab):
            policy, ref = positions.log_probs(start, stop, dtype)
            sampled = positions.actions[start:stop, None]
            log_ratio = policy.gather(1, sampled).clamp_min(LOG_PROB_FLOOR) - ref.gather(1, sampled).clamp_min(
                LOG_PROB_FLOOR
            )
            values[start:stop] = f_over_x(log_ratio[:, 0], self.kind, alpha=self.alpha, estimator=self.estimator)
            exact = exact_f_divergence(policy, ref, self.kind, alpha=self.alpha)
            if self.kind == "rkl":
                stats.add_mean("kl/exact", exact)
            elif positions.kl_diagnostic:
                stats.add_mean("kl/exact", exact_f_divergence(policy, ref, "rkl"))
            stats.add_mean(f"{self.kind}/exact", exact)
            if out is not None:
                # phi = f'(pi / pi_ref) shifted (a constant per position: the same gradient along the simplex) so
                # that sum(pi * phi) = D_f
                full_ratio = policy.clamp_min(LOG_PROB_FLOOR) - ref.clamp_min(LOG_PROB_FLOOR)
                slope = f_prime(full_ratio, self.kind, alpha=self.alpha)
                out.phi[start:stop] = slope + (exact - (policy.exp() * slope).sum(-1))[:, None]
                out.value[start:stop] = exact
        return values, stats, out

    def _penalize(self, positions: Positions) -> tuple[torch.Tensor, StatAccumulator]:
        values, stats, _ = self._evaluate(positions, False)
        return values, stats

    def _support_gradient(self, positions: Positions) -> SupportGradient:
        """Over the whole vocabulary: ``phi = f'(pi/pi_ref) + c`` (:func:`f_prime`, log-probabilities floored as in
        :func:`exact_f_divergence`; ``c`` per position makes ``sum(pi * phi)`` the exact :math:`D_f`); no dust."""
        return self._evaluate(positions, True)[2]
