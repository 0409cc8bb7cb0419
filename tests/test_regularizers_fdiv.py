"""f-divergence penalties: closed forms, unbiasedness of the one-sample estimate, robustness, errors."""

from __future__ import annotations

import math

import pytest
import torch

from otalign.regularizers import (
    F_DIVERGENCES,
    FDivergenceRegularizer,
    build_regularizer,
    exact_f_divergence,
    f_over_x,
)

# Table 11 of the WPR paper: f(u) for each divergence.
TABLE_11 = {
    "rkl": lambda u: u * math.log(u),
    "fkl": lambda u: -math.log(u),
    "js": lambda u: u * math.log(u) - (u + 1) * math.log((u + 1) / 2),
    "alpha": lambda u: (u**0.5 - 0.5 * u - 0.5) / (0.5 * -0.5),
    "tv": lambda u: 0.5 * abs(u - 1),
    "chi2": lambda u: (u - 1) ** 2,
}


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", F_DIVERGENCES)
@pytest.mark.parametrize("x", [1e-3, 0.3, 1.0, 1.7, 50.0])
def test_penalty_is_f_of_x_over_x(kind, x):
    got = f_over_x(torch.tensor(math.log(x), dtype=torch.float64), kind)
    assert float(got) == pytest.approx(TABLE_11[kind](x) / x, rel=1e-9, abs=1e-12)


