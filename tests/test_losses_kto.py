"""KTO loss against hand-written formulas (the two-process reference point is in test_losses_aot.py)."""

import math

import pytest
import torch

from otalign.losses import kto_loss

POLICY = [-5.0, -7.0, -3.0, -9.0]
REF = [-6.0, -6.5, -3.5, -8.0]
LABELS = [True, False, True, False]
KL_POLICY = [-4.0, -10.0, -2.0]
KL_REF = [-4.5, -9.0, -3.0]


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _expected(beta, z0, wd, wu):
    out = []
    for p, r, good in zip(POLICY, REF, LABELS, strict=True):
        ratio = p - r
        out.append(wd * (1 - _sigmoid(beta * (ratio - z0))) if good else wu * (1 - _sigmoid(beta * (z0 - ratio))))
    return out


@pytest.mark.parametrize(("beta", "wd", "wu"), [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.0)])
def test_matches_formula(beta, wd, wu):
    z0 = max(0.0, sum(p - r for p, r in zip(KL_POLICY, KL_REF, strict=True)) / 3)  # (0.5 - 1 + 1) / 3
    losses, rewards, got_z0 = kto_loss(
        _t(POLICY),
        _t(REF),
        torch.tensor(LABELS),
        _t(KL_POLICY),
        _t(KL_REF),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
        reduction="none",
    )
    assert got_z0.item() == pytest.approx(z0)
    torch.testing.assert_close(losses, _t(_expected(beta, z0, wd, wu)), rtol=0, atol=1e-14)
    torch.testing.assert_close(rewards, _t([beta * (p - r) for p, r in zip(POLICY, REF, strict=True)]))
    mean, _, _ = kto_loss(
        _t(POLICY),
        _t(REF),
        torch.tensor(LABELS),
        _t(KL_POLICY),
        _t(KL_REF),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    assert mean.item() == pytest.approx(sum(_expected(beta, z0, wd, wu)) / 4, abs=1e-14)


def test_reference_point_is_clamped_at_zero_and_detached():
    kl_policy = _t([-5.0, -6.0]).requires_grad_(True)
    policy = _t(POLICY).requires_grad_(True)
    loss, _, z0 = kto_loss(policy, _t(REF), torch.tensor(LABELS), kl_policy, _t([-4.0, -4.0]), beta=0.3)
    assert z0.item() == 0.0
    losses_without_kl, _, _ = kto_loss(_t(POLICY), _t(REF), torch.tensor(LABELS), beta=0.3, reduction="none")
    assert loss.item() == pytest.approx(losses_without_kl.mean().item(), abs=1e-15)
    loss.backward()
    assert kl_policy.grad is None and policy.grad is not None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="labels"):
        kto_loss(_t(POLICY), _t(REF), torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="neither"):
        kto_loss(_t(POLICY), _t(REF), torch.tensor(LABELS), _t(KL_POLICY))
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(_t(POLICY), _t(REF), torch.tensor(LABELS), undesirable_weight=0)
