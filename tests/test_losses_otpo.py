"""OTPO token weights against per-pair POT solves; padding, budget, masking and gradient properties."""

import numpy as np
import ot
import pytest
import torch

from otalign.losses import aot_loss, dpo_loss, otpo_weights, sequence_logps

EPS1, EPS2 = 1.0, 0.2
LENGTHS = [(7, 4), (3, 9), (1, 5), (9, 9), (2, 1)]  # (chosen, rejected) tokens per pair
HIDDEN = 6


def _padded_batch(dtype=torch.float64, seed=0, pad_value=None):
    """Pairs of random hidden states padded to common lengths; padding filled with ``pad_value`` or noise."""
    gen = torch.Generator().manual_seed(seed)
    lc, lr = max(c for c, _ in LENGTHS), max(r for _, r in LENGTHS)
    chosen = torch.randn(len(LENGTHS), lc, HIDDEN, generator=gen, dtype=torch.float64)
    rejected = torch.randn(len(LENGTHS), lr, HIDDEN, generator=gen, dtype=torch.float64)
    chosen_mask = torch.arange(lc) < torch.tensor([c for c, _ in LENGTHS]).unsqueeze(-1)
    rejected_mask = torch.arange(lr) < torch.tensor([r for _, r in LENGTHS]).unsqueeze(-1)
    if pad_value is not None:
        chosen = chosen.masked_fill(~chosen_mask.unsqueeze(-1), pad_value)
        rejected = rejected.masked_fill(~rejected_mask.unsqueeze(-1), pad_value)
    return chosen.to(dtype), rejected.to(dtype), chosen_mask, rejected_mask


def _pot_weights(hc, hr):
    """The reference recipe for one pair: normalized Euclidean cost, POT unbalanced Sinkhorn, tau-scaled marginals."""
    cost = ot.dist(hc, hr, metric="euclidean")
    cost = cost / cost.max() if cost.max() > 0 else cost
    plan = ot.unbalanced.sinkhorn_unbalanced(
        np.ones(len(hc)), np.ones(len(hr)), cost, reg=EPS1, reg_m=EPS2, reg_type="kl", stopThr=1e-15, numItermax=100000
    )
    tau = min(len(hc), len(hr))
    return plan.sum(1) * tau / plan.sum(), plan.sum(0) * tau / plan.sum()


def test_matches_per_pair_pot_float64():
    chosen, rejected, cm, rm = _padded_batch()
    wc, wr = otpo_weights(chosen, rejected, cm, rm, eps1=EPS1, eps2=EPS2, tol=1e-13, max_iter=10000)
    assert wc.dtype == torch.float64
    for k, (c, r) in enumerate(LENGTHS):
        pot_c, pot_r = _pot_weights(chosen[k, :c].numpy(), rejected[k, :r].numpy())
        np.testing.assert_allclose(wc[k, :c].numpy(), pot_c, rtol=0, atol=1e-12)
        np.testing.assert_allclose(wr[k, :r].numpy(), pot_r, rtol=0, atol=1e-12)


def test_default_float32_close_to_float64_oracle():
    chosen, rejected, cm, rm = _padded_batch(dtype=torch.float32)
    wc, wr = otpo_weights(chosen, rejected, cm, rm)
    assert wc.dtype == torch.float32
    for k, (c, r) in enumerate(LENGTHS):
        pot_c, pot_r = _pot_weights(chosen[k, :c].double().numpy(), rejected[k, :r].double().numpy())
        np.testing.assert_allclose(wc[k, :c].numpy(), pot_c, rtol=0, atol=2e-5)
        np.testing.assert_allclose(wr[k, :r].numpy(), pot_r, rtol=0, atol=2e-5)


