"""Pruned balanced OT (`otalign.ot.pruned.pruned_sinkhorn`) against the unpruned solve: bounded potential error."""

from __future__ import annotations

import pytest
import torch

from otalign.ot import euclidean, sinkhorn
from otalign.ot.pruned import pruned_sinkhorn

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TIGHT = {"tol": 1e-12, "max_iter": 200_000}


def difference_problems(seed: int, count: int = 3, slots: int = 40):
    """Excess/deficit-like masses on disjoint slots: a few atoms with most of the mass, many with shares of
    1e-10..1e-7; Euclidean costs between random points (range ~1), float64."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(count, slots, 4, generator=gen, dtype=torch.float64) / 2
    cost = euclidean(points, points)
    side = torch.rand(count, slots, generator=gen) < 0.5
    big = torch.rand(count, slots, generator=gen) < 0.25
    tiny = 10 ** torch.empty(count, slots, dtype=torch.float64).uniform_(-10, -7, generator=gen)
    mass = torch.where(big, torch.rand(count, slots, generator=gen, dtype=torch.float64) + 0.1, tiny)
    a, b = torch.where(side, mass, 0.0), torch.where(~side, mass, 0.0)
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True), cost


def centred_gap(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """max |x - y| after removing the weighted mean of x - y (balanced potentials are unique up to a constant)."""
    diff = x - y
    shift = (weights * diff).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True)
    return (diff - shift).abs().amax(-1)


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_pruned_potentials_match_the_unpruned_solve(eps):
    """Every atom with mass, kept or dropped, gets the unpruned solve's potential (up to the common constant)."""
    a, b, cost = difference_problems(0)
    full = sinkhorn(a, b, cost, eps, **TIGHT)
    pruned = pruned_sinkhorn(a, b, cost, eps, prune_below=1e-6, **TIGHT)
    assert pruned.reduced_size[0] < a.shape[1] // 2 and bool(pruned.converged.all())
    assert (pruned.dropped_mass <= a.shape[1] * 1e-6).all() and (pruned.dropped_mass > 0).all()
    assert (~pruned.kept_a & (a > 0)).any() and (~pruned.kept_b & (b > 0)).any()
    # One shift for both sides (u + c, v - c), fixed on the kept a atoms.
    weights = torch.where(pruned.kept_a, a, 0.0)
    shift = ((weights * (pruned.u - full.u)).sum(-1) / weights.sum(-1)).unsqueeze(-1)
    assert (torch.where(a > 0, (pruned.u - full.u - shift).abs(), 0.0).amax(-1) <= 1e-6).all()
    assert (torch.where(b > 0, (pruned.v - full.v + shift).abs(), 0.0).amax(-1) <= 1e-6).all()
    assert (pruned.marginal_error <= 1e-6).all()
    full_value = (a * full.u).sum(-1) + (b * torch.where(b > 0, full.v, 0.0)).sum(-1)
    torch.testing.assert_close(pruned.value, full_value, rtol=0, atol=1e-7)


def test_without_polish_dropped_atoms_near_each_other_are_off():
    """Why the polish steps exist: extending from the kept atoms alone misses the dropped atoms' own terms."""
    a, b, cost = difference_problems(0)
    full = sinkhorn(a, b, cost, 0.05, **TIGHT)
    rough = pruned_sinkhorn(a, b, cost, 0.05, prune_below=1e-6, polish=0, **TIGHT)
    polished = pruned_sinkhorn(a, b, cost, 0.05, prune_below=1e-6, polish=2, **TIGHT)

    def v_gap(res):
        shift = ((a * (res.u - full.u)).sum(-1) / a.sum(-1)).unsqueeze(-1)
        return float(torch.where(b > 0, (res.v - full.v + shift).abs(), 0.0).max())

    assert v_gap(rough) > 100 * v_gap(polished)


def test_without_pruning_it_is_the_plain_solve():
    a, b, cost = difference_problems(1)
    full = sinkhorn(a, b, cost, 0.1, **TIGHT)
    pruned = pruned_sinkhorn(a, b, cost, 0.1, prune_below=0.0, **TIGHT)
    assert (pruned.dropped_mass == 0).all()
    assert (centred_gap(pruned.u, full.u, a) <= 1e-9).all()
    full_value = (a * full.u).sum(-1) + (b * full.v).sum(-1)
    torch.testing.assert_close(pruned.value, full_value, rtol=0, atol=1e-10)


def test_bad_prune_level_raises():
    a, b, cost = difference_problems(2)
    with pytest.raises(ValueError, match="prune_below"):
        pruned_sinkhorn(a, b, cost, 0.1, prune_below=1.0)
