"""Unbalanced entropic OT (`otalign.ot.unbalanced_sinkhorn`) against POT, optimality and the envelope property.

Objective (module docstring of `otalign/ot/unbalanced.py`), generalized KL(x||y) = sum x log(x/y) - x + y:
    <P, C> + eps KL(P || a b^T) + rho_a KL(P1 || a) + rho_b KL(P^T 1 || b),
which is POT's `ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=(rho_a, rho_b))` (reg_type "kl",
reference c = a b^T, plan diag(u) K diag(v) with K = a b^T exp(-C/eps), so f = eps * log u in our parametrisation).
POT's own reported objective is not used: the objective is recomputed here from the plan.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.special import xlogy

from otalign.ot import UnbalancedResult, sinkhorn, unbalanced_sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")

INF = math.inf
TIGHT = {"tol": 1e-13, "max_iter": 200_000}


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def gkl(x: np.ndarray, y: np.ndarray) -> float:
    return float((xlogy(x, x) - xlogy(x, y) - x + y).sum())


def objective(plan, a, b, cost, eps, rho_a, rho_b) -> float:
    """The unbalanced objective at ``plan``, with 0 * inf = 0 on forbidden pairs."""
    support = plan > 0
    value = (plan[support] * cost[support]).sum() + eps * gkl(plan, np.outer(a, b))
    if not math.isinf(rho_a):
        value += rho_a * gkl(plan.sum(1), a)
    if not math.isinf(rho_b):
        value += rho_b * gkl(plan.sum(0), b)
    return float(value)


def random_problem(rng, n, m, *, scale=1.0, mass_a=1.0, mass_b=0.7, forbid=0.0, zero_per_line=False):
    """Positive masses of the given totals and costs in [0, scale) with some +inf entries.

    ``zero_per_line`` puts a zero cost in every row and column (kept finite), which keeps POT's
    non-log solver free of under/overflow at small eps (its log-stabilized variant is not reliable
    there). Every row and column keeps a finite entry.
    """
    a = rng.random(n) + 0.05
    b = rng.random(m) + 0.05
    a, b = mass_a * a / a.sum(), mass_b * b / b.sum()
    cost = rng.random((n, m)) * scale
    keep = np.zeros((n, m), bool)
    rows, cols = np.arange(max(n, m)) % n, rng.permutation(max(n, m)) % m
    keep[rows, cols] = True  # one kept entry per row and per column
    if zero_per_line:
        cost[keep] = 0.0
    if forbid:
        cost[(rng.random((n, m)) < forbid) & ~keep] = INF
    return a, b, cost


def pot_unbalanced(a, b, cost, eps, rho_a, rho_b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, log = ot.unbalanced.sinkhorn_unbalanced(
            a, b, cost, eps, reg_m=(rho_a, rho_b), method="sinkhorn", numItermax=200_000, stopThr=1e-15, log=True
        )
    return plan, eps * log["logu"], eps * log["logv"]


def assert_finite_result(res: UnbalancedResult) -> None:
    for name in ("plan", "f", "g", "u", "v", "value", "potential_change"):
        assert not torch.isnan(getattr(res, name)).any(), f"NaN in {name}"
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.value).all()


# (n, m, cost scale, eps / scale, rho (in cost-scale units), forbidden fraction, problems)
POT_CASES = [
    (5, 7, 1.0, 1e-3, (0.5, 0.5), 0.0, 2),
    (6, 4, 2.0, 1e-3, (2.0, 0.3), 0.3, 2),
    (6, 6, 1.0, 1e-2, (1.0, INF), 0.0, 2),
    (4, 8, 1.0, 1e-2, (1.0, 1.0), 0.3, 3),
    (8, 8, 3.0, 0.1, (0.5, 0.5), 0.0, 3),
    (9, 5, 1.0, 0.1, (INF, 0.7), 0.4, 3),
    (10, 13, 1.0, 0.3, (5.0, 0.2), 0.3, 3),
    (1, 5, 1.0, 0.3, (1.0, 1.0), 0.0, 2),
    (7, 7, 5.0, 1.0, (1.0, 2.0), 0.2, 3),
    (12, 6, 1.0, 3.0, (0.2, 0.2), 0.0, 3),
    (6, 12, 1.0, 10.0, (1.0, INF), 0.3, 3),
]


@pytest.mark.parametrize("n,m,scale,eps_rel,rho,forbid,count", POT_CASES)
def test_matches_pot_sinkhorn_unbalanced(n, m, scale, eps_rel, rho, forbid, count):
    rng = np.random.default_rng([n, m, int(1e4 * eps_rel), int(10 * forbid)])
    eps = eps_rel * scale
    rho_a, rho_b = rho[0] * scale, rho[1] * scale
    for _ in range(count):
        a, b, cost = random_problem(
            rng, n, m, scale=scale, mass_a=rng.uniform(0.5, 2), mass_b=rng.uniform(0.5, 2), forbid=forbid,
            zero_per_line=eps_rel < 0.1,
        )  # fmt: skip
        plan_ref, f_ref, g_ref = pot_unbalanced(a, b, cost, eps, rho_a, rho_b)
        res = unbalanced_sinkhorn(_t(a), _t(b), _t(cost), eps, (rho_a, rho_b), **TIGHT)
        assert_finite_result(res)
        assert res.value.dtype == torch.float64
        plan = res.plan.numpy()
        np.testing.assert_allclose(plan, plan_ref, rtol=0, atol=1e-10 * (a.sum() + b.sum()))
        assert (plan[np.isinf(cost)] == 0).all()
        expected = objective(plan_ref, a, b, cost, eps, rho_a, rho_b)
        np.testing.assert_allclose(res.value.item(), expected, rtol=1e-10, atol=1e-11 * scale)
        # Our value is the objective at our own plan, too.
        np.testing.assert_allclose(
            res.value.item(), objective(plan, a, b, cost, eps, rho_a, rho_b), rtol=1e-12, atol=1e-12 * scale
        )
        # Potentials are unique when one marginal is soft: no centring needed.
        np.testing.assert_allclose(res.u.numpy(), f_ref, rtol=0, atol=1e-9 * max(scale, eps))
        np.testing.assert_allclose(res.v.numpy(), g_ref, rtol=0, atol=1e-9 * max(scale, eps))


def test_scalar_rho_is_the_symmetric_pair():
    rng = np.random.default_rng(1)
    a, b, cost = (_t(x) for x in random_problem(rng, 5, 6, forbid=0.2))
    one = unbalanced_sinkhorn(a, b, cost, 0.1, 0.7)
    pair = unbalanced_sinkhorn(a, b, cost, 0.1, (0.7, 0.7))
    for name in ("plan", "f", "g", "u", "v", "value"):
        torch.testing.assert_close(getattr(one, name), getattr(pair, name), rtol=0, atol=0)


def test_zero_mass_atoms_match_pot_on_the_reduced_problem():
    """Zero-mass atoms (POT itself cannot take them with c = a b^T) leave the rest of the solution unchanged."""
    rng = np.random.default_rng(2)
    eps, rho = 0.1, (0.5, 2.0)
    for _ in range(4):
        a, b, cost = random_problem(rng, 8, 9, mass_b=1.3, forbid=0.3)
        za, zb = rng.choice(8, 2, replace=False), rng.choice(9, 3, replace=False)
        a[za], b[zb] = 0.0, 0.0
        pa, pb = a > 0, b > 0
        keep = np.ix_(pa, pb)
        reduced = cost[keep]
        if not np.isfinite(reduced).any(1).all() or not np.isfinite(reduced).any(0).all():
            continue
        plan_ref, f_ref, g_ref = pot_unbalanced(a[pa], b[pb], reduced, eps, *rho)
        res = unbalanced_sinkhorn(_t(a), _t(b), _t(cost), eps, rho, **TIGHT)
        assert_finite_result(res)
        plan = res.plan.numpy()
        assert (plan[~pa] == 0).all() and (plan[:, ~pb] == 0).all()
        np.testing.assert_allclose(plan[keep], plan_ref, rtol=0, atol=1e-11)
        np.testing.assert_allclose(
            res.value.item(), objective(plan_ref, a[pa], b[pb], reduced, eps, *rho), rtol=1e-11, atol=1e-12
        )
        np.testing.assert_allclose(res.u.numpy()[pa], f_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(res.v.numpy()[pb], g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps_rel", [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0])
def test_first_order_optimality(eps_rel):
    """Stationarity of the (strictly convex) objective on every finite pair, independent of POT:
    C_ij + eps log(P_ij / a_i b_j) + rho_a log(P1_i / a_i) + rho_b log(P^T1_j / b_j) = 0."""
    rng = np.random.default_rng(int(1e5 * eps_rel))
    scale = 2.0
    eps, rho_a, rho_b = eps_rel * scale, 0.8 * scale, 0.3 * scale
    a, b, cost = random_problem(rng, 7, 9, scale=scale, mass_b=1.4, forbid=0.3)
    res = unbalanced_sinkhorn(_t(a), _t(b), _t(cost), eps, (rho_a, rho_b), tol=1e-12, max_iter=400_000)
    assert_finite_result(res)
    plan = res.plan.numpy()
    support = np.isfinite(cost) & (plan > 0)  # entries that did not underflow
    assert support.sum() >= max(a.size, b.size)
    row, col = plan.sum(1), plan.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        grad = (
            cost
            + eps * np.log(plan / np.outer(a, b))
            + rho_a * np.log(row / a)[:, None]
            + rho_b * np.log(col / b)[None, :]
        )
    np.testing.assert_allclose(grad[support], 0.0, rtol=0, atol=1e-8 * scale)
    # The damped fixed point: P1 = a exp(-f / rho_a) and P^T1 = b exp(-g / rho_b). The stopping rule bounds the
    # last change of the potentials, which understates the distance to the fixed point by ~rho / eps.
    rtol = max(1e-9, 1e-12 * rho_a / eps * 10)
    np.testing.assert_allclose(row, a * np.exp(-res.u.numpy() / rho_a), rtol=rtol)
    np.testing.assert_allclose(col, b * np.exp(-res.v.numpy() / rho_b), rtol=rtol)


def test_hard_marginals_reduce_to_balanced_sinkhorn():
    """rho = inf on both sides is balanced OT: same plan; value differs by eps (m^2 - sum a log a - sum b log b)."""
    rng = np.random.default_rng(3)
    for eps in (0.05, 0.5):
        a, b, cost = random_problem(rng, 6, 8, mass_a=1.0, mass_b=1.0, forbid=0.3)
        # forbidden pattern with one kept entry per row/column may be infeasible for balanced OT: use finite costs
        cost[np.isinf(cost)] = 5.0
        unb = unbalanced_sinkhorn(_t(a), _t(b), _t(cost), eps, INF, **TIGHT)
        bal = sinkhorn(_t(a), _t(b), _t(cost), eps, return_plan=True, **TIGHT)
        torch.testing.assert_close(unb.plan, bal.plan, rtol=0, atol=1e-11)
        shift = eps * (1.0 - xlogy(a, a).sum() - xlogy(b, b).sum())
        assert unb.value.item() == pytest.approx(bal.value.item() + shift, abs=1e-11)
        df = unb.u + eps * _t(np.log(a)) - bal.f
        torch.testing.assert_close(df, torch.full_like(df, df.mean().item()), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Envelope property: d value / d a_i = eps (sum b - r_i) + rho_a (1 - r_i), r_i = (P1)_i / a_i = exp(-f_i / rho_a)
# ----------------------------------------------------------------------------------------------


def _directional_derivative(fun, x, d, h):
    values = [fun(x + k * h * d) for k in (-2, -1, 1, 2)]
    return (values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h)


@pytest.mark.parametrize("eps,rho", [(0.05, (0.5, 1.0)), (0.5, (2.0, 0.3)), (2.0, (1.0, 1.0))])
def test_envelope_gradient_in_masses(eps, rho):
    rng = np.random.default_rng(int(100 * eps))
    a_np, b_np, c_np = random_problem(rng, 6, 7, mass_b=1.5, forbid=0.3)
    a, b, cost = _t(a_np), _t(b_np), _t(c_np)
    rho_a, rho_b = rho
    res = unbalanced_sinkhorn(a, b, cost, eps, rho, **TIGHT)
    r_a = torch.exp(-res.u / rho_a)
    r_b = torch.exp(-res.v / rho_b)
    torch.testing.assert_close(r_a, res.plan.sum(-1) / a, rtol=1e-10, atol=0)
    grad_a = eps * (b.sum() - r_a) + rho_a * (1 - r_a)
    grad_b = eps * (a.sum() - r_b) + rho_b * (1 - r_b)
    for _ in range(3):
        for x, grad, make in (
            (a, grad_a, lambda x: unbalanced_sinkhorn(x, b, cost, eps, rho, **TIGHT).value.item()),
            (b, grad_b, lambda y: unbalanced_sinkhorn(a, y, cost, eps, rho, **TIGHT).value.item()),
        ):
            d = torch.from_numpy(rng.standard_normal(x.shape[0]))
            d = d / d.abs().sum()  # any direction: the masses are free
            fd = _directional_derivative(make, x, d, h=1e-4 * float(x.min()))
            assert fd == pytest.approx(float((grad * d).sum()), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Batching, padding, single problems
# ----------------------------------------------------------------------------------------------


def test_batched_equals_per_problem_and_padding_is_neutral():
    rng = np.random.default_rng(4)
    eps, rho = 0.1, (0.5, 1.5)
    shapes = [(3, 5), (6, 2), (6, 6), (1, 4)]
    bare = [random_problem(rng, n, m, mass_a=rng.uniform(0.5, 2), forbid=0.3) for n, m in shapes]
    a = torch.zeros(len(bare), 6, dtype=torch.float64)
    b = torch.zeros(len(bare), 6, dtype=torch.float64)
    cost = torch.from_numpy(rng.random((len(bare), 6, 6)))
    for k, (pa, pb, pc) in enumerate(bare):
        a[k, : len(pa)], b[k, : len(pb)], cost[k, : len(pa), : len(pb)] = _t(pa), _t(pb), _t(pc)
    batched = unbalanced_sinkhorn(a, b, cost, eps, rho, **TIGHT)
    assert batched.plan.shape == (4, 6, 6) and batched.f.shape == (4, 6) and batched.value.shape == (4,)
    assert_finite_result(batched)
    for k, (pa, pb, pc) in enumerate(bare):
        alone = unbalanced_sinkhorn(_t(pa), _t(pb), _t(pc), eps, rho, **TIGHT)
        n, m = len(pa), len(pb)
        torch.testing.assert_close(batched.plan[k, :n, :m], alone.plan, rtol=0, atol=1e-12)
        assert (batched.plan[k, n:] == 0).all() and (batched.plan[k, :, m:] == 0).all()
        torch.testing.assert_close(batched.value[k], alone.value, rtol=0, atol=1e-12)
        torch.testing.assert_close(batched.u[k, :n], alone.u, rtol=0, atol=1e-11)
        torch.testing.assert_close(batched.v[k, :m], alone.v, rtol=0, atol=1e-11)


def test_unbatched_input_gives_the_batch_of_one_squeezed():
    rng = np.random.default_rng(5)
    a, b, cost = (_t(x) for x in random_problem(rng, 4, 7, forbid=0.2))
    single = unbalanced_sinkhorn(a, b, cost, 0.2, (1.0, 0.5))
    batch = unbalanced_sinkhorn(a[None], b[None], cost[None], 0.2, (1.0, 0.5))
    assert single.plan.shape == (4, 7) and single.f.shape == (4,) and single.g.shape == (7,)
    assert single.value.shape == () and single.potential_change.shape == ()
    assert single.n_iter == batch.n_iter
    for name in ("plan", "f", "g", "u", "v", "value", "potential_change"):
        torch.testing.assert_close(getattr(single, name), getattr(batch, name)[0], rtol=0, atol=0)


def test_half_and_float32_inputs():
    rng = np.random.default_rng(6)
    a, b, cost = (_t(x) for x in random_problem(rng, 6, 6, forbid=0.2))
    ref = unbalanced_sinkhorn(a, b, cost, 0.1, 1.0, **TIGHT)
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
        res = unbalanced_sinkhorn(a.to(dtype), b.to(dtype), cost.to(dtype), 0.1, 1.0)
        assert res.plan.dtype == res.value.dtype == torch.float32
        assert_finite_result(res)
        torch.testing.assert_close(res.value.double(), ref.value, rtol=0, atol=atol)
        torch.testing.assert_close(res.plan.double(), ref.plan, rtol=0, atol=atol)


@pytest.mark.parametrize("row_mass", [0.3, 0.0])
def test_fully_forbidden_row_is_like_a_huge_finite_cost(row_mass):
    a = torch.tensor([0.5, 0.5, row_mass], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0], [INF, INF]], dtype=torch.float64)
    res = unbalanced_sinkhorn(a, b, cost, 0.1, 1.0, **TIGHT)
    huge = unbalanced_sinkhorn(a, b, torch.where(cost.isinf(), 1e4, cost), 0.1, 1.0, **TIGHT)
    assert_finite_result(res)
    torch.testing.assert_close(res.plan, huge.plan)
    torch.testing.assert_close(res.value, huge.value)
