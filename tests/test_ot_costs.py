"""Pairwise ground costs (`otalign.ot.costs`): brute force, sign, exact zeros, gradients, batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otalign.ot import COST_FUNCTIONS, cosine, euclidean, pairwise_cost, sqeuclidean

pytestmark = pytest.mark.usefixtures("torch_single_thread")

METRICS = ["euclidean", "sqeuclidean", "cosine"]


def brute_force(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """Direct differences / normalised dot products in float64, no expansion."""
    x, y = x.double(), y.double()
    if metric == "cosine":
        xn, yn = x.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
        xu = torch.where(xn > 0, x / xn.clamp_min(1e-300), torch.zeros_like(x))
        yu = torch.where(yn > 0, y / yn.clamp_min(1e-300), torch.zeros_like(y))
        return 1.0 - (xu.unsqueeze(-2) * yu.unsqueeze(-3)).sum(-1)
    sq = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    return sq if metric == "sqeuclidean" else sq.sqrt()


def _points(seed: int, *shape: int, scale: float = 1.0, offset: float = 0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def test_registry_and_dispatch():
    assert set(COST_FUNCTIONS) == set(METRICS)
    x, y = _points(0, 4, 3), _points(1, 5, 3)
    for metric in METRICS:
        torch.testing.assert_close(pairwise_cost(x, y, metric), COST_FUNCTIONS[metric](x, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        pairwise_cost(x, y, "manhattan")


@pytest.mark.parametrize("fn", [euclidean, sqeuclidean, cosine])
def test_feature_size_mismatch_is_a_value_error(fn):
    with pytest.raises(ValueError, match="same feature size"):
        fn(torch.randn(3, 4), torch.randn(2, 5))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "n,m,d,scale,offset",
    [(7, 5, 3, 1.0, 0.0), (1, 9, 16, 3.0, 0.0), (12, 12, 64, 0.1, 0.0), (6, 8, 5, 1.0, 100.0), (4, 4, 300, 1.0, -5.0)],
)
def test_matches_brute_force_float64(metric, n, m, d, scale, offset):
    x, y = _points(n, n, d, scale=scale, offset=offset), _points(m + 100, m, d, scale=scale, offset=offset)
    got = pairwise_cost(x, y, metric)
    assert got.shape == (n, m) and got.dtype == torch.float64
    expected = brute_force(x, y, metric)
    scale_sq = scale**2 * d if metric == "sqeuclidean" else (scale * d**0.5 if metric == "euclidean" else 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * scale_sq)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32_close_to_brute_force(metric, dtype):
    x, y = _points(3, 10, 32, dtype=dtype), _points(4, 11, 32, dtype=dtype)
    got = pairwise_cost(x, y, metric)
    assert got.dtype == torch.float32
    expected = brute_force(x, y, metric)  # on the same rounded inputs
    rel = {"sqeuclidean": 64.0, "euclidean": 8.0, "cosine": 1.0}[metric]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * rel)


def test_batched_shapes_equal_per_slice_results():
    x, y = _points(5, 2, 3, 6, 4), _points(6, 2, 3, 7, 4)
    for metric in METRICS:
        got = pairwise_cost(x, y, metric)
        assert got.shape == (2, 3, 6, 7)
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(got[i, j], pairwise_cost(x[i, j], y[i, j], metric), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, brute_force(x, y, metric), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Never negative, exact zeros
# ----------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    d=st.integers(1, 40),
    log_scale=st.floats(-4, 4),
    log_offset=st.floats(-3, 6),
    near=st.floats(1e-9, 1e-3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_never_negative_even_under_cancellation(seed, n, d, log_scale, log_offset, near, dtype):
    """Points far from the origin and close to each other: the expansion's cancellation must not go negative."""
    base = _points(seed, n, d, scale=10.0**log_scale, offset=10.0**log_offset)
    y = torch.cat([base, base + near * 10.0**log_scale * _points(seed + 1, n, d)]).to(dtype)
    x = base.to(dtype)
    for metric in METRICS:
        cost = pairwise_cost(x, y, metric)
        assert torch.isfinite(cost).all()
        assert (cost >= 0).all(), metric
        if metric == "cosine":
            assert (cost <= 2).all()


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,offset", [(3, 0.0), (64, 1.0), (768, 0.0), (50, 1e3)])
def test_identical_points_give_exactly_zero(metric, dtype, d, offset):
    x = _points(d, 20, d, scale=3.0, offset=offset, dtype=dtype)
    y = torch.cat([_points(d + 1, 5, d, scale=3.0, offset=offset, dtype=dtype), x.flip(0)])
    cost = pairwise_cost(x, y, metric)
    rows = torch.arange(20)
    assert (cost[rows, 5 + 19 - rows] == 0).all()
    assert (pairwise_cost(x, x, metric).diagonal() == 0).all()
    assert (pairwise_cost(x, x, metric) > 0).sum() >= 20 * 19 - 2  # distinct points stay apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_identical_points_give_exactly_zero(dtype):
    x = _points(0, 50, 64, scale=3.0, offset=1.0, dtype=dtype)
    assert (cosine(x, x).diagonal() == 0).all()


