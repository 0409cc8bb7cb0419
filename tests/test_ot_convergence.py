"""Per-problem convergence of the OT solvers: `converged` flags, frozen problems, the potentials' naming convention."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from otalign.ot import sinkhorn, unbalanced_sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _problems(seed: int, count: int, n: int = 12, m: int = 9, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(count, n, generator=gen, dtype=dtype) + 0.05
    b = torch.rand(count, m, generator=gen, dtype=dtype) + 0.05
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    cost = torch.rand(count, n, m, generator=gen, dtype=dtype)
    return a, b, cost


def test_easy_problems_freeze_early_and_match_their_own_solve():
    """A batch mixing large-eps (fast) and small-eps-like (slow, here: scaled-up cost) problems: each problem's
    iterations are its own, and its solution is the one it gets alone, to the tolerance."""
    a, b, cost = _problems(0, 6)
    cost = cost * torch.tensor([1.0, 1.0, 1.0, 40.0, 40.0, 40.0], dtype=cost.dtype)[:, None, None]
    tol = 1e-10
    batch = sinkhorn(a, b, cost, 0.1, tol=tol, max_iter=100_000, scaling=0.0, check_every=1)
    assert bool(batch.converged.all())
    assert int(batch.iters[:3].max()) < int(batch.iters[3:].min())
    assert batch.n_iter == int(batch.iters.max())
    for k in range(6):
        alone = sinkhorn(a[k], b[k], cost[k], 0.1, tol=tol, max_iter=100_000, scaling=0.0, check_every=1)
        assert int(alone.iters) == int(batch.iters[k])
        torch.testing.assert_close(batch.f[k], alone.f, rtol=0, atol=1e-12)
        assert batch.marginal_error[k] <= tol


def test_converged_flags_the_problems_that_hit_max_iter():
    a, b, cost = _problems(1, 4)
    cost = cost * torch.tensor([0.05, 0.05, 30.0, 30.0], dtype=cost.dtype)[:, None, None]
    res = sinkhorn(a, b, cost, 0.1, tol=1e-9, max_iter=60, scaling=0.0, check_every=1)
    assert res.converged.tolist() == (res.marginal_error <= 1e-9).tolist()
    assert res.converged[:2].all() and not res.converged[2:].any()
    assert (res.iters[2:] == 60).all()


def test_unbalanced_converged_and_iters():
    a, b, cost = _problems(2, 3)
    res = unbalanced_sinkhorn(a, b, cost, 0.05, (0.5, 2.0), tol=1e-11, max_iter=50_000)
    assert res.converged.dtype == torch.bool and bool(res.converged.all())
    assert (res.potential_change <= 1e-11).all()
    capped = unbalanced_sinkhorn(a, b, cost, 0.05, (0.5, 2.0), tol=1e-11, max_iter=3)
    assert not capped.converged.any() and (capped.iters == 3).all()


@pytest.mark.parametrize("solver", ["balanced", "unbalanced"])
def test_one_potential_convention(solver):
    """Both results: u, v with P = a_i b_j exp((u_i + v_j - C_ij)/eps); f = u + eps log a, g = v + eps log b with
    P = exp((f_i + g_j - C_ij)/eps), -inf on zero-mass atoms."""
    a, b, cost = _problems(3, 2)
    a[0, 3] = 0.0
    a = a / a.sum(-1, keepdim=True)
    eps = 0.2
    if solver == "balanced":
        res = sinkhorn(a, b, cost, eps, tol=1e-12, max_iter=10_000, return_plan=True)
    else:
        res = unbalanced_sinkhorn(a, b, cost, eps, 1.0, tol=1e-12, max_iter=10_000)
    torch.testing.assert_close(res.f[a > 0], (res.u + eps * a.log())[a > 0], rtol=0, atol=1e-12)
    assert torch.isneginf(res.f[0, 3]) and torch.isfinite(res.u).all()
    torch.testing.assert_close(res.g, res.v + eps * b.log(), rtol=0, atol=1e-12)
    from_u = a[..., None] * b[..., None, :] * torch.exp((res.u[..., None] + res.v[..., None, :] - cost) / eps)
    from_f = torch.exp((res.f[..., None] + res.g[..., None, :] - cost) / eps)
    torch.testing.assert_close(res.plan, from_u, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(res.plan, from_f, rtol=1e-9, atol=1e-14)


def test_unbalanced_without_plan_gives_the_same_marginals_and_value():
    a, b, cost = _problems(4, 3)
    b = 1.7 * b
    with_plan = unbalanced_sinkhorn(a, b, cost, 0.1, (0.3, 0.8), tol=1e-12, max_iter=20_000)
    without = unbalanced_sinkhorn(a, b, cost, 0.1, (0.3, 0.8), tol=1e-12, max_iter=20_000, return_plan=False)
    assert without.plan is None
    torch.testing.assert_close(without.row_marginal, with_plan.plan.sum(-1), rtol=0, atol=1e-13)
    torch.testing.assert_close(without.col_marginal, with_plan.plan.sum(-2), rtol=0, atol=1e-13)
    torch.testing.assert_close(without.value, with_plan.value, rtol=0, atol=1e-13)
    plan = ot.unbalanced.sinkhorn_unbalanced(
        a[0].numpy(), b[0].numpy(), cost[0].numpy(), 0.1, reg_m=(0.3, 0.8), stopThr=1e-15, numItermax=100_000
    )
    np.testing.assert_allclose(without.row_marginal[0].numpy(), plan.sum(1), rtol=0, atol=1e-11)


def test_large_scalings_on_an_exact_kernel_are_accepted_without_a_rebuild():
    """Cost range below eps: no kernel entry can underflow, so convergence is accepted with large scalings
    (no extra iterations on a fresh kernel), and the solution still matches POT."""
    _, _, cost = _problems(5, 1, n=60, m=80)
    a, b = torch.ones(1, 60, dtype=cost.dtype), torch.ones(1, 80, dtype=cost.dtype)  # OTPO's masses
    res = unbalanced_sinkhorn(a, b, cost, 1.0, 5.0, tol=1e-9, check_every=1)  # potentials move by several eps
    plan = ot.unbalanced.sinkhorn_unbalanced(
        a[0].numpy(), b[0].numpy(), cost[0].numpy(), 1.0, reg_m=5.0, stopThr=1e-15, numItermax=100_000
    )
    assert bool(res.converged.all()) and res.u.abs().max() > 1.0  # |log s| > 1 at eps = 1
    np.testing.assert_allclose(res.plan[0].numpy(), plan, rtol=0, atol=1e-8)
