"""AOT loss: hand cases, equality with DPO at batch size 1, unpaired sets of different sizes
(checked against an exact OT solve), and a real 2-process gloo run against one process."""

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from otalign.losses import aot_loss, dpo_loss, kto_loss, quantile_coupling, sorted_ot_loss

H_FORMULAS = {
    "logistic": lambda z, beta: math.log1p(math.exp(-beta * z)),
    "hinge2": lambda z, beta: max(beta - z, 0.0) ** 2,
    "lsq": lambda z, beta: (beta - z) ** 2,
}


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("h", sorted(H_FORMULAS))
def test_paired_hand_case(h):
    beta = 0.5
    pc, pr = [-3.0, -1.0, -2.0], [-4.0, -1.5, -1.0]
    rc, rr = [-3.0, -2.0, -1.0], [-3.5, -1.0, -2.5]
    # u = policy margins = [1.0, 0.5, -1.0] -> sorted [-1.0, 0.5, 1.0];
    # v = reference margins = [0.5, -1.0, 1.5] -> sorted [-1.0, 0.5, 1.5].
    expected = sum(H_FORMULAS[h](z, beta) for z in (0.0, 0.0, -0.5)) / 3
    loss = aot_loss(_t(pc), _t(pr), _t(rc), _t(rr), paired=True, h=h, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("h", sorted(H_FORMULAS))
def test_unpaired_hand_case(h):
    beta = 0.2
    pc, rc = [-2.0, -5.0, -1.0], [-3.0, -4.0, -1.5]  # u = [1.0, -1.0, 0.5] -> [-1.0, 0.5, 1.0]
    pr, rr = [-6.0, -2.0, -3.0], [-4.0, -2.5, -2.0]  # v = [-2.0, 0.5, -1.0] -> [-2.0, -1.0, 0.5]
    expected = sum(H_FORMULAS[h](z, beta) for z in (1.0, 1.5, 0.5)) / 3
    loss = aot_loss(_t(pc), _t(pr), _t(rc), _t(rr), paired=False, h=h, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("paired", [True, False])
def test_batch_of_one_equals_dpo_sigmoid(paired):
    beta = 0.1
    inputs = [_t([x]).requires_grad_(True) for x in (-12.0, -15.0, -13.0, -14.5)]
    aot = aot_loss(*inputs, paired=paired, h="logistic", beta=beta)
    aot_grads = torch.autograd.grad(aot, inputs[:2])
    dpo, _, _ = dpo_loss(*inputs, beta=beta, kind="sigmoid")
    dpo_grads = torch.autograd.grad(dpo, inputs[:2])
    torch.testing.assert_close(aot, dpo, rtol=0, atol=1e-15)
    for a, d in zip(aot_grads, dpo_grads, strict=True):
        torch.testing.assert_close(a, d, rtol=0, atol=1e-15)


def _pot_ot_h(u, v, h, beta):
    """Exact OT_h between uniform empirical measures by linear programming (POT's network simplex)."""
    import ot  # imported here to keep the spawned workers' start-up short

    cost = np.array([[H_FORMULAS[h](ui - vj, beta) for vj in v] for ui in u])
    return ot.emd2(np.full(len(u), 1 / len(u)), np.full(len(v), 1 / len(v)), cost)


@pytest.mark.parametrize("h", sorted(H_FORMULAS))
@pytest.mark.parametrize(("n", "m"), [(5, 5), (3, 7), (6, 4), (1, 3)])
def test_unpaired_sets_of_different_prompts_and_sizes_equal_exact_ot(h, n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    # Chosen and rejected completions of unrelated prompts: independent samples, different counts.
    pc, rc = (
        -10 + 3 * torch.rand(n, generator=gen, dtype=torch.float64),
        -10 + 3 * torch.rand(n, generator=gen, dtype=torch.float64),
    )
    pr, rr = (
        -20 + 5 * torch.rand(m, generator=gen, dtype=torch.float64),
        -20 + 5 * torch.rand(m, generator=gen, dtype=torch.float64),
    )
    beta = 0.7
    loss = aot_loss(pc, pr, rc, rr, paired=False, h=h, beta=beta)
    expected = _pot_ot_h((pc - rc).tolist(), (pr - rr).tolist(), h, beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    shuffled = aot_loss(pc.flip(0), pr.roll(1), rc.flip(0), rr.roll(1), paired=False, h=h, beta=beta)
    assert shuffled.item() == pytest.approx(loss.item(), abs=1e-14)


def test_quantile_coupling_is_a_coupling():
    i, j, w = quantile_coupling(4, 6)
    assert w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(torch.zeros(4, dtype=w.dtype).index_add(0, i, w), torch.full((4,), 1 / 4, dtype=w.dtype))
    torch.testing.assert_close(torch.zeros(6, dtype=w.dtype).index_add(0, j, w), torch.full((6,), 1 / 6, dtype=w.dtype))
    assert bool((i[1:] >= i[:-1]).all() and (j[1:] >= j[:-1]).all())  # monotone: north-west corner


@pytest.mark.parametrize("h", sorted(H_FORMULAS))
def test_gradient_through_sort_matches_finite_differences(h):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sorted_ot_loss(a, b, h=h, beta=0.3), (u, v))


def test_bad_arguments_raise():
    x = _t([-1.0, -2.0])
    with pytest.raises(ValueError, match="unknown h"):
        aot_loss(x, x, x, x, h="exp")
    with pytest.raises(ValueError, match="batch sizes differ"):
        aot_loss(x, x[:1], x, x[:1], paired=True)
    with pytest.raises(ValueError, match="policy_rejected_logps, ref_rejected_logps: empty batch"):
        aot_loss(x, x[:0], x, x[:0], paired=False)


# ---- two processes (gloo on localhost) against one process on the same global batch ----

WORLD = 2
FEATURES = 3
# (paired, h, global chosen count, global rejected count, chosen count on rank 0, rejected count on rank 0)
CASES = [
    (True, "logistic", 7, 7, 4, 4),
    (True, "hinge2", 6, 6, 3, 3),
    (False, "lsq", 7, 7, 2, 5),
    (False, "logistic", 5, 8, 4, 2),
    (True, "lsq", 4, 4, 4, 4),  # rank 1's share is empty
    (False, "logistic", 5, 6, 0, 6),  # rank 0 has no chosen, rank 1 no rejected completion
]
BETA = 0.8


def _case_data(index):
    """Deterministic global batch: chosen/rejected features and reference log-probs."""
    paired, _, n, m, _, _ = CASES[index]
    gen = torch.Generator().manual_seed(100 + index)
    xc = torch.randn(n, FEATURES, generator=gen, dtype=torch.float64)
    xr = torch.randn(m, FEATURES, generator=gen, dtype=torch.float64)
    rc = torch.randn(n, generator=gen, dtype=torch.float64)
    rr = torch.randn(m, generator=gen, dtype=torch.float64)
    return xc, xr, rc, rr


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 1).double()


def _case_loss(model, index, xc, xr, rc, rr, distributed=True):
    """Toy policy: log-prob = linear function of features; one forward over chosen and rejected."""
    paired, h = CASES[index][:2]
    logps = model(torch.cat([xc, xr])).squeeze(-1)
    pc, pr = logps[: xc.shape[0]], logps[xc.shape[0] :]
    return aot_loss(pc, pr, rc, rr, paired=paired, h=h, beta=BETA, distributed=distributed)


def _single_process_results():
    results = []
    for index in range(len(CASES)):
        model = _model()
        loss = _case_loss(model, index, *_case_data(index))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def _worker(rank, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {"aot": [], "kto_z0": None}
        for index, (_, _, n, m, n0, m0) in enumerate(CASES):
            xc, xr, rc, rr = _case_data(index)
            cs = slice(0, n0) if rank == 0 else slice(n0, n)
            rs = slice(0, m0) if rank == 0 else slice(m0, m)
            model = DistributedDataParallel(_model())
            loss = _case_loss(model, index, xc[cs], xr[rs], rc[cs], rr[rs])
            local = (xc[cs], xr[rs], rc[cs], rr[rs])
            # no per-device loss to compare with when a local side is empty or holds the whole batch
            partial = 0 < local[0].shape[0] < n or 0 < local[1].shape[0] < m
            local_only = None
            if partial and min(t.shape[0] for t in local) > 0:
                local_only = _case_loss(model.module, index, *local, distributed=False).detach()
            loss.backward()  # DDP averages the parameter gradients over the two processes
            results["aot"].append((loss.detach(), local_only, [p.grad.clone() for p in model.parameters()]))
        # KTO's reference point: the mean over both processes' KL terms (3 on rank 0, 1 on rank 1).
        kl_terms = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64) if rank == 0 else torch.tensor([-2.0])
        zero = torch.zeros(2, dtype=torch.float64)
        _, _, z0 = kto_loss(
            zero, zero, torch.tensor([True, False]), kl_terms.double(), torch.zeros_like(kl_terms).double()
        )
        results["kto_z0"] = z0
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("aot_dist") / "result"
    mp.spawn(_worker, args=(_free_port(), str(out_path)), nprocs=WORLD, join=True)
    return [torch.load(f"{out_path}.{rank}") for rank in range(WORLD)]


@pytest.mark.multiprocess
def test_two_processes_give_single_process_loss_and_gradients(two_process_results):
    single = _single_process_results()
    for index, (loss, grads) in enumerate(single):
        for rank in range(WORLD):
            dist_loss, local_only, dist_grads = two_process_results[rank]["aot"][index]
            torch.testing.assert_close(dist_loss, loss, rtol=0, atol=1e-12, msg=f"case {index} rank {rank}")
            for g, d in zip(grads, dist_grads, strict=True):
                torch.testing.assert_close(d, g, rtol=0, atol=1e-12, msg=f"case {index} rank {rank}")
            # Sorting per device (what TRL does) gives another loss: the gather is what matters.
            assert local_only is None or abs(local_only.item() - loss.item()) > 1e-6


@pytest.mark.multiprocess
def test_kto_reference_point_is_the_mean_over_processes(two_process_results):
    for rank in range(WORLD):
        assert two_process_results[rank]["kto_z0"].item() == pytest.approx((0.5 + 1.0 + 2.5 - 2.0) / 4)
