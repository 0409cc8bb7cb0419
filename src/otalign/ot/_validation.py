"""Input checks shared by the OT solvers: shapes, masses, costs and the regularization."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


class Problem(NamedTuple):
    """A validated, batched OT problem (see :func:`prepare_problem`)."""

    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    unbatched: bool
    finite: torch.Tensor | None
    """(B, n, m) mask of finite costs, None when every cost is finite."""
    cost_range: float
    """Largest minus smallest finite cost (0 when none is finite)."""
    max_cost: float
    """Largest finite cost (0 when none is finite)."""
    min_cost: float
    """Smallest cost (0 when none is finite)."""


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Float32 for half/bfloat16/float32 inputs, float64 when any input is float64."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_positive_scalar(name: str, value: float) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is finite and > 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_iteration_settings(max_iter: int, tol: float | torch.Tensor, check_every: int) -> None:
    """Raise ``ValueError`` naming the parameter unless ``max_iter`` and ``check_every`` are integers >= 1 and
    ``tol`` (a number or a tensor of per-problem tolerances) is finite and >= 0."""
    for name, value in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        tols = torch.as_tensor(tol, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"tol must be a number >= 0 or a (B,) tensor of them, got {tol!r}") from None
    if tols.is_complex() or not bool(torch.isfinite(tols).all()) or bool((tols < 0).any()):
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")


def check_feasible(problem: Problem) -> None:
    """Raise ``ValueError`` when a balanced problem has no transport plan: a source (or target) atom with mass whose
    costs to every atom of the other side are ``+inf`` (forbidden), e.g. an all-``+inf`` cost."""
    if problem.finite is None:
        return
    for name, mass, reachable in (
        ("a", problem.a, problem.finite.any(-1)),
        ("b", problem.b, problem.finite.any(-2)),
    ):
        stranded = (mass > 0) & ~reachable
        if bool(stranded.any()):
            k, i = (int(x) for x in stranded.nonzero()[0])
            raise ValueError(
                f"cost is +inf for every pair of {name}[{k}, {i}] (mass {mass[k, i].item():.3g}): problem {k} has no "
                "transport plan; give it a finite cost or use unbalanced_sinkhorn"
            )


def prepare_problem(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> Problem:
    """Validate an OT problem and return it batched in the compute dtype.

    Accepts a batch ``a`` (B, n), ``b`` (B, m), ``cost`` (B, n, m) or a single problem
    ``a`` (n,), ``b`` (m,), ``cost`` (n, m). Returns a :class:`Problem` with the
    tensors upcast to float32 (float64 kept) and a leading batch axis added if needed.

    Raises:
        ValueError: on mismatched shapes, non-float inputs, negative or non-finite masses,
            NaN or ``-inf`` costs, or a problem with no mass at all.
    """
    for name, t in (("a", a), ("b", b), ("cost", cost)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    unbatched = a.dim() == 1
    if unbatched:
        if b.dim() != 1 or cost.dim() != 2:
            raise ValueError(
                "unbatched problem needs a (n,), b (m,), cost (n, m); got "
                f"a {tuple(a.shape)}, b {tuple(b.shape)}, cost {tuple(cost.shape)}"
            )
        a, b, cost = a.unsqueeze(0), b.unsqueeze(0), cost.unsqueeze(0)
    if a.dim() != 2 or b.dim() != 2 or cost.dim() != 3:
        raise ValueError(
            "batched problem needs a (B, n), b (B, m), cost (B, n, m); got "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}, cost {tuple(cost.shape)}"
        )
    batch, n = a.shape
    if b.shape[0] != batch or tuple(cost.shape) != (batch, n, b.shape[1]):
        raise ValueError(
            f"shapes do not match: a {tuple(a.shape)}, b {tuple(b.shape)}, "
            f"cost {tuple(cost.shape)} (expected cost {(batch, n, b.shape[1])})"
        )
    if batch == 0:
        raise ValueError(f"empty batch: a {tuple(a.shape)}, b {tuple(b.shape)}; pass at least one problem")
    if n == 0 or b.shape[1] == 0:
        raise ValueError(f"empty problem: n={n}, m={b.shape[1]}")
    if not (a.device == b.device == cost.device):
        raise ValueError(f"a, b and cost must be on one device, got {a.device}, {b.device}, {cost.device}")

    dtype = compute_dtype(a, b, cost)
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(dtype)
    for name, mass in (("a", a), ("b", b)):
        if not torch.isfinite(mass).all():
            raise ValueError(f"{name} contains NaN or inf masses")
        if (mass < 0).any():
            raise ValueError(f"{name} contains negative masses (min {mass.min().item():.3g})")
        if (mass.sum(-1) <= 0).any():
            raise ValueError(f"{name} has a problem with zero total mass")
    lowest, highest = (float(x) for x in torch.aminmax(cost))  # one pass; NaN propagates
    if math.isnan(lowest) or math.isnan(highest):
        raise ValueError("cost contains NaN")
    if lowest == -math.inf:
        raise ValueError("cost contains -inf; forbidden pairs are marked with +inf")
    finite = None
    if highest == math.inf:
        finite = torch.isfinite(cost)
        if bool(finite.any()):
            highest = float(cost.masked_fill(~finite, -math.inf).amax())
        else:
            lowest = highest = 0.0
    return Problem(a, b, cost, unbatched, finite, highest - lowest, highest, lowest)


def check_equal_mass(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """Raise ``ValueError`` if a balanced problem's two sides carry different total mass."""
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    gap = (mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)
    worst = int(gap.argmax())
    if gap[worst] > rtol:
        raise ValueError(
            f"balanced OT needs equal masses: problem {worst} has sum(a)={mass_a[worst].item():.6g} "
            f"and sum(b)={mass_b[worst].item():.6g}; normalise them or use unbalanced_sinkhorn"
        )
