"""The loss-object interface: the registry's loss objects return the loss and the implicit rewards the trainer logs;
:func:`call_loss` passes IPO its token counts and gives a ``(loss, stats)`` loss DPO's implicit rewards."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from otalign.losses import (
    PAIRWISE_LOSSES,
    PREFERENCE_LOSSES,
    LossOutput,
    aot_loss,
    build_preference_loss,
    call_loss,
    dpo_loss,
    kto_loss,
)

N = 4  # pairs
BETA = 0.3


def batch(seed: int = 0):
    """(2N,) policy and reference sequence log-probs (N chosen, then N rejected), token counts and labels."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * N, generator=g, dtype=torch.float64) * 20
    ref = -torch.rand(2 * N, generator=g, dtype=torch.float64) * 20
    lengths = torch.randint(1, 9, (2 * N,), generator=g)
    return policy, ref, lengths, torch.arange(2 * N) < N


@pytest.mark.parametrize("name", [n for n in PREFERENCE_LOSSES.entries if n != "kto"])
def test_every_loss_returns_the_summed_implicit_rewards_of_its_inputs(name):
    policy, ref, lengths, labels = batch()
    out = call_loss(build_preference_loss(name, beta=BETA), policy, ref, labels, pairs=N, lengths=lengths, beta=1.0)
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    torch.testing.assert_close(out.rewards, BETA * (policy - ref), rtol=0, atol=0)  # summed, even for IPO
    assert not out.rewards.requires_grad


def test_ipo_sees_per_token_means():
    policy, ref, lengths, labels = batch(1)
    out = call_loss(build_preference_loss("ipo", beta=BETA), policy, ref, labels, pairs=N, lengths=lengths, beta=1.0)
    p, r = policy / lengths, ref / lengths
    expected, _, _ = dpo_loss(p[:N], p[N:], r[:N], r[N:], beta=BETA, kind="ipo")
    assert out.loss.item() == expected.item()
    summed, _, _ = dpo_loss(policy[:N], policy[N:], ref[:N], ref[N:], beta=BETA, kind="ipo")
    assert abs(summed.item() - expected.item()) > 1e-3


def test_unpaired_losses_see_labelled_completions():
    policy, ref, lengths, labels = batch(2)
    aot = call_loss(
        build_preference_loss("aot_unpaired", beta=BETA), policy, ref, labels, pairs=N, lengths=lengths, beta=1.0
    )
    expected = aot_loss(policy[:N], policy[N:], ref[:N], ref[N:], paired=False, beta=BETA)
    assert aot.loss.item() == expected.item()
    kl = (policy.flip(0), ref.flip(0))
    kto = call_loss(
        build_preference_loss("kto", beta=BETA), policy, ref, labels, pairs=N, lengths=lengths, beta=1.0, kl=kl
    )
    loss, rewards, z0 = kto_loss(policy, ref, labels, *kl, beta=BETA)
    assert kto.loss.item() == loss.item() and kto.stats == {"kto/z0": float(z0)}
    torch.testing.assert_close(kto.rewards, rewards, rtol=0, atol=0)


def test_a_loss_returning_loss_and_stats_gets_dpo_implicit_rewards():
    class Legacy:
        paired, needs_kl = True, False

        def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
            return (policy_chosen - ref_chosen).mean(), {"extra": 1.0}

    policy, ref, lengths, labels = batch(3)
    out = call_loss(Legacy(), policy, ref, labels, pairs=N, lengths=lengths, beta=0.7)
    assert out.stats == {"extra": 1.0}
    assert out.loss.item() == pytest.approx((policy[:N] - ref[:N]).mean().item())
    torch.testing.assert_close(out.rewards, 0.7 * (policy - ref), rtol=0, atol=0)


def test_pairwise_names():
    assert PAIRWISE_LOSSES == ("sigmoid", "ipo", "hinge", "robust", "aot")


def test_the_old_module_still_works_with_a_deprecation_warning():
    sys.modules.pop("otalign.trainers.preference_losses", None)
    with pytest.warns(DeprecationWarning, match="import the preference losses from otalign.losses"):
        old = importlib.import_module("otalign.trainers.preference_losses")
    assert old.PREFERENCE_LOSSES is PREFERENCE_LOSSES and old.build_preference_loss is build_preference_loss
    policy, ref, lengths, _ = batch(4)
    robust = old.RobustDPOLoss(BETA, 0.2)(policy[:N], policy[N:], ref[:N], ref[N:])
    expected, _, _ = dpo_loss(policy[:N], policy[N:], ref[:N], ref[N:], beta=BETA, kind="robust", label_smoothing=0.2)
    assert robust.loss.item() == expected.item()
    ipo = build_preference_loss("ipo", beta=BETA)
    p, r = old.loss_inputs(ipo, policy, ref, lengths)
    torch.testing.assert_close(p, policy / lengths)
    torch.testing.assert_close(r, ref / lengths)
