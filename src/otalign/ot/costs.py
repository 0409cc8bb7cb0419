r"""Batched pairwise ground costs between point clouds.

All functions take ``x`` (..., n, d) and ``y`` (..., m, d) and return (..., n, m) in the
promoted dtype (float32 at least). They use the matrix-product expansion
:math:`\|x-y\|^2 = \|x\|^2 + \|y\|^2 - 2\langle x, y\rangle` on centred points, clamp what
cancellation would push below zero, treat distances below the rounding level of the inputs as
exactly zero, and have zero (not NaN or inf) gradients there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

COST_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _register(fn):
    COST_FUNCTIONS[fn.__name__] = fn
    return fn


def _promote(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y need the same feature size, got {x.shape[-1]} and {y.shape[-1]}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


def _squared_distances(
    x: torch.Tensor, y: torch.Tensor, centred: bool = False, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (squared distances, rounding floor) on centred points (``centred``: the caller centred them;
    ``overwrite``: centre ``x`` in place, when it needs no gradient).

    Without autograd the distances come back already floored (entries below the floor set to 0, floor
    ``None``), computed in place: on CPU each fresh (..., n, m) temporary costs page faults.
    """
    same = y is x  # distances within one cloud: centre it once and reuse its norms
    x, y = _promote(x, y)
    if not centred:
        # Centring shrinks the norms, hence the cancellation in the expansion.
        x_sum = x.sum(-2, keepdim=True)
        y_sum = x_sum if same else y.sum(-2, keepdim=True)
        centre = ((x_sum + y_sum) / (x.shape[-2] + y.shape[-2])).detach()
        x = x.sub_(centre) if overwrite and not x.requires_grad else x - centre
        y = x if same else y - centre
    # Rounding in the d-term dot products grows like sqrt(d) (random-walk accumulation).
    rounding = 4 * math.sqrt(x.shape[-1]) * torch.finfo(x.dtype).eps
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        x_sq = (x * x).sum(-1, keepdim=True)
        y_sq = (y * y).sum(-1, keepdim=True).transpose(-1, -2)
        sq = (x_sq + y_sq - 2.0 * (x @ y.transpose(-1, -2))).clamp_min(0)
        return sq, rounding * (x_sq + y_sq).detach()
    # Squared norms as a reduction (no (..., n, d) temporary).
    x_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
    y_sq = (x_sq if same else torch.linalg.vector_norm(y, dim=-1, keepdim=True).square_()).transpose(-1, -2)
    sq = torch.matmul(x, y.transpose(-1, -2)).mul_(-2.0).add_(x_sq).add_(y_sq)
    floor = torch.add(x_sq, y_sq).mul_(rounding)
    return sq.masked_fill_(sq <= floor, 0.0), None


@_register
def sqeuclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - y_j||^2``: (..., n, d), (..., m, d) -> (..., n, m)."""
    sq, floor = _squared_distances(x, y)
    if floor is None:
        return sq
    return torch.where(sq > floor, sq, torch.zeros_like(sq))


@_register
def euclidean(x: torch.Tensor, y: torch.Tensor, *, centred: bool = False, overwrite: bool = False) -> torch.Tensor:
    """Euclidean distances ``||x_i - y_j||``: (..., n, d), (..., m, d) -> (..., n, m).

    The gradient at (numerically) zero distance is 0, a valid subgradient. ``centred=True`` says the
    caller already moved both clouds near their joint mean (which float32 accuracy needs when the points
    share a large offset), saving two copies of the points. ``overwrite=True`` lets the function centre ``x``
    in place (its values change; ignored when ``x`` needs a gradient): for a scratch tensor such as a gather, the
    same distances without a copy of the points.
    """
    sq, floor = _squared_distances(x, y, centred, overwrite)
    if floor is None:
        return sq.sqrt_()
    positive = sq > floor
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


@_register
def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine distances ``1 - <x_i, y_j> / (||x_i|| ||y_j||)`` in [0, 2]: (..., n, m).

    A zero vector has cosine similarity 0 with everything (distance 1) and zero gradient;
    distances below the rounding level are exactly 0.
    """
    x, y = _promote(x, y)
    distance = 1.0 - _unit(x) @ _unit(y).transpose(-1, -2)
    floor = 4 * math.sqrt(x.shape[-1]) * torch.finfo(x.dtype).eps
    return torch.where(distance > floor, distance, torch.zeros_like(distance)).clamp(max=2.0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; zero rows stay zero with zero gradient."""
    sq_norm = (x * x).sum(-1, keepdim=True)
    nonzero = sq_norm > 0
    inv_norm = torch.where(nonzero, torch.rsqrt(torch.where(nonzero, sq_norm, torch.ones_like(sq_norm))), 0.0)
    return x * inv_norm


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Dispatch to the cost named ``metric`` (``euclidean``, ``sqeuclidean`` or ``cosine``)."""
    try:
        fn = COST_FUNCTIONS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(COST_FUNCTIONS)}") from None
    return fn(x, y)
