"""Balanced entropic OT (`otalign.ot.sinkhorn`) against POT, the envelope property and batching.

Conventions checked here (see `otalign/ot/sinkhorn.py`):
- value = <P, C> + eps * sum P (log P - 1); POT's `reg_type="entropy"` value is <P, C> + eps * sum P log P,
  so ours = POT's - eps * mass.
- P_ij = exp((f_i + g_j - C_ij) / eps), the same parametrisation as POT's `sinkhorn_log` with f = eps * log_u.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.special import xlogy

from otalign.ot import SinkhornResult, sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TIGHT = {"tol": 1e-13, "max_iter": 100_000}


# ----------------------------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------------------------


def _masses(rng: np.random.Generator, size: int, n_zero: int) -> np.ndarray:
    w = rng.random(size) + 0.05
    if n_zero:
        w[rng.choice(size, size=n_zero, replace=False)] = 0.0
    return w / w.sum()


def _north_west_path(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """Cells of the north-west-corner plan's staircase (a feasible plan lives on them)."""
    rest_a, rest_b = a.copy(), b.copy()
    i = j = 0
    cells = []
    while i < len(a) and j < len(b):
        cells.append((i, j))
        moved = min(rest_a[i], rest_b[j])
        rest_a[i] -= moved
        rest_b[j] -= moved
        if rest_a[i] <= rest_b[j] and i < len(a) - 1:
            i += 1
        else:
            j += 1
    cells += [(len(a) - 1, jj) for jj in range(j, len(b))]
    return cells


def _connected(a: np.ndarray, b: np.ndarray, finite: np.ndarray) -> bool:
    """Positive-mass atoms form one component of the bipartite graph of finite costs."""
    rows, cols = np.flatnonzero(a > 0), np.flatnonzero(b > 0)
    link = finite[np.ix_(rows, cols)]
    seen_r, seen_c = np.zeros(len(rows), bool), np.zeros(len(cols), bool)
    seen_r[0] = True
    while True:
        new_c = link[seen_r].any(0) & ~seen_c
        seen_c |= new_c
        new_r = link[:, seen_c].any(1) & ~seen_r
        seen_r |= new_r
        if not new_c.any() and not new_r.any():
            return bool(seen_r.all() and seen_c.all())


