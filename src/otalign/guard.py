"""Guard rails of training: non-finite values stop a step before it is applied; unconverged solves are reported.

:class:`FiniteGuard` collects the quantities of one optimizer step (losses, the gradient norm, logits, rewards,
penalties) as they are computed, without a host synchronisation, and :meth:`FiniteGuard.passes` decides once,
before the optimizer applies the step, whether all of them were finite on every process. If one was not, the
run stops with a :class:`NonFiniteError` naming the step, the quantity and its likely cause (``on_nonfinite:
error``, the default), or the step is skipped (``on_nonfinite: skip``: no parameter changes, the trainer counts
it). Either way the weights and the last checkpoint never hold the NaN. (Finite weights that an update made so
large that the next forward overflows show up at that forward, as non-finite logits: after the update.)

Pure PyTorch: :mod:`otalign.generation` raises :class:`NonFiniteError` too, so it has no trainer import.
"""

from __future__ import annotations

import torch

ON_NONFINITE = ("error", "skip")
"""What a trainer does with a step that met a non-finite value (the ``on_nonfinite`` config field)."""

KINDS = ("finite", "infinite", "NaN")
"""The codes of :func:`nonfinite_code`: 0 finite, 1 an infinity (no NaN), 2 a NaN."""


class NonFiniteError(ValueError):
    """Training met a NaN or an infinity and stopped before the optimizer applied it (the message is one line:
    the step, the quantity, its likely cause)."""


class ConvergenceError(ValueError):
    """An OT solve stopped at its iteration limit above its tolerance where the config asks for convergence."""


class ConvergenceWarning(UserWarning):
    """An OT solve stopped at its iteration limit above its tolerance (its value and potentials are approximate)."""


def nonfinite_code(value: torch.Tensor | float, *, logits: bool = False) -> torch.Tensor:
    """A 0-dim int64 tensor on ``value``'s device: 0 when every entry is finite, 1 for an infinity, 2 for a NaN.

    With ``logits=True`` a ``-inf`` entry is allowed (a masked token) unless a whole row (last axis) is ``-inf``;
    the check then reduces each row by its max first, so it allocates no tensor of the logits' size.
    """
    x = torch.as_tensor(value).detach()
    if logits:
        x = x.amax(-1)  # NaN propagates; +inf if any entry is; -inf only if the whole row is
    return torch.where(torch.isnan(x).any(), 2, torch.isinf(x).any().long())


class FiniteGuard:
    """The finite checks of one optimizer step at a time, agreed on by every process.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (its processes all reach :meth:`passes` together).
        on_nonfinite: ``error`` (raise :class:`NonFiniteError`) or ``skip`` (:meth:`passes` returns False).
    """

    def __init__(self, accelerator, on_nonfinite: str = "error") -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        self.accelerator, self.on_nonfinite = accelerator, on_nonfinite
        self._watched: list[tuple[str, str, bool, torch.Tensor]] = []

    def watch(
        self, quantity: str, value: torch.Tensor | float, cause: str, *, logits: bool = False, fatal: bool = False
    ) -> None:
        """Record ``value`` for the next :meth:`passes` (no host synchronisation).

        Args:
            quantity: what it is, for the message (``"the loss"``, ``"the gradient norm"``).
            value: a tensor or number.
            cause: the likely cause if it is not finite, for the message.
            logits: check it as logits (:func:`nonfinite_code`).
            fatal: an error even under ``on_nonfinite: skip`` (skipping cannot help, e.g. weights already broken).
        """
        self._watched.append((quantity, cause, fatal, nonfinite_code(value, logits=logits)))

    def passes(self, step: int) -> bool:
        """Whether every value watched since the last call was finite on every process (one reduction across
        processes); clears the record.

        Raises:
            NonFiniteError: one was not, under ``on_nonfinite: error`` or for a ``fatal`` quantity; the message
                names the step, the first such quantity, whether it was NaN or infinite, and the cause.
        """
        watched, self._watched = self._watched, []
        if not watched:
            return True
        acc = self.accelerator
        codes = torch.stack([code.to(acc.device) for *_, code in watched])
        if acc.num_processes > 1:
            codes = acc.reduce(codes, reduction="max")  # every process decides alike
        codes = codes.tolist()
        bad = [(w, code) for w, code in zip(watched, codes, strict=True) if code]
        if not bad:
            return True
        fatal = [(w, code) for w, code in bad if w[2]]
        if self.on_nonfinite == "skip" and not fatal:
            return False
        (quantity, cause, is_fatal, _), code = (fatal or bad)[0]
        advice = "" if is_fatal or self.on_nonfinite == "skip" else "; on_nonfinite skip skips such steps instead"
        raise NonFiniteError(
            f"step {step}: {quantity} is {KINDS[code]} ({cause}); stopped before the optimizer applied it, "
            f"so the weights and the last checkpoint are unchanged{advice}"
        )


__all__ = [
    "ON_NONFINITE",
    "ConvergenceError",
    "ConvergenceWarning",
    "FiniteGuard",
    "NonFiniteError",
    "nonfinite_code",
]
