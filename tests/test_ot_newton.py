"""Newton finishing of stalled Sinkhorn problems (`sinkhorn(..., newton_steps=k)`, `otalign.ot.newton`).

The oracle is POT's log-domain Sinkhorn run for as long as it takes (up to 10^6 iterations); the problems are
built to be ill-conditioned the way WPR's are: two blocks of atoms that trade mass among themselves, and a
small imbalance between the blocks that must cross an expensive gap.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch
from test_ot_sinkhorn import assert_potentials_match

from otalign.ot import sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def nearly_decoupled(seed: int, n: int = 8, gap: float = 0.15, imbalance: float = 3e-3, zero_atoms: bool = False):
    """(a, b, cost) float64: blocks {first half} x {first half} and {second half} x {second half} with costs in
    [0, 1), ``gap`` more across blocks, and ``imbalance`` of mass that must cross between them."""
    rng = np.random.default_rng(seed)
    half = n // 2
    cost = rng.random((n, n))
    cost[:half, half:] += gap
    cost[half:, :half] += gap
    a, b = rng.random(n) + 0.05, rng.random(n) + 0.05
    a /= a.sum()
    b[:half] *= a[:half].sum() / b[:half].sum()
    b[half:] *= a[half:].sum() / b[half:].sum()
    b[0] += imbalance
    b[-1] -= imbalance
    if zero_atoms:
        a[1], b[-2] = 0.0, 0.0
        a, b = a / a.sum(), b / b.sum()
    return a, b, cost


def pot_potentials(a, b, cost, eps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=1_000_000, stopThr=1e-13, log=True)
    return eps * log["log_u"], eps * log["log_v"]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("zero_atoms", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_finishes_a_stalled_problem_to_the_converged_potentials(seed, zero_atoms):
    eps = 0.01
    a, b, cost = nearly_decoupled(seed, zero_atoms=zero_atoms)
    plain = sinkhorn(_t(a), _t(b), _t(cost), eps, max_iter=100, tol=1e-12)
    assert not bool(plain.converged), "the problem must stall Sinkhorn for this test to mean anything"
    finished = sinkhorn(_t(a), _t(b), _t(cost), eps, max_iter=100, tol=1e-12, newton_steps=30)
    assert bool(finished.converged) and float(finished.marginal_error) <= 1e-12
    f_ref, g_ref = pot_potentials(a, b, cost, eps)
    assert_potentials_match(finished.f.numpy(), finished.g.numpy(), f_ref, g_ref, a, b, atol=1e-9)
    # The reported error is the plan's: recompute it from the returned potentials.
    plan = np.exp((finished.f.numpy()[:, None] + finished.g.numpy()[None, :] - cost) / eps)
    assert np.abs(plan.sum(1) - a).sum() <= 1e-11
    np.testing.assert_allclose(plan.sum(0), b, rtol=0, atol=1e-13)
    assert np.isfinite(finished.u.numpy()).all() and np.isfinite(finished.v.numpy()).all()


def test_only_stalled_problems_change_and_plans_follow_the_potentials():
    eps = 0.01
    hard = [nearly_decoupled(seed) for seed in range(2)]
    rng = np.random.default_rng(5)
    easy_cost = rng.random((8, 8))
    easy = (np.full(8, 1 / 8), np.full(8, 1 / 8), easy_cost * 0.05)  # eps / cost scale 0.2: converges fast
    a, b, cost = (torch.stack([_t(p[i]) for p in [hard[0], easy, hard[1]]]) for i in range(3))
    kwargs = {"max_iter": 100, "tol": 1e-12, "return_plan": True}
    plain = sinkhorn(a, b, cost, eps, **kwargs)
    assert plain.converged.tolist() == [False, True, False]
    finished = sinkhorn(a, b, cost, eps, newton_steps=30, **kwargs)
    assert bool(finished.converged.all())
    assert torch.equal(finished.u[1], plain.u[1]) and torch.equal(finished.plan[1], plain.plan[1])
    torch.testing.assert_close(finished.plan.sum(2), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(finished.plan.sum(1), b, rtol=0, atol=1e-12)
    assert finished.n_iter == plain.n_iter and torch.equal(finished.iters, plain.iters)


def test_float32_input_gets_float64_newton_and_float32_results():
    eps = 0.01
    a, b, cost = (_t(x).float() for x in nearly_decoupled(3))
    plain = sinkhorn(a, b, cost, eps, max_iter=100, tol=1e-7)
    finished = sinkhorn(a, b, cost, eps, max_iter=100, tol=1e-7, newton_steps=30)
    assert not bool(plain.converged) and bool(finished.converged)
    assert finished.f.dtype == torch.float32 and finished.marginal_error.dtype == torch.float32
    f_ref, g_ref = pot_potentials(*nearly_decoupled(3), eps)
    assert_potentials_match(
        finished.f.double().numpy(), finished.g.double().numpy(), f_ref, g_ref, *nearly_decoupled(3)[:2], atol=1e-6
    )


def test_forbidden_pairs_stay_forbidden():
    eps = 0.01
    a, b, cost = nearly_decoupled(4)
    cost[0, 5] = cost[6, 2] = np.inf
    finished = sinkhorn(_t(a), _t(b), _t(cost), eps, max_iter=100, tol=1e-12, newton_steps=30, return_plan=True)
    assert bool(finished.converged)
    assert float(finished.plan[0, 5]) == 0.0 and float(finished.plan[6, 2]) == 0.0
    f_ref, g_ref = pot_potentials(a, b, cost, eps)
    assert_potentials_match(finished.f.numpy(), finished.g.numpy(), f_ref, g_ref, a, b, atol=1e-9)


def test_negative_newton_steps_are_refused():
    a = torch.full((3,), 1 / 3)
    with pytest.raises(ValueError, match="newton_steps must be >= 0"):
        sinkhorn(a, a, torch.rand(3, 3), 0.1, newton_steps=-1)


def pot_plan(a, b, cost, eps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=1_000_000, stopThr=1e-13)


def test_exactly_decoupled_blocks_do_not_break_the_newton_solve():
    """Two blocks with no kernel entry between them (cross costs 1e4 eps: exp underflows to 0), each balanced on
    its own: the Newton matrix is singular along each block's own shift, not only the shared one, and the
    potentials are unique only up to those shifts. The plan is unique: it must match POT's."""
    eps = 0.01
    a, b, cost = nearly_decoupled(6, gap=100.0, imbalance=0.0)
    finished = sinkhorn(_t(a), _t(b), _t(cost), eps, max_iter=3, tol=1e-12, newton_steps=40, return_plan=True)
    assert torch.isfinite(finished.f).all() and torch.isfinite(finished.g).all()
    assert bool(finished.converged), finished.marginal_error
    np.testing.assert_allclose(finished.plan.numpy(), pot_plan(a, b, cost, eps), rtol=0, atol=1e-11)


