"""The regularizer interface, its output, and the input checks and chunking every penalty shares.

A regularizer turns the policy's and the reference's next-token logits at the generated positions of
a batch of rollouts into one penalty per position; a PPO trainer multiplies it by ``-beta`` and adds
it to the reward there. Everything runs under ``torch.no_grad`` and in chunks of positions, so the
memory a penalty needs beyond its inputs is bounded by the chunk, never by ``B * T * V``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

LOG_PROB_FLOOR = -80.0
"""Log-probabilities are floored here (probability ``e^-80 ~ 1.8e-35``) where a penalty needs a finite
log-ratio or mass: a token the reference (or the policy) rules out with a ``-inf`` logit, or whose
probability underflows float32. ``80`` leaves headroom so that ``exp(+-80)`` times the small constants of
the penalties stays inside float32 (max ``3.4e38``)."""

DEFAULT_CHUNK_ELEMENTS = 2**24
"""Default bound on the elements of the largest per-chunk tensor (``positions x V`` for log-softmax,
``positions x support^2`` for Sinkhorn): 64 MiB in float32."""


@dataclass(frozen=True)
class PenaltyOutput:
    """Per-position penalties for a batch of rollouts.

    Attributes:
        per_token: (B, T) float32; the penalty at each generated position (0 where ``mask`` is False).
            The trainer adds ``-beta * per_token`` to the reward.
        stats: scalars for logging with slash names (``penalty/mean``, ``kl/exact``, ...), averaged over
            the generated positions unless a name says otherwise; 0.0 when no position is generated.
    """

    per_token: torch.Tensor
    stats: dict[str, float]


@dataclass(frozen=True)
class Positions:
    """The generated positions of a batch, selected lazily from (B, T, V) logits.

    Attributes:
        policy_logits: (B, T, V) policy logits, any float dtype, possibly non-contiguous.
        ref_logits: (B, T, V) reference logits.
        actions: (N,) int64 sampled tokens at the selected positions.
        batch_index: (N,) batch coordinate of each selected position.
        time_index: (N,) time coordinate of each selected position.
    """

    policy_logits: torch.Tensor
    ref_logits: torch.Tensor
    actions: torch.Tensor
    batch_index: torch.Tensor
    time_index: torch.Tensor

    @property
    def count(self) -> int:
        return self.actions.shape[0]

    @property
    def vocab(self) -> int:
        return self.policy_logits.shape[-1]

    def log_probs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 log-softmax of both logits at positions ``start:stop``: two (stop - start, V) tensors."""
        rows = (self.batch_index[start:stop], self.time_index[start:stop])
        policy = torch.log_softmax(self.policy_logits[rows].float(), dim=-1)
        ref = torch.log_softmax(self.ref_logits[rows].float(), dim=-1)
        return policy, ref


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


def describe(value: object) -> str:
    """A short description of ``value`` for error messages: dtype and shape of a tensor, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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
            ValueError: on malformed shapes, dtypes, devices or token ids, or logits whose vocabulary does
                not fit the regularizer.
        """
        check_inputs(policy_logits, ref_logits, actions, mask)
        with torch.no_grad():
            positions = select_positions(policy_logits, ref_logits, actions, mask)
            values, stats = self._penalize(positions)
            per_token = torch.zeros(actions.shape, dtype=torch.float32, device=actions.device)
            per_token[positions.batch_index, positions.time_index] = values.float()
            stats.add_mean("penalty/mean", values)
        return PenaltyOutput(per_token=per_token, stats=stats.result(positions.count))

    @abstractmethod
    def _penalize(self, positions: Positions) -> tuple[torch.Tensor, StatAccumulator]:
        """Penalties (N,) at the selected positions and the accumulated statistics."""
