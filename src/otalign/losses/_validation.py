"""Input checks and reductions shared by the preference losses."""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_vectors(allow_empty: bool = False, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every tensor is a 1-D floating-point tensor of one common length >= 1 (>= 0 with
    ``allow_empty``: a process's share of a batch gathered over processes may be empty)."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (batch,), got shape {tuple(t.shape)}")
        shapes[name] = t.shape[0]
    if len(set(shapes.values())) > 1:
        raise ValueError(f"batch sizes differ: {shapes}")
    if 0 in shapes.values() and not allow_empty:
        raise ValueError(f"{', '.join(shapes)}: empty batch (shape (0,)); pass at least one example")


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is finite and > 0."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value``, raising ``ValueError`` unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` (``"mean"``, ``"sum"`` or ``"none"``) to per-example ``losses`` (batch,)."""
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