def test_a_large_batch_solves_with_several_threads():
    """Batched LU in MKL (torch.linalg.solve) fails outright for 9+ systems of 160+ unknowns on 2 threads; the
    Newton step factors its symmetric matrices by Cholesky instead. 12 problems of 80 + 80 atoms, 2 threads."""
    eps = 0.01
    problems = [nearly_decoupled(seed, n=80, imbalance=3e-4) for seed in range(12)]
    a, b, cost = (torch.stack([_t(p[i]) for p in problems]) for i in range(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        finished = sinkhorn(a, b, cost, eps, max_iter=10, tol=1e-10, newton_steps=30, return_plan=True)
    finally:
        torch.set_num_threads(threads)
    assert bool(finished.converged.all()), finished.marginal_error
    torch.testing.assert_close(finished.plan.sum(2), a, rtol=0, atol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_the_newton_step_is_the_full_systems_minimum_norm_solution(shape, damping):
    """The Schur-complement step against the (n + m) system solved by least squares: Jacobi-scaled
    ``(S + mu I) x = D^-1/2 eps grad`` on the atoms with mass, minimum norm (no component along the potentials'
    shared constant), step ``D^-1/2 x``; 0 on zero-mass atoms. The plan is not a Sinkhorn plan, only positive."""
    from otalign.ot.newton import _newton_direction

    n, m = shape
    rng = np.random.default_rng(n * 10 + m)
    a, b = rng.random((3, n)), rng.random((3, m))
    a[0, 1], b[1, 2] = 0.0, 0.0
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    plan = 3 * rng.random((3, n, m)) * a[:, :, None] * b[:, None, :]
    eps = 0.01
    step, gradient, factored = _newton_direction(
        _t(a), _t(b), _t(plan), eps, torch.full((3,), damping, dtype=torch.float64)
    )
    assert bool(factored.all())
    for i in range(3):
        held = np.concatenate([a[i] > 0, b[i] > 0])
        matrix = np.block([[np.diag(plan[i].sum(1)), plan[i]], [plan[i].T, np.diag(plan[i].sum(0))]])[held][:, held]
        grad = np.concatenate([a[i] - plan[i].sum(1), b[i] - plan[i].sum(0)])[held]
        scale = np.diag(matrix) ** -0.5
        scaled = scale[:, None] * matrix * scale[None, :] + damping * np.eye(held.sum())
        x = np.linalg.lstsq(scaled, eps * grad * scale, rcond=1e-12)[0]
        expected = np.zeros(n + m)
        expected[held] = x * scale
        np.testing.assert_allclose(step[i].numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gradient[i].numpy()[held], grad, rtol=0, atol=1e-15)
