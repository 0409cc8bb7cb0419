"""Property tests (hypothesis) for `otalign.ot` solvers: marginals, finiteness at extreme eps and in half
precision, symmetries, and clear `ValueError`s on bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import xlogy

from otalign.ot import sinkhorn, unbalanced_sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")

INF = math.inf
PROPERTY = settings(max_examples=40, deadline=None)
HALF = (torch.float16, torch.bfloat16)


@st.composite
def problems(draw, *, max_size: int = 8, balanced: bool = True):
    """A feasible problem in float64: masses (with zero-mass atoms), costs in [0, scale) with +inf entries.

    Every atom keeps a finite cost to a positive-mass atom of the other side; for balanced problems the
    north-west-corner staircase stays finite, so a feasible plan exists.
    """
    n = draw(st.integers(1, max_size))
    m = draw(st.integers(1, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = 10.0 ** draw(st.floats(-2, 2))
    forbid = draw(st.sampled_from([0.0, 0.0, 0.3, 0.6]))
    rng = np.random.default_rng(seed)

    def masses(size):
        w = rng.random(size) + 0.05
        n_zero = draw(st.integers(0, size - 1))
        w[rng.choice(size, n_zero, replace=False)] = 0.0
        return w

    a, b = masses(n), masses(m)
    if balanced:
        a, b = a / a.sum(), b / b.sum()
    else:
        a, b = a * draw(st.floats(0.1, 3)) / a.sum(), b * draw(st.floats(0.1, 3)) / b.sum()
    cost = rng.random((n, m)) * scale
    finite = rng.random((n, m)) >= forbid
    rest_a, rest_b, i, j = a.copy(), b.copy(), 0, 0
    while i < n and j < m:  # north-west-corner staircase
        finite[i, j] = True
        moved = min(rest_a[i], rest_b[j])
        rest_a[i] -= moved
        rest_b[j] -= moved
        if rest_a[i] <= rest_b[j] and i < n - 1:
            i += 1
        else:
            j += 1
    finite[n - 1, j:] = True
    for r in range(n):
        if not finite[r, b > 0].any():
            finite[r, rng.choice(np.flatnonzero(b > 0))] = True
    for c in range(m):
        if not finite[a > 0, c].any():
            finite[rng.choice(np.flatnonzero(a > 0)), c] = True
    cost[~finite] = INF
    return torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(cost), scale


def _scale(cost: torch.Tensor) -> float:
    finite = cost[torch.isfinite(cost)]
    return float(finite.max() - finite.min()) if finite.numel() else 1.0


# ----------------------------------------------------------------------------------------------
# Balanced solver
# ----------------------------------------------------------------------------------------------


@PROPERTY
@given(problem=problems(), eps_rel=st.floats(1e-2, 10), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_sinkhorn_meets_the_marginals_to_tol(problem, eps_rel, dtype):
    a, b, cost, scale = problem
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(dtype)
    res = sinkhorn(a, b, cost, eps_rel * scale, tol=tol, max_iter=50_000, return_plan=True)
    assert res.marginal_error.item() <= tol
    assert res.n_iter < 50_000
    plan = res.plan
    assert (plan >= 0).all() and (plan[cost.isinf()] == 0).all()
    # The reported error is computed from the potentials; the plan itself carries the rounding of its
    # exponent (u + v - C) / eps: about machine-eps * cost / eps relative per entry (negligible in float64).
    slack = 1e-7 + 8 * torch.finfo(dtype).eps * max(_scale(cost), scale) / (eps_rel * scale)
    assert (plan.sum(-1) - a).abs().sum().item() <= tol + slack
    assert (plan.sum(-2) - b).abs().sum().item() <= slack
    assert torch.isfinite(res.value) and torch.isfinite(res.g[b > 0]).all() and torch.isfinite(res.f[a > 0]).all()


@PROPERTY
@given(
    problem=problems(),
    log_eps_rel=st.floats(-4, 1),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    max_iter=st.sampled_from([1, 50, 1000]),
)
def test_sinkhorn_outputs_are_never_nan_or_inf(problem, log_eps_rel, dtype, max_iter):
    """eps down to 1e-4 of the cost scale and half-precision inputs: finite outputs, whether converged or not."""
    a, b, cost, scale = problem
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(dtype)
    eps = 10.0**log_eps_rel * scale
    mass_rtol = 5e-2 if dtype in HALF else 1e-4  # rounding to half precision breaks sum(a) == sum(b)
    res = sinkhorn(a, b, cost, eps, max_iter=max_iter, return_plan=True, mass_rtol=mass_rtol)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert res.value.dtype == res.plan.dtype == res.f.dtype == want
    for name in ("value", "plan", "marginal_error"):
        assert torch.isfinite(getattr(res, name)).all(), name
    assert not torch.isnan(res.f).any() and not torch.isnan(res.g).any()
    assert torch.isfinite(res.f[a > 0]).all() and torch.isfinite(res.g[b > 0]).all()
    assert (res.plan >= 0).all()
    # The reported error describes the returned plan, whose columns are exact, up to the rounding of the
    # exponent (u + v - C) / eps, i.e. a relative error of about machine-eps * cost / eps per entry.
    slack = 1e-6 + 8 * torch.finfo(want).eps * max(_scale(cost), scale) / eps
    a32, b32 = a.to(want), b.to(want)
    b32 = b32 * (a32.sum() / b32.sum())  # within mass_rtol the solver rescales b to the mass of a
    actual = (res.plan.sum(-1) - a32).abs().sum()
    assert actual.item() == pytest.approx(res.marginal_error.item(), rel=1e-3, abs=slack)
    assert (res.plan.sum(-2) - b32).abs().sum().item() <= slack


@settings(max_examples=30, deadline=None)
@given(problem=problems(max_size=6), eps_rel=st.floats(0.05, 5), seed=st.integers(0, 1000))
def test_sinkhorn_symmetries(problem, eps_rel, seed):
    """Transposing the problem swaps (f, g); permuting atoms permutes the solution; the value is invariant."""
    a, b, cost, scale = problem
    eps = eps_rel * scale
    tight = {"tol": 1e-12, "max_iter": 50_000}
    res = sinkhorn(a, b, cost, eps, return_plan=True, **tight)
    swapped = sinkhorn(b, a, cost.T, eps, return_plan=True, **tight)
    assert swapped.value.item() == pytest.approx(res.value.item(), abs=1e-9 * scale)
    torch.testing.assert_close(swapped.plan.T, res.plan, rtol=0, atol=1e-9)
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randperm(len(a), generator=g), torch.randperm(len(b), generator=g)
    permuted = sinkhorn(a[p], b[q], cost[p][:, q], eps, return_plan=True, **tight)
    assert permuted.value.item() == pytest.approx(res.value.item(), abs=1e-9 * scale)
    torch.testing.assert_close(permuted.plan, res.plan[p][:, q], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Unbalanced solver
# ----------------------------------------------------------------------------------------------


def _objective(plan, a, b, cost, eps, rho_a, rho_b):
    plan, a, b, cost = (t.double().numpy() for t in (plan, a, b, cost))

    def gkl(x, y):
        return (xlogy(x, x) - xlogy(x, y) - x + y).sum()

    value = (plan[plan > 0] * cost[plan > 0]).sum() + eps * gkl(plan, np.outer(a, b))
    value += rho_a * gkl(plan.sum(1), a) if math.isfinite(rho_a) else 0.0
    value += rho_b * gkl(plan.sum(0), b) if math.isfinite(rho_b) else 0.0
    return value


@PROPERTY
@given(
    problem=problems(balanced=False),
    log_eps_rel=st.floats(-4, 1),
    rho=st.tuples(st.floats(0.05, 20), st.floats(0.05, 20)),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_unbalanced_outputs_are_finite_and_value_is_the_objective(problem, log_eps_rel, rho, dtype):
    a, b, cost, scale = problem
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(dtype)
    eps = 10.0**log_eps_rel * scale
    rho = (rho[0] * scale, rho[1] * scale)
    res = unbalanced_sinkhorn(a, b, cost, eps, rho)
    for name in ("plan", "u", "v", "value"):
        assert torch.isfinite(getattr(res, name)).all(), name
    assert not torch.isnan(res.f).any() and not torch.isnan(res.g).any()
    assert not torch.isnan(res.potential_change).any()
    assert (res.plan >= 0).all() and (res.plan[cost.isinf()] == 0).all()
    if dtype == torch.float64:
        expected = _objective(res.plan, a, b, cost, eps, *rho)
        assert res.value.item() == pytest.approx(expected, rel=1e-9, abs=1e-9 * scale)


# ----------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors naming the problem
# ----------------------------------------------------------------------------------------------


def _ok(n=3, m=4, batch=None):
    shape = () if batch is None else (batch,)
    a = torch.full((*shape, n), 1.0 / n, dtype=torch.float64)
    b = torch.full((*shape, m), 1.0 / m, dtype=torch.float64)
    return a, b, torch.rand(*shape, n, m, dtype=torch.float64)


def _both(a, b, cost, eps=0.1):
    yield lambda: sinkhorn(a, b, cost, eps)
    yield lambda: unbalanced_sinkhorn(a, b, cost, eps, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.sampled_from([None, 1, 3]),
    n=st.integers(1, 5),
    m=st.integers(1, 5),
    which=st.sampled_from(["a", "b", "cost_rows", "cost_cols", "batch_b", "batch_cost", "rank"]),
    delta=st.integers(1, 3),
)
def test_mismatched_shapes_are_value_errors(batch, n, m, which, delta):
    a, b, cost = _ok(n, m, batch)
    if which == "a":
        a = torch.full((*a.shape[:-1], n + delta), 1.0 / (n + delta), dtype=torch.float64)
    elif which == "b":
        b = torch.full((*b.shape[:-1], m + delta), 1.0 / (m + delta), dtype=torch.float64)
    elif which == "cost_rows":
        cost = torch.rand(*cost.shape[:-2], n + delta, m, dtype=torch.float64)
    elif which == "cost_cols":
        cost = torch.rand(*cost.shape[:-2], n, m + delta, dtype=torch.float64)
    elif which == "batch_b":
        b = torch.full((1 if batch is None else batch + delta, m), 1.0 / m, dtype=torch.float64)
    elif which == "batch_cost":
        cost = torch.rand(2 if batch is None else batch + delta, n, m, dtype=torch.float64)
    else:
        cost = cost[None, None]
    for solve in _both(a, b, cost):
        with pytest.raises(ValueError, match=r"shape|problem needs|\(n,\)|\(B, n\)"):
            solve()


def _set(t: torch.Tensor, index, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


BAD_INPUTS = {
    "negative a": (lambda a, b, c: (_set(a, 2, -0.2), b, c), "a contains negative masses"),
    "negative b": (lambda a, b, c: (a, _set(b, 0, -1e-9), c), "b contains negative masses"),
    "nan a": (lambda a, b, c: (_set(a, 1, math.nan), b, c), "a contains NaN or inf"),
    "inf b": (lambda a, b, c: (a, _set(b, 3, math.inf), c), "b contains NaN or inf"),
    "zero mass": (lambda a, b, c: (torch.zeros_like(a), b, c), "a has a problem with zero total mass"),
    "nan cost": (lambda a, b, c: (a, b, _set(c, (1, 2), math.nan)), "cost contains NaN"),
    "-inf cost": (lambda a, b, c: (a, b, _set(c, (0, 0), -math.inf)), "cost contains -inf"),
    "integer a": (lambda a, b, c: (a.long(), b, c), "a must be a floating-point tensor"),
    "list b": (lambda a, b, c: (a, b.tolist(), c), "b must be a torch.Tensor"),
    "empty": (lambda a, b, c: (a, b[:0], c[:, :0]), "empty problem"),
}


@pytest.mark.parametrize("mutate,pattern", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_masses_and_costs_are_value_errors(mutate, pattern):
    a, b, cost = mutate(*_ok())
    for solve in _both(a, b, cost):
        with pytest.raises(ValueError, match=pattern):
            solve()


@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan, math.inf, -math.inf, None, "0.1x"])
def test_bad_eps_is_a_value_error(eps):
    for solve in _both(*_ok(), eps=eps):
        with pytest.raises(ValueError, match="eps"):
            solve()


@settings(max_examples=30, deadline=None)
@given(
    batch=st.sampled_from([None, 4]),
    gap=st.floats(1e-3, 10),
    which=st.integers(0, 3),
)
def test_unequal_masses_are_a_value_error_in_the_balanced_solver(batch, gap, which):
    a, b, cost = _ok(3, 4, batch)
    if batch is None:
        b = b * (1 + gap)
    else:
        b[which] = b[which] * (1 + gap)
    with pytest.raises(ValueError, match="equal masses") as info:
        sinkhorn(a, b, cost, 0.1)
    if batch is not None:
        assert f"problem {which}" in str(info.value)
    unbalanced_sinkhorn(a, b, cost, 0.1, 1.0)  # fine for the unbalanced solver


def test_mass_rtol_accepts_small_gaps_only():
    a, b, cost = _ok()
    sinkhorn(a, b * (1 + 1e-6), cost, 0.1)
    sinkhorn(a, b * (1 + 1e-3), cost, 0.1, mass_rtol=1e-2)
    with pytest.raises(ValueError, match="equal masses"):
        sinkhorn(a, b * (1 + 1e-3), cost, 0.1)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [({"scaling": 1.0}, "scaling"), ({"scaling": -0.1}, "scaling"), ({"max_iter": 0}, "max_iter")],
)
def test_bad_solver_options_are_value_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sinkhorn(*_ok(), 0.1, **kwargs)


@pytest.mark.parametrize(
    "rho,pattern",
    [
        (0.0, "rho_a"),
        (-1.0, "rho_a"),
        (math.nan, "rho_a"),
        ((1.0, 0.0), "rho_b"),
        ((1.0, -2.0), "rho_b"),
        ((math.nan, 1.0), "rho_a"),
        ((1.0,), "rho"),
        ((1.0, 2.0, 3.0), "rho"),
        ([], "rho"),
    ],
)
def test_bad_rho_is_a_value_error(rho, pattern):
    with pytest.raises(ValueError, match=pattern):
        unbalanced_sinkhorn(*_ok(), 0.1, rho)


def test_unbalanced_max_iter_is_checked():
    with pytest.raises(ValueError, match="max_iter"):
        unbalanced_sinkhorn(*_ok(), 0.1, 1.0, max_iter=0)


@pytest.mark.parametrize("rho", [None, "abc", (1.0, None)])
def test_non_numeric_rho_is_a_value_error_naming_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        unbalanced_sinkhorn(*_ok(), 0.1, rho)


def test_bfloat16_probabilities_are_accepted_with_default_options():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        a = torch.softmax(torch.randn(258, generator=g), 0).bfloat16()
        b = torch.softmax(torch.randn(258, generator=g), 0).bfloat16()
        cost = torch.rand(258, 258, generator=g).bfloat16()
        res = sinkhorn(a, b, cost, 0.01)
        assert torch.isfinite(res.value)
