"""The regularizer interface, its output, and the input checks and chunking every penalty shares.

A regularizer turns the policy's and the reference's next-token logits at the generated positions of
a batch of rollouts into one penalty per position; a PPO trainer multiplies it by ``-beta`` and adds
it to the reward there. Everything runs under ``torch.no_grad`` and in chunks of positions, so the
memory a penalty needs beyond its inputs is bounded by the chunk, never by ``B * T * V``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .common import describe
from .topk import TopKLogProbs

DEFAULT_CHUNK_ELEMENTS = 2**24
"""Default bound on the elements of the largest per-chunk tensor (``positions x V`` for log-softmax,
``positions x support^2`` for Sinkhorn): 64 MiB in float32."""


@dataclass(frozen=True)
class PenaltyOutput:
    """Per-position penalties for a batch of rollouts.

    Attributes:
        per_token: (B, T) float32; the penalty at each generated position (0 where ``mask`` is False).
            The trainer adds ``-beta * per_token`` to the reward. From :meth:`Regularizer.evaluate_topk`: (N,), one
            per position of the record (``per_token_bt[mask] = per_token`` puts them on a (B, T) grid when the
            record lists the positions of ``mask`` in row-major order).
        stats: scalars for logging with slash names (``penalty/mean``, ``kl/exact``, ...), averaged over
            the generated positions unless a name says otherwise; 0.0 when no position is generated.
    """

    per_token: torch.Tensor
    stats: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """A regularizer's penalty and, when asked for, its support gradient, from one solve per position.

    Attributes:
        penalty: the :class:`PenaltyOutput` of :meth:`Regularizer.penalty` (``per_token`` (N,) from
            :meth:`Regularizer.evaluate_topk`).
        gradient: the :class:`SupportGradient` of :meth:`Regularizer.support_gradient` over the N generated
            positions in row-major (b, t) order (the record's order from :meth:`Regularizer.evaluate_topk`), or None
            when not asked for.
    """

    penalty: PenaltyOutput
    gradient: SupportGradient | None


@dataclass(frozen=True)
class Positions:
    """The generated positions of a batch, selected lazily from (B, T, V) logits.

    Attributes:
        policy_logits: (B, T, V) policy logits, any float dtype, possibly non-contiguous.
        ref_logits: (B, T, V) reference logits.
        actions: (N,) int64 sampled tokens at the selected positions.
        batch_index: (N,) batch coordinate of each selected position.
        time_index: (N,) time coordinate of each selected position.
        normalized: the logits are normalised log-probabilities already (no log-softmax needed).
        kl_diagnostic: compute the ``kl/exact`` statistic (a caller that measures the KL itself turns it off).
    """

    policy_logits: torch.Tensor
    ref_logits: torch.Tensor
    actions: torch.Tensor
    batch_index: torch.Tensor
    time_index: torch.Tensor
    normalized: bool = False
    kl_diagnostic: bool = True

    @property
    def count(self) -> int:
        return self.actions.shape[0]

    @property
    def vocab(self) -> int:
        return self.policy_logits.shape[-1]

    def log_probs(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-softmax (in ``dtype``) of both logits at positions ``start:stop``: two (stop - start, V) tensors (the
        logits themselves, cast, when they are :attr:`normalized`)."""
        rows = (self.batch_index[start:stop], self.time_index[start:stop])
        if self.normalized:
            return self.policy_logits[rows].to(dtype), self.ref_logits[rows].to(dtype)
        policy = torch.log_softmax(self.policy_logits[rows].to(dtype), dim=-1)
        ref = torch.log_softmax(self.ref_logits[rows].to(dtype), dim=-1)
        return policy, ref


@dataclass(frozen=True)
class SupportGradient:
    r"""The gradient of a regularizer's distance with respect to the policy's next-token masses, at N positions.

    At a position let :math:`a(\theta)` be the policy's masses on the support slots and one dust atom (the mass
    outside the support, :math:`1 - \sum_i a_i`), :math:`b` the reference's, and :math:`D(\theta) = D(a(\theta), b)`
    the regularizer's distance (the entropic Wasserstein value, or :math:`D_f = \sum_i b_i f(a_i/b_i)`).
    ``phi`` is its gradient along the simplex, :math:`\phi_i = \partial D/\partial a_i` up to one constant.

    **The surrogate** :math:`S(\theta) = \sum_{i \in S\cup\{dust\}} a_i(\theta)\,\phi_i` with ``phi`` held
    fixed (detached) has :math:`\nabla_\theta S = \nabla_\theta D` at the point where ``phi`` was computed.

    *Proof.* By the chain rule :math:`\nabla_\theta D = \sum_i (\partial D/\partial a_i)\,\nabla_\theta a_i`.
    (1) f-divergences: :math:`\partial D_f/\partial a_i = f'(a_i/b_i)` in closed form. (2) Entropic OT:
    :math:`\mathrm{OT}_\varepsilon(a, b) = \max_{f,g} F(f, g; a, b)` with the concave dual
    :math:`F = \langle a, f\rangle + \langle b, g\rangle - \varepsilon\sum_{ij} a_i b_j (K_{ij} - 1)`,
    :math:`K_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}`.
    By the envelope theorem (Danskin) the derivative of the optimal value in the parameter :math:`a` is the
    partial derivative of :math:`F` at the optimum :math:`(f^*, g^*)`, which need not be differentiated:
    :math:`\partial_{a_i}\mathrm{OT}_\varepsilon = f^*_i - \varepsilon\sum_j b_j (K^*_{ij} - 1) = f^*_i`,
    the sum vanishing by the optimality condition :math:`\sum_j b_j K^*_{ij} = 1`.
    The difference transport is the same argument on the excess/deficit problem, whose solver returns the
    simplex gradient directly. In every case :math:`\phi = \nabla_a D + c\,\mathbf 1` for some constant
    :math:`c`, and :math:`c` drops out: :math:`\sum_i \nabla_\theta a_i = \nabla_\theta 1 = 0` because the
    support and the dust partition the vocabulary. Hence
    :math:`\nabla_\theta S = \sum_i \phi_i\nabla_\theta a_i = \sum_i (\partial D/\partial a_i)\nabla_\theta a_i
    = \nabla_\theta D`. :math:`\square` It holds at the solver's optimum: an unconverged Sinkhorn leaves an
    error of the order of its marginal error times the costs. The support is held fixed: it is a piecewise-constant
    function of the logits, so :math:`D` restricted to it is what is differentiated (exactly :math:`D` when
    the support is the whole vocabulary).

    Attributes:
        tokens: (N, s) int64 support token ids, or None for the whole vocabulary (slot j is token j, s = V,
            no dust mass).
        distinct: (N, s) bool, False on padding or duplicate slots (phi 0 there; their mass belongs to the
            dust); None when ``tokens`` is None.
        phi: (N, s) the gradient on each slot, detached, in the distance's units per unit mass; 0 where the
            policy has no mass (there :math:`\nabla a_i = 0`).
        dust: (N,) phi of the dust atom (0 without dust).
        value: (N,) the distance :math:`D` at each position; ``phi`` is shifted so that
            :math:`\sum_i a_i\phi_i` equals it (the surrogate's value is the distance).
    """

    tokens: torch.Tensor | None
    distinct: torch.Tensor | None
    phi: torch.Tensor
    dust: torch.Tensor
    value: torch.Tensor

    def surrogate(self, policy_logprobs: torch.Tensor) -> torch.Tensor:
        r"""(N,) :math:`S = \sum_i \pi(i)\,\phi_i + (1 - \sum_i \pi(i))\,\phi_{dust}`, differentiable in
        ``policy_logprobs`` (N, V), the policy's normalised log-probabilities at the same positions."""
        if self.tokens is None:
            probs = policy_logprobs.exp()
            return (probs * self.phi.to(probs.dtype)).sum(-1)
        return self.surrogate_at_slots(policy_logprobs.gather(-1, self.tokens))

    def surrogate_at_slots(self, slot_logprobs: torch.Tensor) -> torch.Tensor:
        r"""(N,) the surrogate :meth:`surrogate` from the policy's normalised log-probabilities at the support slots
        only, ``slot_logprobs`` (N, s) :math:`= \log\pi_\theta(\texttt{tokens})` (e.g. gathered logits minus the
        full log-sum-exp): no V-sized tensor, and the gradient flows through the gathered log-probabilities (the
        dust's mass is :math:`1 - \sum` of the distinct slots'). Needs ``tokens`` (not the whole-vocabulary form)."""
        if self.tokens is None:
            raise ValueError("surrogate_at_slots needs a support (tokens); this gradient covers the whole vocabulary")
        if slot_logprobs.shape != self.tokens.shape:
            raise ValueError(
                f"slot_logprobs must be (N, s) = {tuple(self.tokens.shape)} like tokens, "
                f"got {tuple(slot_logprobs.shape)}"
            )
        held = slot_logprobs.exp() * self.distinct
        dust = self.dust.to(held.dtype)
        return (held * (self.phi.to(held.dtype) - dust[..., None])).sum(-1) + dust


def chunk_bounds(count: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(count)`` in steps of ``per_chunk`` (>= 1)."""
    per_chunk = max(1, per_chunk)
    for start in range(0, count, per_chunk):
        yield start, min(start + per_chunk, count)


class StatAccumulator:
    """Sums (for means over positions) and maxima of per-chunk statistics, kept on the device until
    :meth:`result` so that a chunk costs no host synchronisation."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._maxima: dict[str, list[torch.Tensor | float]] = {}

    def add_mean(self, name: str, values: torch.Tensor) -> None:
        """Add per-position ``values`` (n,) to the mean named ``name``."""
        total = values.double().sum()
        self._sums[name] = self._sums[name] + total if name in self._sums else total

    def add_max(self, name: str, value: torch.Tensor | float) -> None:
        """Fold ``value`` (a number, or a tensor reduced by its max) into the maximum named ``name``."""
        self._maxima.setdefault(name, []).append(value.max() if isinstance(value, torch.Tensor) else value)

    def result(self, count: int) -> dict[str, float]:
        """Means over ``count`` positions (0.0 when ``count`` is 0) and maxima, as Python floats."""
        stats = {name: float(total) / count if count else 0.0 for name, total in self._sums.items()}
        stats.update({name: max(float(value) for value in values) for name, values in self._maxima.items()})
        return stats


def check_inputs(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` unless the logits are (B, T, V) floats of one shape and device, ``actions`` is
    an integer (B, T) tensor and ``mask`` is None or a bool (B, T) tensor."""
    for name, logits in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3:
            raise ValueError(f"{name} must be a floating-point (B, T, V) tensor, got {describe(logits)}")
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy_logits {tuple(policy_logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have one shape"
        )
    if policy_logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary axis")
    if not isinstance(actions, torch.Tensor) or actions.is_floating_point() or actions.is_complex():
        raise ValueError(f"actions must be an integer tensor of sampled token ids, got {describe(actions)}")
    if actions.dtype == torch.bool:
        raise ValueError("actions must be an integer tensor of sampled token ids, got a bool tensor")
    if tuple(actions.shape) != tuple(policy_logits.shape[:2]):
        raise ValueError(
            f"actions must be (B, T) = {tuple(policy_logits.shape[:2])} to match the logits, got {tuple(actions.shape)}"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool (B, T) tensor, got {describe(mask)}")
        if mask.shape != actions.shape:
            raise ValueError(f"mask must be (B, T) = {tuple(actions.shape)}, got {tuple(mask.shape)}")
    devices = {t.device for t in (policy_logits, ref_logits, actions) + ((mask,) if mask is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"logits, actions and mask must be on one device, got {sorted(map(str, devices))}")


def check_finite_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first (masked) position whose logits hold a NaN or ``+inf``, or no finite
    logit: no penalty exists there. One host synchronisation: :meth:`Regularizer.penalty` and
    :meth:`Regularizer.support_gradient` check, :meth:`Regularizer.evaluate` leaves it to its caller (the RL step
    watches the logits with its :class:`~otalign.guard.FiniteGuard`, which decides alike on every process)."""
    for name, logits in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        top = logits.detach().amax(-1)  # (B, T): NaN if any logit is NaN, +inf if one is +inf, -inf if all are
        bad = ~torch.isfinite(top) if mask is None else ~torch.isfinite(top) & mask
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            row = logits[b, t]
            what = "NaN" if bool(row.isnan().any()) else "+inf" if bool((row == math.inf).any()) else "only -inf"
            raise ValueError(f"{name}[{b}, {t}] has {what} logits (a diverged model or bad input); no penalty exists")


def select_positions(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None
) -> Positions:
    """The positions where ``mask`` is True (all when None), with sampled tokens checked to lie in [0, V)."""
    steps = actions.shape[1]
    flat = torch.arange(actions.numel(), device=actions.device) if mask is None else mask.flatten().nonzero()[:, 0]
    tokens = actions.flatten()[flat].long()
    vocab = policy_logits.shape[-1]
    if tokens.numel() and (bool(tokens.min() < 0) or bool(tokens.max() >= vocab)):
        raise ValueError(
            f"actions hold token ids in [{int(tokens.min())}, {int(tokens.max())}] at generated positions; "
            f"they must lie in [0, V) = [0, {vocab})"
        )
    return Positions(policy_logits, ref_logits, tokens, flat // steps, flat % steps)


class Regularizer(ABC):
    """A per-token policy penalty: ``penalty(policy_logits, ref_logits, actions, mask) -> PenaltyOutput``.

    Subclasses implement :meth:`_penalize` on the selected positions; this class checks the inputs,
    selects the generated positions, runs under ``torch.no_grad`` and scatters the result back to (B, T).

    Args:
        max_chunk_elements: bound on the elements of the largest tensor a chunk of positions allocates
            (see :data:`DEFAULT_CHUNK_ELEMENTS`); smaller means less memory and more, smaller steps.
    """

    name: str = "regularizer"

    distance_stat: str = "penalty/mean"
    """The statistic that measures the regularizer's distance per token (what an adaptive beta steers)."""

    @classmethod
    def from_config(cls, config, reference_model, **defaults) -> Regularizer:
        """The regularizer a trainer's config asks for: the registry entry's ``defaults`` plus whatever of the
        config's fields this class reads (none here; a subclass maps its own fields). ``reference_model`` is the
        frozen reference, for regularizers that take something from it (e.g. its embeddings)."""
        return cls(**defaults)

    def loss_term(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor | None:
        """A differentiable per-token estimate of the distance from the sampled tokens' log-probabilities alone
        ((b, T) each), for the penalty in a loss; None (the default): the loss uses the support-gradient surrogate
        (:class:`SupportGradient`) instead."""
        return None

    def __init__(self, *, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        if int(max_chunk_elements) < 1:
            raise ValueError(f"max_chunk_elements must be >= 1, got {max_chunk_elements}")
        self.max_chunk_elements = int(max_chunk_elements)

    def penalty(
        self,
        policy_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        actions: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> PenaltyOutput:
        """Penalty of each generated token.

        Args:
            policy_logits: (B, T, V) next-token logits of the policy at each position, any float dtype.
            ref_logits: (B, T, V) logits of the reference model at the same positions.
            actions: (B, T) integer ids of the tokens sampled at those positions.
            mask: (B, T) bool, True at generated positions; None means every position.

        Returns:
            :class:`PenaltyOutput` with ``per_token`` (B, T) float32 (0 outside ``mask``) and ``stats``.

        Raises:
            ValueError: on malformed shapes, dtypes, devices or token ids, logits whose vocabulary does not fit
                the regularizer, or a generated position whose logits hold a NaN or ``+inf`` (no finite logit).
        """
        check_inputs(policy_logits, ref_logits, actions, mask)
        check_finite_logits(policy_logits, ref_logits, mask)
        return self.evaluate(policy_logits, ref_logits, actions, mask).penalty

    def support_gradient(
        self,
        policy_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        actions: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> SupportGradient:
        """The distance's gradient in the policy's masses at each generated position (see :class:`SupportGradient`),
        for the surrogate that puts the exact regularization gradient into a loss.

        Args: as :meth:`penalty` (float64 logits give float64 results).

        Returns:
            :class:`SupportGradient` over the N positions where ``mask`` is True, in row-major (b, t) order.
        """
        check_inputs(policy_logits, ref_logits, actions, mask)
        check_finite_logits(policy_logits, ref_logits, mask)
        with torch.no_grad():
            return self._support_gradient(select_positions(policy_logits, ref_logits, actions, mask))

    def evaluate(
        self,
        policy_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        actions: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        support_gradient: bool = False,
        normalized: bool = False,
        kl_diagnostic: bool = True,
    ) -> Evaluation:
        """:meth:`penalty` and, with ``support_gradient``, :meth:`support_gradient` in one call (one log-softmax of each
        chunk of positions, and one solve per position where the regularizer solves a problem).

        Args: as :meth:`penalty`; ``normalized``: the "logits" are log-probabilities already (a caller that took the
            log-softmax itself, e.g. :func:`otalign.scoring.score_rollout`): none is taken again; with
            ``kl_diagnostic`` False no ``kl/exact`` statistic is computed (the caller measures the KL itself) unless
            it is the regularizer's own distance.

        Raises:
            NotImplementedError: ``support_gradient`` asked of a regularizer that has none.
        """
        check_inputs(policy_logits, ref_logits, actions, mask)
        if support_gradient and not self.has_support_gradient:
            raise NotImplementedError(f"{type(self).__name__} has no support_gradient")
        with torch.no_grad():
            positions = select_positions(policy_logits, ref_logits, actions, mask)
            positions = dataclasses.replace(positions, normalized=normalized, kl_diagnostic=kl_diagnostic)
            values, stats, gradient = self._evaluate(positions, support_gradient)
            per_token = torch.zeros(actions.shape, dtype=torch.float32, device=actions.device)
            per_token[positions.batch_index, positions.time_index] = values.float()
            stats.add_mean("penalty/mean", values)
        return Evaluation(PenaltyOutput(per_token=per_token, stats=stats.result(positions.count)), gradient)

    def evaluate_topk(self, record: TopKLogProbs, *, support_gradient: bool = False, check: bool = True) -> Evaluation:
        """The penalty (and, with ``support_gradient``, the support gradient) from a top-k record
        (:class:`~otalign.regularizers.topk.TopKLogProbs`) instead of full logits, for regularizers that need only
        what the record holds.

        Args:
            record: the N positions' :class:`~otalign.regularizers.topk.TopKLogProbs`.
            support_gradient: also return the :class:`SupportGradient` over the record's positions.
            check: validate the record first (:meth:`~otalign.regularizers.topk.TopKLogProbs.check`, a few host
                synchronisations); False for a record this library built (e.g. ``TopKLogProbs.from_log_probs``).

        Returns:
            :class:`Evaluation` with ``penalty.per_token`` (N,) float32, one per position of the record.

        Raises:
            NotImplementedError: for a regularizer that needs the whole vocabulary.
        """
        raise NotImplementedError(f"{type(self).__name__} needs full logits (it has no top-k form)")

    def _evaluate(
        self, positions: Positions, gradient: bool
    ) -> tuple[torch.Tensor, StatAccumulator, SupportGradient | None]:
        """Penalties (N,), statistics and (when ``gradient``) the support gradient at the selected positions. This
        default calls :meth:`_penalize` then :meth:`_support_gradient`; a regularizer that solves a problem per
        position overrides it to solve once for both."""
        values, stats = self._penalize(positions)
        return values, stats, self._support_gradient(positions) if gradient else None

    @property
    def has_support_gradient(self) -> bool:
        """Whether :meth:`support_gradient` is implemented (needed for the penalty in a loss)."""
        return type(self)._support_gradient is not Regularizer._support_gradient

    @property
    def has_topk(self) -> bool:
        """Whether :meth:`evaluate_topk` is implemented (the penalty from a top-k record, no full logits)."""
        return type(self).evaluate_topk is not Regularizer.evaluate_topk

    def _support_gradient(self, positions: Positions) -> SupportGradient:
        raise NotImplementedError(f"{type(self).__name__} has no support_gradient")

    @abstractmethod
    def _penalize(self, positions: Positions) -> tuple[torch.Tensor, StatAccumulator]:
        """Penalties (N,) at the selected positions and the accumulated statistics."""