def test_identical_points_give_exactly_zero_in_high_dimension_float64():
    g = torch.Generator().manual_seed(1)
    bad = 0
    for _ in range(5):
        x = torch.randn(64, 8192, generator=g, dtype=torch.float64) * torch.rand(
            64, 1, generator=g, dtype=torch.float64
        )
        x = 5 * x + torch.randn(8192, generator=g, dtype=torch.float64)
        bad += int((euclidean(x, x).diagonal() != 0).sum())
    assert bad == 0


def test_cosine_zero_vectors():
    """A zero vector is at cosine distance exactly 1 from everything (itself included), with finite gradients."""
    x = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.cat([torch.zeros(1, 4, dtype=torch.float64), _points(0, 4, 4)]).requires_grad_(True)
    cost = cosine(x, y)
    assert (cost == 1).all()
    cost.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # one zero vector among ordinary ones leaves the others' distances untouched
    z = torch.cat([torch.zeros(1, 4, dtype=torch.float64), _points(1, 3, 4)])
    torch.testing.assert_close(cosine(z, y)[1:], brute_force(z, y, "cosine")[1:], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_zero_distance(metric, dtype):
    base = _points(0, 5, 8, dtype=dtype)
    x = base.clone().requires_grad_(True)
    y = torch.cat([base, base[:2] * 2.0, _points(1, 3, 8, dtype=dtype)]).requires_grad_(True)
    cost = pairwise_cost(x, y, metric)
    weights = _points(2, *cost.shape, dtype=cost.dtype)
    (cost * weights).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # Only an identical pair: the gradient there is zero (a valid subgradient for euclidean).
    x1 = base[:1].clone().requires_grad_(True)
    y1 = base[:1].clone().requires_grad_(True)
    pairwise_cost(x1, y1, metric).sum().backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(y1.grad).all()
    assert x1.grad.abs().max() < 1e-3 and y1.grad.abs().max() < 1e-3


@pytest.mark.parametrize("metric", METRICS)
def test_gradients_match_finite_differences_away_from_zero(metric):
    x = _points(3, 4, 5, scale=2.0).requires_grad_(True)
    y = _points(4, 6, 5, scale=2.0, offset=0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, q: pairwise_cost(p, q, metric), (x, y), eps=1e-6, atol=1e-7)
    xb = _points(5, 2, 3, 4).requires_grad_(True)
    yb = _points(6, 2, 2, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, q: pairwise_cost(p, q, metric), (xb, yb), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("metric,power", [("euclidean", 1), ("sqeuclidean", 2)])
def test_gradients_match_torch_cdist(metric, power):
    x = _points(7, 6, 10, offset=3.0, dtype=torch.float32).requires_grad_(True)
    y = _points(8, 9, 10, offset=3.0, dtype=torch.float32).requires_grad_(True)
    w = _points(9, 6, 9, dtype=torch.float32)
    (pairwise_cost(x, y, metric) * w).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    ((torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** power) * w).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gy, y.grad, rtol=1e-4, atol=1e-4)
