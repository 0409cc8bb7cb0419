"""PPO math against brute-force and hand computations."""

from __future__ import annotations

import pytest
import torch

from otalign.trainers import ppo_math as pm

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def random_batch(seed: int = 0, batch: int = 5, steps: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 6, 3])[:batch]
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    rewards = torch.randn(batch, steps, generator=g) * mask
    values = torch.randn(batch, steps, generator=g) * mask
    return rewards, values, mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_brute_force(gamma, lam):
    rewards, values, mask = random_batch()
    advantages, returns = pm.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        v = values[b, :n].tolist() + [0.0]  # terminal value after the last token
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = random_batch(1)
    advantages, returns = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, to_go, atol=1e-5, rtol=0)


def test_token_rewards_put_score_on_last_token():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    penalty = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    rewards = pm.token_rewards(penalty, torch.tensor([10.0, 20.0]), mask, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.5, -1.0, 8.5], [18.0, 0.0, 0.0]]))


def test_policy_loss_matches_hand_computation():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.5, -1.0, -0.5]])
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = pm.policy_loss(logprobs, old, adv, mask, cliprange=0.2, normalizer=2.0)
    # token 0: ratio e^0.5 = 1.6487 > 1.2, A > 0 -> clipped term -2 * 1.2 = -2.4 (max of -3.297, -2.4)
    # token 1: ratio e^-1 = 0.3679 < 0.8, A < 0 -> clipped term 0.8 (max of 0.3679, 0.8)
    expected = (-2.4 + 0.8) / 2.0
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["policy/clipfrac"].item() == 2.0
    assert stats["policy/approx_kl"].item() == pytest.approx(0.5 * (0.25 + 1.0), abs=1e-6)


def test_policy_loss_gradient_is_advantage_weighted_score_when_unclipped():
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = old.clone().requires_grad_(True)
    adv = torch.tensor([[1.5, -0.5]])
    loss, _ = pm.policy_loss(logprobs, old, adv, torch.ones(1, 2, dtype=torch.bool), cliprange=0.2, normalizer=2.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -adv / 2.0)


def test_value_loss_matches_hand_computation():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.tensor([[True, True]])
    loss, stats = pm.value_loss(values, old, returns, mask, cliprange_value=0.2, normalizer=2.0)
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.7 -> (0.7-2)^2 = 1.69; token 1: 0 vs (0.0-0)^2... clip keeps 0.0
    expected = 0.5 * (1.69 + 0.0) / 2.0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["value/clipfrac"].item() == 1.0
    unclipped, _ = pm.value_loss(values, old, returns, mask, cliprange_value=None, normalizer=2.0)
    assert unclipped.item() == pytest.approx(0.5 * 1.0 / 2.0)


def test_whiten_and_moments():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert pm.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert pm.masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 2, 3, 4]).var().item())
    w = pm.whiten(x, mask)
    assert pm.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert pm.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert w[1, 1:].abs().sum() == 0
    kept = pm.whiten(x, mask, shift_mean=False)
    assert pm.masked_mean(kept, mask).item() == pytest.approx(2.5, abs=1e-5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(returns, dtype=torch.bool)
    assert pm.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert pm.explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)


def test_kl_and_entropy_exact():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    kl, entropy = pm.kl_and_entropy(p_logits, q_logits, chunk_positions=4)
    p, q = p_logits.softmax(-1).double(), q_logits.softmax(-1).double()
    torch.testing.assert_close(kl.double(), (p * (p / q).log()).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    same, _ = pm.kl_and_entropy(p_logits, p_logits)
    assert same.abs().max() < 1e-6