def test_kl_estimators_closed_forms():
    r = torch.tensor([-2.0, -0.1, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(f_over_x(r, "rkl", estimator="k1"), r)
    assert torch.allclose(f_over_x(r, "rkl", estimator="k2"), 0.5 * r**2)
    assert torch.allclose(f_over_x(r, "rkl", estimator="k3"), torch.exp(-r) - 1 + r)
    assert (f_over_x(r, "rkl", estimator="k3") >= 0).all()


def test_exact_divergences_on_a_hand_case():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    m = 0.5 * (p + q)
    expected = {
        "rkl": (p * (p / q).log()).sum(),
        "fkl": (q * (q / p).log()).sum(),
        # Table 11's JS is twice the usual Jensen-Shannon divergence: KL(p||m) + KL(q||m).
        "js": (p * (p / m).log()).sum() + (q * (q / m).log()).sum(),
        "alpha": 4 * (1 - (p.sqrt() * q.sqrt()).sum()),
        "tv": 0.5 * (p - q).abs().sum(),
        "chi2": ((p - q) ** 2 / q).sum(),
    }
    for kind, value in expected.items():
        assert float(exact_f_divergence(p.log(), q.log(), kind)) == pytest.approx(float(value), rel=1e-10), kind


@pytest.mark.parametrize("kind,estimator", [(k, "k1") for k in F_DIVERGENCES] + [("rkl", "k3")])
def test_monte_carlo_mean_matches_exact_divergence(kind, estimator):
    """E_{y ~ pi_theta}[penalty(y)] = D_f(pi_theta || pi_ref): average over many samples at each position."""
    vocab, samples = 12, 20000
    policy = _logits(2, 1, vocab, seed=1)
    ref = policy + _logits(2, 1, vocab, seed=2, scale=0.7)
    actions = torch.distributions.Categorical(logits=policy[:, 0]).sample((samples,)).T  # (2, samples)
    reg = FDivergenceRegularizer(kind, estimator=estimator)
    out = reg.penalty(policy.expand(2, samples, vocab), ref.expand(2, samples, vocab), actions)
    exact = out.stats[f"{kind}/exact"]
    per_position = out.per_token.double()
    stderr = float(per_position.std(1).max()) / math.sqrt(samples)
    assert abs(float(per_position.mean()) - exact) < 5 * stderr + 1e-6
    assert out.stats["penalty/mean"] == pytest.approx(float(per_position.mean()), rel=1e-6)


def test_penalty_per_token_matches_log_ratio_and_mask():
    policy, ref = _logits(2, 3, 7, seed=3), _logits(2, 3, 7, seed=4)
    actions = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = build_regularizer("kl").penalty(policy, ref, actions, mask)
    log_ratio = (policy.log_softmax(-1) - ref.log_softmax(-1)).gather(-1, actions[..., None])[..., 0]
    assert out.per_token.dtype == torch.float32 and out.per_token.shape == (2, 3)
    assert torch.allclose(out.per_token[mask], log_ratio[mask], atol=1e-6)
    assert (out.per_token[~mask] == 0).all()
    kl = (policy.softmax(-1) * (policy.log_softmax(-1) - ref.log_softmax(-1))).sum(-1)
    assert out.stats["kl/exact"] == pytest.approx(float(kl[mask].mean()), rel=1e-5)
    assert out.stats["penalty/mean"] == pytest.approx(float(log_ratio[mask].mean()), rel=1e-5)


def test_chunking_does_not_change_the_result():
    policy, ref = _logits(3, 5, 11, seed=6), _logits(3, 5, 11, seed=7)
    actions = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(8))
    whole = FDivergenceRegularizer("js").penalty(policy, ref, actions)
    chunked = FDivergenceRegularizer("js", max_chunk_elements=11 * 2).penalty(policy, ref, actions)
    assert torch.equal(whole.per_token, chunked.per_token)
    for name, value in whole.stats.items():
        assert chunked.stats[name] == pytest.approx(value, rel=1e-6)


def test_non_contiguous_logits_are_read_in_place():
    policy, ref = _logits(2, 6, 9, seed=9), _logits(2, 6, 9, seed=10)
    actions = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(11))
    sliced = FDivergenceRegularizer("chi2").penalty(policy[:, 1:5], ref[:, 1:5], actions)
    copied = FDivergenceRegularizer("chi2").penalty(policy[:, 1:5].contiguous(), ref[:, 1:5].contiguous(), actions)
    assert torch.equal(sliced.per_token, copied.per_token)


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_robust_to_masked_vocabulary_half_precision_and_extreme_distributions(kind):
    vocab = 16
    policy, ref = _logits(4, 3, vocab, seed=12), _logits(4, 3, vocab, seed=13)
    policy[0, :, : vocab // 2] = -math.inf  # the policy rules out half the vocabulary
    ref[1, :, vocab // 2 :] = -math.inf  # the reference rules out the other half
    ref[2] = policy[2]  # identical distributions
    policy[3], ref[3] = -math.inf, -math.inf  # disjoint point masses
    policy[3, :, 0], ref[3, :, 1] = 0.0, 0.0
    actions = torch.randint(0, vocab, (4, 3), generator=torch.Generator().manual_seed(14))
    actions[0] = vocab - 1
    actions[3] = 0
    reg = FDivergenceRegularizer(kind)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = reg.penalty(policy.to(dtype), ref.to(dtype), actions)
        assert torch.isfinite(out.per_token).all(), (kind, dtype)
        assert all(math.isfinite(v) for v in out.stats.values()), (kind, dtype, out.stats)
        assert (out.per_token[2].abs() < 1e-5).all()
        assert out.per_token.dtype == torch.float32
    # A token the policy samples but the reference rules out gets a large finite penalty.
    if kind in ("rkl", "chi2", "js", "tv"):
        assert float(reg.penalty(policy, ref, actions).per_token[3, 0]) > 0


def test_empty_mask_gives_zero_penalties():
    policy = _logits(2, 3, 5)
    out = build_regularizer("tv").penalty(policy, policy, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3).bool())
    assert (out.per_token == 0).all() and out.stats["penalty/mean"] == 0.0


def test_actions_outside_the_mask_are_not_checked():
    policy = _logits(1, 2, 5)
    actions = torch.tensor([[1, -100]])
    out = build_regularizer("kl").penalty(policy, policy, actions, torch.tensor([[True, False]]))
    assert out.per_token[0, 1] == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: build_regularizer("hellinger"), "unknown regularizer"),
        (lambda: FDivergenceRegularizer("hellinger"), "unknown f-divergence"),
        (lambda: FDivergenceRegularizer("rkl", estimator="k4"), "unknown KL estimator"),
        (lambda: FDivergenceRegularizer("js", estimator="k3"), "reverse KL only"),
        (lambda: FDivergenceRegularizer("alpha", alpha=1.0), "alpha must lie in"),
        (lambda: FDivergenceRegularizer("rkl", max_chunk_elements=0), "max_chunk_elements"),
    ],
)
def test_bad_configuration_is_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "actions, mask, message",
    [
        (torch.zeros(2, 3), None, "integer tensor"),
        (torch.zeros(2, 3, dtype=torch.bool), None, "bool tensor"),
        (torch.zeros(2, 4, dtype=torch.long), None, r"\(B, T\) = \(2, 3\)"),
        (torch.zeros(6, dtype=torch.long), None, r"\(B, T\) = \(2, 3\)"),
        (torch.full((2, 3), 5), None, r"\[0, V\) = \[0, 5\)"),
        (torch.full((2, 3), -1), None, r"\[0, V\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), "mask must be a bool"),
        (torch.zeros(2, 3, dtype=torch.long), torch.ones(3, 2).bool(), "mask must be"),
    ],
)
def test_bad_inputs_are_rejected(actions, mask, message):
    policy = _logits(2, 3, 5)
    with pytest.raises(ValueError, match=message):
        build_regularizer("kl").penalty(policy, policy, actions, mask)


def test_bad_logits_are_rejected():
    reg = build_regularizer("kl")
    actions = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="one shape"):
        reg.penalty(_logits(2, 3, 5), _logits(2, 3, 6), actions)
    with pytest.raises(ValueError, match=r"floating-point \(B, T, V\)"):
        reg.penalty(_logits(2, 3, 5).long(), _logits(2, 3, 5), actions)
    with pytest.raises(ValueError, match=r"floating-point \(B, T, V\)"):
        reg.penalty(_logits(6, 5), _logits(6, 5), actions)