@pytest.mark.parametrize("pad_value", [0.0, 1e3, float("nan")])
def test_padding_does_not_change_any_pairs_weights(pad_value):
    chosen, rejected, cm, rm = _padded_batch(pad_value=pad_value)
    wc, wr = otpo_weights(chosen, rejected, cm, rm, tol=1e-13, max_iter=10000)
    for k, (c, r) in enumerate(LENGTHS):
        alone_c, alone_r = otpo_weights(
            chosen[k : k + 1, :c],
            rejected[k : k + 1, :r],
            cm[k : k + 1, :c],
            rm[k : k + 1, :r],
            tol=1e-13,
            max_iter=10000,
        )
        torch.testing.assert_close(wc[k, :c], alone_c[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(wr[k, :r], alone_r[0], rtol=0, atol=1e-12)


def test_weights_sum_to_shorter_length_and_vanish_on_padding():
    chosen, rejected, cm, rm = _padded_batch(dtype=torch.float32)
    wc, wr = otpo_weights(chosen, rejected, cm, rm)
    tau = torch.tensor([min(c, r) for c, r in LENGTHS], dtype=torch.float32)
    torch.testing.assert_close(wc.sum(-1), tau)
    torch.testing.assert_close(wr.sum(-1), tau)
    assert bool((wc[~cm] == 0).all() and (wr[~rm] == 0).all())
    assert bool((wc[cm] > 0).all() and (wr[rm] > 0).all())


def test_identical_states_give_uniform_weights():
    state = torch.randn(1, 1, HIDDEN)
    chosen, rejected = state.expand(1, 4, HIDDEN), state.expand(1, 2, HIDDEN)
    wc, wr = otpo_weights(chosen, rejected, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(wc, torch.full((1, 4), 0.5))  # tau = 2 spread over 4 tokens
    torch.testing.assert_close(wr, torch.full((1, 2), 1.0))


def test_swapping_sides_swaps_weights():
    chosen, rejected, cm, rm = _padded_batch()
    wc, wr = otpo_weights(chosen, rejected, cm, rm, tol=1e-13)
    sc, sr = otpo_weights(rejected, chosen, rm, cm, tol=1e-13)
    torch.testing.assert_close(sr, wc, rtol=0, atol=1e-10)
    torch.testing.assert_close(sc, wr, rtol=0, atol=1e-10)


def test_bfloat16_states_give_float32_weights():
    chosen, rejected, cm, rm = _padded_batch(dtype=torch.bfloat16)
    wc, wr = otpo_weights(chosen, rejected, cm, rm)
    assert wc.dtype == wr.dtype == torch.float32


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "aot_paired"])
def test_no_gradient_through_weights_and_weighted_logps_feed_pairwise_losses(loss):
    chosen, rejected, cm, rm = _padded_batch(dtype=torch.float32)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    wc, wr = otpo_weights(chosen, rejected, cm, rm)
    assert not wc.requires_grad and not wr.requires_grad and wc.grad_fn is None

    gen = torch.Generator().manual_seed(1)
    # Per-token log-probs of the policy (trainable) and the reference; the same weights multiply both.
    token_pc = (-torch.rand(cm.shape, generator=gen)).requires_grad_(True)
    token_pr = (-torch.rand(rm.shape, generator=gen)).requires_grad_(True)
    token_rc, token_rr = -torch.rand(cm.shape, generator=gen), -torch.rand(rm.shape, generator=gen)
    pc, rc = sequence_logps(token_pc, cm, wc), sequence_logps(token_rc, cm, wc)
    pr, rr = sequence_logps(token_pr, rm, wr), sequence_logps(token_rr, rm, wr)
    torch.testing.assert_close(pc, (token_pc * wc * cm).sum(-1))
    if loss == "aot_paired":
        value = aot_loss(pc, pr, rc, rr, paired=True, beta=0.5)
    else:
        value, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, kind=loss)
    value.backward()
    assert chosen.grad is None and rejected.grad is None
    assert bool((token_pc.grad[~cm] == 0).all())
    assert token_pc.grad[cm].abs().sum() > 0


def test_empty_response_raises():
    chosen, rejected, cm, rm = _padded_batch()
    rm = rm.clone()
    rm[3] = False
    with pytest.raises(ValueError, match=r"rejected responses of pairs \[3\]"):
        otpo_weights(chosen, rejected, cm, rm)