def random_problem(
    rng: np.random.Generator,
    n: int,
    m: int,
    *,
    scale: float = 1.0,
    n_zero_a: int = 0,
    n_zero_b: int = 0,
    forbid: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masses of total 1 and a cost in [0, scale) with a fraction ``forbid`` of +inf entries.

    Forbidden pairs keep the problem feasible (the north-west-corner staircase stays finite),
    keep every atom linked to a positive-mass atom of the other side, and keep the positive
    atoms connected, so the potentials are unique up to one additive constant.
    """
    while True:
        a, b = _masses(rng, n, n_zero_a), _masses(rng, m, n_zero_b)
        cost = rng.random((n, m)) * scale
        if forbid:
            finite = rng.random((n, m)) >= forbid
            for i, j in _north_west_path(a, b):
                finite[i, j] = True
            for i in range(n):
                if not finite[i, b > 0].any():
                    finite[i, rng.choice(np.flatnonzero(b > 0))] = True
            for j in range(m):
                if not finite[a > 0, j].any():
                    finite[rng.choice(np.flatnonzero(a > 0)), j] = True
            if not _connected(a, b, finite):
                continue
            cost[~finite] = np.inf
        return a, b, cost


def pot_balanced(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float):
    """POT's log-domain Sinkhorn: (plan, f, g) with f = eps * log_u."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=200_000, stopThr=1e-12, log=True)
    return plan, eps * log["log_u"], eps * log["log_v"]


def entropic_value(plan: np.ndarray, cost: np.ndarray, eps: float) -> float:
    """<P, C> + eps * sum P (log P - 1), with 0 * inf = 0 on forbidden pairs."""
    support = plan > 0
    return float((plan[support] * cost[support]).sum() + eps * (xlogy(plan, plan) - plan).sum())


def assert_potentials_match(f, g, f_ref, g_ref, a, b, atol):
    """(f, g) == (f_ref + t, g_ref - t) on positive-mass atoms for one constant t."""
    pos_a, pos_b = a > 0, b > 0
    df, dg = f[pos_a] - f_ref[pos_a], g[pos_b] - g_ref[pos_b]
    shift = float(np.average(df, weights=a[pos_a]))
    np.testing.assert_allclose(df, shift, rtol=0, atol=atol)
    np.testing.assert_allclose(dg, -shift, rtol=0, atol=atol)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def assert_no_nan(res: SinkhornResult) -> None:
    for name in ("f", "g", "value", "marginal_error", "plan"):
        t = getattr(res, name)
        if t is not None:
            assert not torch.isnan(t).any(), f"NaN in {name}"
    assert torch.isfinite(res.value).all() and torch.isfinite(res.marginal_error).all()
    if res.plan is not None:
        assert torch.isfinite(res.plan).all()


# ----------------------------------------------------------------------------------------------
# POT oracle
# ----------------------------------------------------------------------------------------------

# (n, m, cost scale, eps / scale, fraction forbidden, zero-mass atoms on (a, b), problems)
POT_CASES = [
    (5, 5, 1.0, 1e-3, 0.0, (0, 0), 1),
    (4, 7, 3.0, 1e-3, 0.3, (1, 0), 1),
    (6, 6, 1.0, 1e-2, 0.0, (0, 0), 3),
    (7, 4, 2.0, 1e-2, 0.3, (1, 1), 3),
    (8, 13, 1.0, 3e-2, 0.4, (2, 3), 3),
    (10, 10, 5.0, 0.1, 0.0, (0, 0), 4),
    (9, 14, 1.0, 0.1, 0.3, (1, 2), 4),
    (15, 6, 10.0, 0.3, 0.5, (2, 0), 4),
    (1, 6, 1.0, 0.1, 0.0, (0, 1), 2),
    (6, 1, 1.0, 0.1, 0.0, (1, 0), 2),
    (12, 12, 1.0, 1.0, 0.2, (1, 1), 4),
    (20, 7, 2.0, 3.0, 0.0, (0, 0), 4),
    (7, 20, 1.0, 10.0, 0.3, (0, 2), 4),
]


@pytest.mark.parametrize("n,m,scale,eps_rel,forbid,zeros,count", POT_CASES)
def test_matches_pot_sinkhorn_log(n, m, scale, eps_rel, forbid, zeros, count):
    rng = np.random.default_rng([n, m, int(1e4 * eps_rel), int(10 * forbid)])
    eps = eps_rel * scale
    for _ in range(count):
        a, b, cost = random_problem(rng, n, m, scale=scale, n_zero_a=zeros[0], n_zero_b=zeros[1], forbid=forbid)
        plan_ref, f_ref, g_ref = pot_balanced(a, b, cost, eps)
        res = sinkhorn(_t(a), _t(b), _t(cost), eps, return_plan=True, **TIGHT)
        assert_no_nan(res)
        assert res.value.dtype == torch.float64
        plan = res.plan.numpy()

        np.testing.assert_allclose(plan, plan_ref, rtol=0, atol=1e-10)
        assert (plan[np.isinf(cost)] == 0).all()
        assert (plan[a == 0] == 0).all() and (plan[:, b == 0] == 0).all()
        np.testing.assert_allclose(
            res.value.item(), entropic_value(plan_ref, cost, eps), rtol=1e-11, atol=1e-11 * scale
        )
        assert_potentials_match(res.f.numpy(), res.g.numpy(), f_ref, g_ref, a, b, atol=1e-9 * max(scale, eps))
        # Documented conventions: f = -inf exactly on zero-mass atoms, finite elsewhere.
        assert torch.isneginf(res.f[_t(a == 0)]).all() and torch.isfinite(res.f[_t(a > 0)]).all()
        assert torch.isneginf(res.g[_t(b == 0)]).all() and torch.isfinite(res.g[_t(b > 0)]).all()


@pytest.mark.parametrize("eps_rel", [1e-2, 0.1, 1.0, 10.0])
def test_value_matches_pot_solve(eps_rel):
    """`ot.solve(..., reg_type="entropy")` reports <P,C> + eps sum P log P: ours is that minus eps * mass."""
    rng = np.random.default_rng(int(eps_rel * 1000))
    for n, m in [(6, 6), (5, 11), (13, 4)]:
        a, b, cost = random_problem(rng, n, m, scale=2.0)
        mass = 2.5
        a, b = a * mass, b * mass  # a total mass other than 1 exercises the eps * mass term
        eps = 2.0 * eps_rel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ot.solve(cost, a, b, reg=eps, reg_type="entropy", max_iter=200_000, tol=1e-12)
        res = sinkhorn(_t(a), _t(b), _t(cost), eps, return_plan=True, **TIGHT)
        np.testing.assert_allclose(res.value.item(), float(ref.value) - eps * mass, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(res.plan.numpy(), ref.plan, rtol=0, atol=1e-10 * mass)
        f_ref, g_ref = (eps * np.asarray(p) for p in ref.potentials)
        assert_potentials_match(res.f.numpy(), res.g.numpy(), f_ref, g_ref, a, b, atol=1e-9 * max(2.0, eps))


def test_reported_diagnostics_describe_the_returned_plan():
    """marginal_error is ||P1 - a||_1 of the returned plan, columns are exact, value is the primal value."""
    rng = np.random.default_rng(7)
    for tol in (1e-3, 1e-6, 1e-10):
        a, b, cost = random_problem(rng, 9, 12, scale=1.0, n_zero_a=1, forbid=0.3)
        res = sinkhorn(_t(a), _t(b), _t(cost), 0.02, tol=tol, max_iter=100_000, return_plan=True, check_every=1)
        plan = res.plan.numpy()
        row_err = np.abs(plan.sum(1) - a).sum()
        assert res.marginal_error.item() <= tol
        np.testing.assert_allclose(res.marginal_error.item(), row_err, rtol=1e-6, atol=1e-15)
        np.testing.assert_allclose(plan.sum(0), b, rtol=0, atol=1e-14)
        # The dual value equals the primal value of the returned plan up to the marginal error.
        assert abs(res.value.item() - entropic_value(plan, cost, 0.02)) <= 5 * row_err + 1e-12
        assert res.n_iter >= 1


def test_max_iter_is_respected_and_results_stay_finite():
    rng = np.random.default_rng(8)
    a, b, cost = random_problem(rng, 10, 10, scale=1.0)
    for max_iter in (1, 2, 7):
        res = sinkhorn(_t(a), _t(b), _t(cost), 1e-3, max_iter=max_iter, tol=0.0, return_plan=True)
        assert res.n_iter == max_iter
        assert res.marginal_error.item() > 0
        assert_no_nan(res)


def test_eps_scaling_does_not_change_the_solution():
    rng = np.random.default_rng(9)
    a, b, cost = random_problem(rng, 8, 11, scale=4.0, forbid=0.3, n_zero_b=1)
    with_scaling = sinkhorn(_t(a), _t(b), _t(cost), 0.05, return_plan=True, **TIGHT)
    without = sinkhorn(_t(a), _t(b), _t(cost), 0.05, scaling=0.0, return_plan=True, **TIGHT)
    torch.testing.assert_close(with_scaling.plan, without.plan, rtol=0, atol=1e-11)
    torch.testing.assert_close(with_scaling.value, without.value, rtol=0, atol=1e-11)


@pytest.mark.parametrize("omega", [0.7, 1.5, 1.8])
@pytest.mark.parametrize("n,m,scale,eps_rel,forbid,zeros,count", POT_CASES[:4])
def test_overrelaxation_matches_pot(omega, n, m, scale, eps_rel, forbid, zeros, count):
    """Over-relaxed Sinkhorn has POT's solution (same fixed point) and its reported error is the true one."""
    rng = np.random.default_rng([n, m, int(10 * omega)])
    eps = eps_rel * scale
    for _ in range(count):
        a, b, cost = random_problem(rng, n, m, scale=scale, n_zero_a=zeros[0], n_zero_b=zeros[1], forbid=forbid)
        plan_ref, f_ref, g_ref = pot_balanced(a, b, cost, eps)
        res = sinkhorn(_t(a), _t(b), _t(cost), eps, return_plan=True, overrelaxation=omega, **TIGHT)
        assert_no_nan(res)
        assert bool(res.converged)
        np.testing.assert_allclose(res.plan.numpy(), plan_ref, rtol=0, atol=1e-10)
        assert_potentials_match(res.f.numpy(), res.g.numpy(), f_ref, g_ref, a, b, atol=1e-9 * max(scale, eps))
        np.testing.assert_allclose(res.plan.numpy().sum(0), b, rtol=0, atol=1e-12)  # the test saw exact columns


@pytest.mark.parametrize("eps,omega", [(0.04, 1.3), (0.005, 1.7)])
def test_overrelaxation_needs_fewer_iterations_at_small_eps(eps, omega):
    """The point of w > 1: the same tolerance in fewer iterations, in the kernel-domain path (eps 0.04: every cost
    within 30 eps) and the stabilised one (eps 0.005); the best w grows as eps shrinks against the costs."""
    a, b, cost = (_t(x) for x in random_problem(np.random.default_rng(11), 30, 30, scale=1.0))
    plain = sinkhorn(a, b, cost, eps, tol=1e-9, max_iter=100_000, return_plan=True)
    fast = sinkhorn(a, b, cost, eps, tol=1e-9, max_iter=100_000, return_plan=True, overrelaxation=omega)
    assert bool(plain.converged) and bool(fast.converged)
    assert fast.n_iter < 0.6 * plain.n_iter, (fast.n_iter, plain.n_iter)
    torch.testing.assert_close(fast.plan, plain.plan, rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.value, plain.value, rtol=0, atol=1e-9)


@pytest.mark.parametrize("omega", [0.0, 2.0, -1.0])
def test_overrelaxation_outside_the_open_interval_is_refused(omega):
    with pytest.raises(ValueError, match="overrelaxation"):
        sinkhorn(torch.ones(3) / 3, torch.ones(3) / 3, torch.rand(3, 3), 0.1, overrelaxation=omega)


# ----------------------------------------------------------------------------------------------
# Envelope property: d value / d a = f (and d value / d b = g) up to a constant on the simplex
# ----------------------------------------------------------------------------------------------


def _directional_derivative(fun, x: torch.Tensor, d: torch.Tensor, h: float) -> float:
    """Fourth-order central difference of ``fun`` at ``x`` along ``d``."""
    values = [fun(x + k * h * d) for k in (-2, -1, 1, 2)]
    return (values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h)


ENVELOPE_CASES = [
    (6, 6, 0.01, 0.0),
    (5, 9, 0.05, 0.3),
    (9, 4, 0.3, 0.0),
    (7, 7, 1.0, 0.4),
    (8, 5, 10.0, 0.0),
]


@pytest.mark.parametrize("n,m,eps_rel,forbid", ENVELOPE_CASES)
def test_envelope_gradient_is_the_potential(n, m, eps_rel, forbid):
    rng = np.random.default_rng([n, m, int(100 * eps_rel)])
    scale = 2.0
    eps = eps_rel * scale
    a_np, b_np, c_np = random_problem(rng, n, m, scale=scale, forbid=forbid)
    a, b, cost = _t(a_np), _t(b_np), _t(c_np)
    res = sinkhorn(a, b, cost, eps, **TIGHT)

    def value_a(x):
        return sinkhorn(x, b, cost, eps, **TIGHT).value.item()

    def value_b(y):
        return sinkhorn(a, y, cost, eps, **TIGHT).value.item()

    for _ in range(3):
        for side, fun, x, pot in (("a", value_a, a, res.f), ("b", value_b, b, res.g)):
            d = torch.from_numpy(rng.standard_normal(x.shape[0]))
            d = (d - d.mean()) / d.abs().sum()  # stays on the simplex: sum(d) = 0
            fd = _directional_derivative(fun, x, d, h=1e-4 * float(x.min()))
            assert fd == pytest.approx(float((pot * d).sum()), abs=2e-9 * max(scale, eps)), side


def test_envelope_with_zero_mass_atoms_restricted_to_the_support():
    """With zero-mass atoms the envelope property holds along directions inside the support."""
    rng = np.random.default_rng(11)
    a_np, b_np, c_np = random_problem(rng, 7, 8, scale=1.0, n_zero_a=2, n_zero_b=2, forbid=0.2)
    a, b, cost = _t(a_np), _t(b_np), _t(c_np)
    eps = 0.1
    res = sinkhorn(a, b, cost, eps, **TIGHT)
    support = a > 0
    for _ in range(3):
        d = torch.zeros_like(a)
        d[support] = torch.from_numpy(rng.standard_normal(int(support.sum())))
        d[support] -= d[support].mean()
        fd = _directional_derivative(lambda x: sinkhorn(x, b, cost, eps, **TIGHT).value.item(), a, d, h=1e-5)
        assert fd == pytest.approx(float((res.f[support] * d[support]).sum()), abs=2e-9)


# ----------------------------------------------------------------------------------------------
# Batching and single problems
# ----------------------------------------------------------------------------------------------


def _stack(problems):
    return tuple(torch.stack([_t(p[k]) for p in problems]) for k in range(3))


@pytest.mark.parametrize("eps", [0.02, 0.5])
def test_batched_equals_per_problem(eps):
    rng = np.random.default_rng(12)
    problems = [random_problem(rng, 7, 10, scale=1.0, n_zero_a=k % 2, n_zero_b=k % 3, forbid=0.3) for k in range(6)]
    a, b, cost = _stack(problems)
    batched = sinkhorn(a, b, cost, eps, return_plan=True, **TIGHT)
    assert batched.f.shape == (6, 7) and batched.g.shape == (6, 10)
    assert batched.value.shape == (6,) and batched.marginal_error.shape == (6,)
    assert batched.plan.shape == (6, 7, 10)
    for k, (pa, pb, pc) in enumerate(problems):
        single = sinkhorn(_t(pa), _t(pb), _t(pc), eps, return_plan=True, **TIGHT)
        torch.testing.assert_close(batched.plan[k], single.plan, rtol=0, atol=1e-11)
        torch.testing.assert_close(batched.value[k], single.value, rtol=0, atol=1e-11)
        pos_a, pos_b = _t(pa > 0), _t(pb > 0)
        df = batched.f[k][pos_a] - single.f[pos_a]
        dg = batched.g[k][pos_b] - single.g[pos_b]
        torch.testing.assert_close(df, torch.full_like(df, df.mean().item()), rtol=0, atol=1e-10)
        torch.testing.assert_close(dg, -torch.full_like(dg, df.mean().item()), rtol=0, atol=1e-10)


def test_unbatched_input_gives_the_batch_of_one_squeezed():
    rng = np.random.default_rng(13)
    a, b, cost = (_t(x) for x in random_problem(rng, 5, 8, forbid=0.2, n_zero_a=1))
    single = sinkhorn(a, b, cost, 0.1, return_plan=True)
    batch = sinkhorn(a[None], b[None], cost[None], 0.1, return_plan=True)
    assert single.f.shape == (5,) and single.g.shape == (8,) and single.plan.shape == (5, 8)
    assert single.value.shape == () and single.marginal_error.shape == ()
    assert single.n_iter == batch.n_iter
    for name in ("f", "g", "value", "marginal_error", "plan"):
        torch.testing.assert_close(getattr(single, name), getattr(batch, name)[0], rtol=0, atol=0)


def test_zero_mass_padding_does_not_change_the_solution():
    """A problem padded with zero-mass atoms (finite padding costs) inside a batch solves like the bare problem."""
    rng = np.random.default_rng(14)
    eps = 0.05
    bare = [random_problem(rng, n, m, forbid=0.2) for n, m in [(3, 6), (6, 2), (5, 5)]]
    n_max, m_max = 6, 6
    a = torch.zeros(3, n_max, dtype=torch.float64)
    b = torch.zeros(3, m_max, dtype=torch.float64)
    cost = torch.from_numpy(rng.random((3, n_max, m_max)))
    for k, (pa, pb, pc) in enumerate(bare):
        a[k, : len(pa)], b[k, : len(pb)], cost[k, : len(pa), : len(pb)] = _t(pa), _t(pb), _t(pc)
    padded = sinkhorn(a, b, cost, eps, return_plan=True, **TIGHT)
    assert_no_nan(padded)
    for k, (pa, pb, pc) in enumerate(bare):
        alone = sinkhorn(_t(pa), _t(pb), _t(pc), eps, return_plan=True, **TIGHT)
        n, m = len(pa), len(pb)
        torch.testing.assert_close(padded.plan[k, :n, :m], alone.plan, rtol=0, atol=1e-11)
        assert (padded.plan[k, n:] == 0).all() and (padded.plan[k, :, m:] == 0).all()
        torch.testing.assert_close(padded.value[k], alone.value, rtol=0, atol=1e-11)
        df = padded.f[k, :n] - alone.f
        torch.testing.assert_close(df, torch.full_like(df, df.mean().item()), rtol=0, atol=1e-10)


def test_zero_mass_atom_with_only_forbidden_pairs_gives_no_nan():
    inf = math.inf
    a = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0], [inf, inf]], dtype=torch.float64)
    res = sinkhorn(a, b, cost, 0.1, return_plan=True, max_iter=200)
    alone = sinkhorn(a[:2], b, cost[:2], 0.1, return_plan=True, max_iter=200)
    assert_no_nan(res)
    torch.testing.assert_close(res.plan[:2], alone.plan)
    torch.testing.assert_close(res.value, alone.value)


def test_float32_and_half_inputs_compute_in_float32():
    rng = np.random.default_rng(15)
    a, b, cost = (_t(x) for x in random_problem(rng, 6, 6, scale=1.0))
    ref = sinkhorn(a, b, cost, 0.1, return_plan=True, **TIGHT)
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
        res = sinkhorn(a.to(dtype), b.to(dtype), cost.to(dtype), 0.1, return_plan=True, mass_rtol=1e-2)
        assert res.f.dtype == res.value.dtype == res.plan.dtype == torch.float32
        assert_no_nan(res)
        torch.testing.assert_close(res.value.double(), ref.value, rtol=0, atol=atol)
        torch.testing.assert_close(res.plan.double(), ref.plan, rtol=0, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(16)
    a, b, cost = _stack([random_problem(rng, 9, 9, forbid=0.3, n_zero_a=1) for _ in range(4)])
    cpu = sinkhorn(a.float(), b.float(), cost.float(), 0.05, return_plan=True)
    gpu = sinkhorn(a.float().cuda(), b.float().cuda(), cost.float().cuda(), 0.05, return_plan=True)
    assert gpu.plan.is_cuda
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, rtol=0, atol=1e-5)
