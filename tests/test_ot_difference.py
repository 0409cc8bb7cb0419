"""The public soft c-transform and difference transport of ``otalign.ot``: exact marginals, POT agreement, and the
simplex gradient against finite differences."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from otalign.ot import c_transform, difference_transport, euclidean

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def masses(n: int, gen: torch.Generator) -> torch.Tensor:
    mass = torch.rand(1, n, generator=gen, dtype=torch.float64) + 0.1
    return mass / mass.sum()


def test_c_transform_makes_the_marginal_of_its_side_exact():
    gen = torch.Generator().manual_seed(0)
    a, b = masses(5, gen), masses(7, gen)
    cost = torch.rand(1, 5, 7, generator=gen, dtype=torch.float64)
    eps = 0.1
    u, v = torch.randn(1, 5, generator=gen, dtype=torch.float64), torch.randn(1, 7, generator=gen, dtype=torch.float64)

    def plan(u, v):
        return a[..., None] * b[:, None] * torch.exp((u[..., None] + v[:, None] - cost) / eps)

    rows = c_transform(v, b.log(), cost, eps, dim=2)
    torch.testing.assert_close(plan(rows, v).sum(2), a, rtol=1e-12, atol=0)
    columns = c_transform(u, a.log(), cost, eps, dim=1)
    torch.testing.assert_close(plan(u, columns).sum(1), b, rtol=1e-12, atol=0)
    # an atom with no finite cost to a partner carries no plan mass: potential 0
    blocked = cost.clone()
    blocked[0, 2] = torch.inf
    assert float(c_transform(v, b.log(), blocked, eps, dim=2)[0, 2]) == 0.0


def problem(seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    a, b = masses(n, gen), masses(n, gen)
    points = torch.randn(1, n, 2, generator=gen, dtype=torch.float64)
    return a, b, euclidean(points, points)


def test_difference_transport_matches_pot_on_the_excess_and_deficit():
    a, b, cost = problem(1)
    eps = 0.05
    out = difference_transport(a, b, cost, eps, max_iter=20_000, tol=1e-13)
    a_np, b_np, c_np = a[0].numpy(), b[0].numpy(), cost[0].numpy()
    excess, deficit = np.flatnonzero(a_np > b_np), np.flatnonzero(b_np > a_np)
    moved = (a_np - b_np)[excess].sum()
    alpha, beta = (a_np - b_np)[excess] / moved, (b_np - a_np)[deficit] / moved
    block = c_np[np.ix_(excess, deficit)]
    plan = ot.bregman.sinkhorn_log(alpha, beta, block, eps, numItermax=20_000, stopThr=1e-15)
    value = moved * ((plan * block).sum() + eps * (plan * np.log(plan / np.outer(alpha, beta))).sum())
    assert float(out.value[0]) == pytest.approx(value, abs=1e-10)
    assert bool(out.converged.all()) and float(out.marginal_error[0]) < 1e-12


def test_difference_transport_gradient_is_the_finite_difference_along_the_simplex():
    a, b, cost = problem(2)
    eps, h = 0.05, 1e-6
    settings = dict(max_iter=50_000, tol=1e-14)
    phi = difference_transport(a, b, cost, eps, **settings).phi[0]
    for i, k in [(0, 1), (2, 5), (3, 7)]:
        step = torch.zeros_like(a)
        step[0, i], step[0, k] = h, -h
        up = difference_transport(a + step, b, cost, eps, **settings).value
        down = difference_transport(a - step, b, cost, eps, **settings).value
        assert float((up - down)[0] / (2 * h)) == pytest.approx(float(phi[i] - phi[k]), abs=1e-6)


def test_difference_transport_is_zero_with_nothing_to_move():
    a, _, cost = problem(3)
    out = difference_transport(a, a.clone(), cost, 0.05)
    assert float(out.value[0]) == 0.0 and bool(out.converged.all()) and out.n_iter == 0
    assert torch.equal(out.phi, torch.zeros_like(a))
