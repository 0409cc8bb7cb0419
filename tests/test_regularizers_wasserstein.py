"""The WPR penalty: the truncated problem it builds, POT agreement, the shift convention, finite-difference
gradients, the paper's Figure 1 example, debiasing, the smooth default's vanishing noise near the reference
(also in a PPO step), robustness and errors."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from otalign.regularizers import (
    FDivergenceRegularizer,
    TruncatedProblem,
    WassersteinRegularizer,
    build_problem,
    build_regularizer,
    default_smooth_tau,
    smooth_distance,
    solve_problem,
)
from otalign.regularizers.wasserstein import select_support
from otalign.trainers import PPOConfig, PPOTrainer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem_inputs(n=3, vocab=30, dim=4, seed=0, dtype=torch.float64, scale=0.25):
    policy = 2 * torch.randn(n, vocab, generator=_gen(seed), dtype=dtype)
    ref = policy + torch.randn(n, vocab, generator=_gen(seed + 1), dtype=dtype)
    embeddings = scale * torch.randn(vocab, dim, generator=_gen(seed + 2), dtype=dtype)
    actions = torch.randint(0, vocab, (n,), generator=_gen(seed + 3))
    return policy, ref, actions, embeddings


def test_support_is_deduplicated_and_the_sampled_token_carries_its_mass():
    policy = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0]]).log_softmax(-1)
    ref = torch.tensor([[3.0, 0.0, 5.0, 4.0, 0.0, 0.0]]).log_softmax(-1)
    support = select_support(policy, ref, torch.tensor([2]), top_k=3)
    # slots: [y=2 | 0, 1, 2 | 2, 3, 0] -> token 2 appears three times, token 0 twice.
    assert support.tokens[0, 0] == 2 and support.distinct[0, 0]
    distinct_tokens = support.tokens[support.distinct]
    assert sorted(distinct_tokens.tolist()) == [0, 1, 2, 3]

    problem = build_problem(policy, ref, torch.tensor([2]), torch.eye(6), top_k=3)
    assert problem.tokens.shape == (1, 4) and problem.distinct.all() and problem.tokens[0, 0] == 2
    p, q = policy.exp()[0], ref.exp()[0]
    assert torch.allclose(problem.a[0, :-1], p[problem.tokens[0]], atol=1e-6)
    assert torch.allclose(problem.b[0, :-1], q[problem.tokens[0]], atol=1e-6)
    assert float(problem.a[0, -1]) == pytest.approx(float(p[4:].sum()), abs=1e-6)  # dust: tokens 4 and 5
    assert float(problem.b[0, -1]) == pytest.approx(float(q[4:].sum()), abs=1e-6)
    cost = problem.cost[0]
    assert float(cost[-1, -1]) == 0 and torch.equal(cost, cost.T)
    assert torch.allclose(cost[:-1, -1], torch.full((4,), math.sqrt(2.0)))  # dust cost: the largest cost


def test_duplicate_slots_have_no_mass_and_are_dropped_when_padding():
    policy, ref, _, embeddings = _problem_inputs(n=2, vocab=10)
    actions = policy.argmax(-1)  # the sampled token is also in both top-k sets
    problem = build_problem(policy, ref, actions, embeddings, top_k=3)
    assert problem.tokens.shape[1] <= 7
    for row in range(2):
        live = problem.tokens[row][problem.distinct[row]]
        assert len(set(live.tolist())) == live.numel()
        assert (problem.a[row, :-1][~problem.distinct[row]] == 0).all()
        assert problem.a[row, 0] > 0
    assert torch.allclose(problem.a.sum(1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_difference_transport_matches_pot(metric):
    """Excess (a-b)+ onto deficit (b-a)+, normalised, KL(P || alpha beta^T): value m * OT and potentials
    u (excess atoms) and -v (deficit atoms) against POT's log-domain Sinkhorn in float64."""
    lam = 10.0
    policy, ref, actions, embeddings = _problem_inputs(n=3, vocab=30)
    problem = build_problem(policy, ref, actions, embeddings, top_k=5, metric=metric)
    solution = solve_problem(problem, lam, tol=1e-12, max_iter=20000)
    for row in range(3):
        value, phi, held = _pot_difference(problem, row, lam)
        assert float(solution.value[row]) == pytest.approx(value, abs=1e-9)
        np.testing.assert_allclose(solution.potential[row].numpy()[held], phi[held], atol=1e-8)


@pytest.mark.parametrize("transport", ["difference", "smooth"])
def test_newton_steps_finish_what_sinkhorn_leaves_unconverged(transport):
    """At lambda = 100 on spread-out embeddings, 20 Sinkhorn iterations leave problems above tol; Newton steps
    bring every one to the penalties of a solve run to tol 1e-11 (up to 10^5 iterations)."""
    policy, ref, actions, embeddings = _problem_inputs(n=6, vocab=40, dim=6, scale=1.0, seed=3)
    problem = build_problem(policy, ref, actions, embeddings, top_k=6)
    short = {"transport": transport, "tau": 0.5, "max_iter": 20, "tol": 1e-9}
    plain = solve_problem(problem, 100.0, **short)
    assert not bool(plain.converged.all())
    finished = solve_problem(problem, 100.0, newton_steps=40, **short)
    reference = solve_problem(problem, 100.0, transport=transport, tau=0.5, max_iter=100_000, tol=1e-11)
    assert bool(finished.converged.all()) and bool(reference.converged.all())
    held = problem.a > 0
    np.testing.assert_allclose(finished.potential[held].numpy(), reference.potential[held].numpy(), atol=1e-7)
    np.testing.assert_allclose(finished.value.numpy(), reference.value.numpy(), atol=1e-9)


def test_difference_transport_is_zero_at_equality_and_tends_to_the_full_value():
    policy, ref, actions, embeddings = _problem_inputs(n=3, vocab=30)
    same = solve_problem(build_problem(policy, policy, actions, embeddings, top_k=5), 100.0)
    assert torch.equal(same.value, torch.zeros(3, dtype=same.value.dtype))
    assert torch.equal(same.penalty, torch.zeros(3, dtype=same.value.dtype))
    # As lambda grows both forms approach W1(a, b) (the unregularised LP, POT's emd2).
    problem = build_problem(policy, ref, actions, embeddings, top_k=5)
    difference = solve_problem(problem, 1000.0, tol=1e-10, max_iter=50000).value
    for row in range(3):
        exact = ot.emd2(problem.a[row].numpy(), problem.b[row].numpy(), problem.cost[row].numpy())
        assert float(difference[row]) == pytest.approx(exact, abs=5e-3)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_full_transport_matches_pot(metric):
    lam = 10.0
    policy, ref, actions, embeddings = _problem_inputs(n=3, vocab=30)
    problem = build_problem(policy, ref, actions, embeddings, top_k=5, metric=metric)
    assert problem.a[:, -1].min() > 0.01  # the dust atom is in play
    solution = solve_problem(problem, lam, transport="full", tol=1e-12, max_iter=20000)
    for row in range(3):
        keep = torch.cat([problem.distinct[row], torch.tensor([True])])
        a, b = problem.a[row][keep].numpy(), problem.b[row][keep].numpy()
        cost = problem.cost[row][keep][:, keep].numpy()
        pot = ot.solve(cost, a, b, reg=1 / lam, reg_type="entropy", method="sinkhorn_log", max_iter=20000, tol=1e-13)
        # POT's objective is <P,C> + eps sum P log P (ours has - eps sum P); its potentials are in units of eps.
        assert float(solution.value[row]) == pytest.approx(pot.value - 1 / lam, abs=1e-9)
        ours = solution.potential[row][keep].numpy()
        theirs = pot.potentials[0] / lam
        np.testing.assert_allclose(ours - a @ ours, theirs - a @ theirs, atol=1e-8)
        np.testing.assert_allclose(a @ ours, float(solution.value[row]), atol=1e-10)  # the shift convention


def _full_cover_setup(seed=4, vocab=6):
    policy, ref, _, embeddings = _problem_inputs(n=1, vocab=vocab, dim=3, seed=seed, scale=0.3)
    return policy[0], ref[0], embeddings


@pytest.mark.parametrize(
    ("transport", "tau"), [("difference", None), ("full", None), ("smooth", None), ("smooth", 50.0)]
)
def test_shift_convention_with_a_support_that_covers_the_vocabulary(transport, tau):
    """sum_y pi_theta(y) penalty(y) = the distance, every y sampled once at its own position (unbiasedness);
    for the smooth form both beyond tau (the default here) and inside the quadratic zone (tau = 50)."""
    policy, ref, embeddings = _full_cover_setup()
    vocab = policy.shape[0]
    reg = WassersteinRegularizer(
        embeddings, lam=10.0, top_k=vocab, tol=1e-7, max_iter=20000, transport=transport, smooth_tau=tau
    )
    out = reg.penalty(policy.expand(1, vocab, vocab), ref.expand(1, vocab, vocab), torch.arange(vocab)[None])
    expectation = float((policy.softmax(-1) * out.per_token[0].double()).sum())
    assert out.stats["wasserstein/dust_mass"] < 1e-6
    assert out.stats["wasserstein/support_size"] == vocab
    assert expectation == pytest.approx(out.stats["wasserstein/value"], abs=1e-5)
    assert out.stats["penalty/mean"] == pytest.approx(float(out.per_token.mean()), abs=1e-6)
    if tau is not None:  # inside the zone: the distance is the blend of the difference form's, and smaller
        difference = WassersteinRegularizer(
            embeddings, lam=10.0, top_k=vocab, tol=1e-7, max_iter=20000, transport="difference"
        )
        plain = difference.penalty(policy[None, None], ref[None, None], torch.zeros(1, 1, dtype=torch.long))
        value = torch.tensor(plain.stats["wasserstein/value"])
        assert out.stats["wasserstein/value"] == pytest.approx(float(smooth_distance(value, tau)[0]), rel=1e-5)
        assert out.stats["wasserstein/value"] < 0.5 * float(value)


@pytest.mark.parametrize("transport", ["difference", "full", "smooth"])
def test_penalty_is_the_finite_difference_gradient_of_the_value(transport):
    """phi_slot - phi_0 = d value / d(a_slot - a_0) at the converged solution; the smooth form inside its
    quadratic zone (tau = 3 x the difference-form value), where its gradient is h'(W) times the difference form's."""
    lam, step = 10.0, 1e-5
    policy, ref, embeddings = _full_cover_setup(seed=7)
    vocab = policy.shape[0]
    problem = build_problem(policy[None], ref[None], torch.tensor([0]), embeddings, top_k=vocab)
    assert ((problem.a - problem.b)[:, :-1].abs() > 10 * step).all()  # away from the kinks of the difference form
    tokens = problem.tokens[0].tolist()
    tau = 3 * float(solve_problem(problem, lam).value[0]) if transport == "smooth" else None
    settings = dict(transport=transport, tau=tau, tol=1e-13, max_iter=50000)
    potential = solve_problem(problem, lam, **settings).potential[0, :-1]

    def value(a: torch.Tensor) -> float:
        moved = TruncatedProblem(a=a, b=problem.b, cost=problem.cost, tokens=problem.tokens, distinct=problem.distinct)
        return float(solve_problem(moved, lam, **settings).value[0])

    for slot in range(1, vocab):
        direction = torch.zeros_like(problem.a)
        direction[0, slot], direction[0, 0] = 1.0, -1.0  # stay on the simplex
        grad = (value(problem.a + step * direction) - value(problem.a - step * direction)) / (2 * step)
        assert grad == pytest.approx(float(potential[slot] - potential[0]), abs=1e-6), tokens[slot]

    # The regularizer's float32 penalties are the same potentials (up to float32 rounding).
    reg = WassersteinRegularizer(
        embeddings.float(), lam=lam, top_k=vocab, tol=1e-7, max_iter=20000, transport=transport, smooth_tau=tau
    )
    out = reg.penalty(policy.expand(1, vocab, vocab), ref.expand(1, vocab, vocab), torch.arange(vocab)[None])
    assert torch.allclose(out.per_token[0].double(), potential[torch.argsort(torch.tensor(tokens))], atol=2e-5)


# WPR paper, Figure 1: vocabulary {cat, kitten, dog, table}; kitten near cat, table far away.
FIGURE_1_EMBEDDINGS = torch.tensor([[0.0, 0.0], [0.15, 0.05], [0.6, 0.3], [3.0, -2.0]])
FIGURE_1 = {
    "reference": [0.85, 0.05, 0.05, 0.05],
    "kitten": [0.05, 0.85, 0.05, 0.05],
    "dog": [0.05, 0.05, 0.85, 0.05],
    "table": [0.05, 0.05, 0.05, 0.85],
}


def _figure_1_stats(reg, policy: str) -> dict[str, float]:
    logits = torch.tensor([FIGURE_1[policy], FIGURE_1["reference"]]).log()[:, None, None, :]
    return reg.penalty(logits[0], logits[1], torch.tensor([[0]])).stats


@pytest.mark.parametrize(
    ("transport", "debias"), [("smooth", False), ("difference", False), ("full", False), ("full", True)]
)
def test_figure_1_wasserstein_orders_kitten_closer_while_js_ties(transport, debias):
    reg = WassersteinRegularizer(
        FIGURE_1_EMBEDDINGS, lam=100.0, top_k=4, transport=transport, debias=debias, tol=1e-6, max_iter=5000
    )
    kitten, dog, table = (_figure_1_stats(reg, name) for name in ("kitten", "dog", "table"))
    assert max(s["sinkhorn/marginal_err"] for s in (kitten, dog, table)) < 1e-4
    assert kitten["wasserstein/value"] < dog["wasserstein/value"] < table["wasserstein/value"]
    assert table["wasserstein/value"] - kitten["wasserstein/value"] > 2.0  # moving 0.8 mass ~3.6 vs ~0.16 away
    js = FDivergenceRegularizer("js")
    assert _figure_1_stats(js, "kitten")["js/exact"] == pytest.approx(_figure_1_stats(js, "table")["js/exact"])
    assert _figure_1_stats(js, "kitten")["kl/exact"] == pytest.approx(_figure_1_stats(js, "table")["kl/exact"])


def test_debiased_penalty_vanishes_when_the_policy_is_the_reference():
    policy, ref, actions, embeddings = _problem_inputs(n=4, vocab=40, dtype=torch.float32, scale=1.0)
    reg = WassersteinRegularizer(embeddings, top_k=8, transport="full", debias=True)
    same = reg.penalty(policy[None], policy[None], actions[None])
    assert same.per_token.abs().max() < 1e-6
    assert abs(same.stats["wasserstein/value"]) < 1e-6
    other = reg.penalty(policy[None], ref[None], actions[None])
    assert other.stats["wasserstein/value"] > 1e-3  # the Sinkhorn divergence is positive
    # Without debiasing the value at equality is the entropic offset, still the expectation of the penalty.
    full = WassersteinRegularizer(embeddings, top_k=8, transport="full")
    assert full.penalty(policy[None], policy[None], actions[None]).stats["wasserstein/value"] < 0
    # The difference transport is exactly 0 there without debiasing.
    difference = WassersteinRegularizer(embeddings, top_k=8).penalty(policy[None], policy[None], actions[None])
    assert torch.equal(difference.per_token, torch.zeros_like(difference.per_token))


def _pot_difference(problem: TruncatedProblem, row: int, lam: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Independent difference-form value and penalties from POT's log-domain Sinkhorn: POT's plan is
    exp(log_u + log_v - C/eps), ours alpha beta exp((u + v - C)/eps) with phi = u (excess) | -v (deficit),
    shifted so that sum_i a_i phi_i = value over the atoms with policy mass (``held``)."""
    a, b = problem.a[row].numpy(), problem.b[row].numpy()
    excess, deficit = np.flatnonzero(a > b), np.flatnonzero(b > a)
    moved = (a - b)[excess].sum()
    alpha, beta = (a - b)[excess] / moved, (b - a)[deficit] / moved
    cost = problem.cost[row].numpy()[np.ix_(excess, deficit)]
    plan, log = ot.bregman.sinkhorn_log(alpha, beta, cost, 1 / lam, numItermax=20000, stopThr=1e-14, log=True)
    value = moved * ((plan * cost).sum() + (plan * np.log(plan / np.outer(alpha, beta))).sum() / lam)
    phi = np.zeros_like(a)
    phi[excess] = (log["log_u"] - np.log(alpha)) / lam
    phi[deficit] = -(log["log_v"] - np.log(beta)) / lam
    held = a > 0
    phi[held] += value - a[held] @ phi[held]
    return value, phi, held


@pytest.mark.parametrize("zone", ["inside", "beyond"])
def test_smooth_transport_matches_the_blend_of_pot(zone):
    """D = h_tau(W) and psi = h'(W) (phi - W) + D from POT's difference-form solution, with tau above every
    position's W (the quadratic zone) or below (then exactly the difference form)."""
    lam = 10.0
    policy, ref, actions, embeddings = _problem_inputs(n=3, vocab=30)
    problem = build_problem(policy, ref, actions, embeddings, top_k=5)
    values = solve_problem(problem, lam, tol=1e-12, max_iter=20000).value
    tau = 2.0 * float(values.max()) if zone == "inside" else 0.5 * float(values.min())
    solution = solve_problem(problem, lam, transport="smooth", tau=tau, tol=1e-12, max_iter=20000)
    for row in range(3):
        value, phi, held = _pot_difference(problem, row, lam)
        x = min(value / tau, 1.0)
        distance = value * x * (2 - x) if zone == "inside" else value
        slope = x * (4 - 3 * x)
        assert float(solution.value[row]) == pytest.approx(distance, abs=1e-9)
        np.testing.assert_allclose(
            solution.potential[row].numpy()[held], slope * (phi[held] - value) + distance, atol=1e-8
        )
        assert float(problem.a[row][held] @ solution.potential[row][held]) == pytest.approx(distance, abs=1e-10)
        assert bool(torch.isneginf(solution.potential[row][~torch.from_numpy(held)]).all())


def test_smooth_blend_is_c1_monotone_and_below_the_distance():
    tau = 0.3
    w = torch.linspace(0, 2 * tau, 601, dtype=torch.float64)
    h, slope = smooth_distance(w, tau)
    assert h[0] == 0 and slope[0] == 0
    assert (h <= w + 1e-15).all() and (torch.diff(h) >= 0).all()
    assert torch.equal(h[w >= tau], w[w >= tau]) and (slope <= 4 / 3 + 1e-12).all()
    step = 1e-6  # the derivative is h' everywhere, across tau too (C1)
    grid = torch.tensor([0.01, 0.1, 2 * tau / 3, tau - 1e-3, tau, tau + 1e-3, 0.5], dtype=torch.float64)
    numeric = (smooth_distance(grid + step, tau)[0] - smooth_distance(grid - step, tau)[0]) / (2 * step)
    assert torch.allclose(numeric, smooth_distance(grid, tau)[1], atol=1e-6)
    assert torch.equal(smooth_distance(w, 0.0)[0], w)  # tau = 0: the difference form
    assert smooth_distance(torch.tensor([-1e-9]), tau)[0] == 0  # rounding below 0 maps to 0


def test_smooth_default_is_exactly_zero_at_equality_and_tends_to_a_transport_distance():
    policy, ref, actions, embeddings = _problem_inputs(n=3, vocab=30)
    reg = WassersteinRegularizer(embeddings, lam=1000.0, top_k=5, tol=1e-10, max_iter=50000)
    assert reg.transport == "smooth"
    assert reg.tau == pytest.approx(0.05 * float(torch.pdist(embeddings).mean()), rel=1e-6)  # all 30 rows
    same = reg.penalty(policy[None], policy[None], actions[None])
    assert torch.equal(same.per_token, torch.zeros_like(same.per_token)) and same.stats["wasserstein/value"] == 0
    # lambda -> infinity: D -> h_tau(W1), = W1 where W1 >= tau (POT's emd2, the unregularised LP).
    problem = build_problem(policy, ref, actions, embeddings, top_k=5)
    smooth = reg.solve(problem).value
    for row in range(3):
        exact = ot.emd2(problem.a[row].numpy(), problem.b[row].numpy(), problem.cost[row].numpy())
        assert exact > reg.tau
        assert float(smooth[row]) == pytest.approx(exact, abs=5e-3)
    near = build_problem(policy, policy + 0.02 * ref, actions, embeddings, top_k=5)  # W1 < tau: the blend of W1
    smooth = reg.solve(near).value
    for row in range(3):
        exact = ot.emd2(near.a[row].numpy(), near.b[row].numpy(), near.cost[row].numpy())
        assert exact < reg.tau
        assert float(smooth[row]) == pytest.approx(float(smooth_distance(torch.tensor(exact), reg.tau)[0]), abs=1e-4)


def _noise_stds(transport: str, deltas, n=256, vocab=400, dim=16, top_k=16) -> list[float]:
    """Per-token std of the sampled-token penalty at reference logits 3 N(0,1), policy = reference + delta N(0,1)."""
    embeddings = torch.randn(vocab, dim, generator=_gen(11)) / math.sqrt(2 * dim)
    ref = 3 * torch.randn(n, vocab, generator=_gen(12))
    noise = torch.randn(n, vocab, generator=_gen(13))
    reg = WassersteinRegularizer(embeddings, lam=100.0, top_k=top_k, transport=transport)
    stds = []
    for delta in deltas:
        policy = ref + delta * noise
        actions = torch.multinomial(policy.softmax(-1), 1, generator=_gen(14))[:, 0]
        stds.append(float(reg.penalty(policy[None], ref[None], actions[None]).per_token.std()))
    return stds


def test_smooth_penalty_noise_vanishes_linearly_with_the_distance_to_the_reference():
    """The issue's setting at lambda = 100: the difference form's per-token spread is of the order of the costs
    at any delta; the smooth form's scales like delta (std / delta within a factor 2 over three decades)."""
    deltas = [1e-6, 1e-5, 1e-4, 1e-3]
    smooth = _noise_stds("smooth", deltas)
    difference = _noise_stds("difference", deltas)
    assert min(difference) > 0.1
    ratios = [std / delta for std, delta in zip(smooth, deltas, strict=True)]
    assert max(ratios) < 2 * min(ratios), ratios
    assert smooth[0] < 1e-4 and smooth[2] < 1e-2


def test_ppo_step_one_penalty_is_zero_when_the_policy_is_the_reference(tmp_path):
    """Full fine-tuning, policy = reference (and the reference's weights + 1e-6 noise, the float noise of a
    real run): the default WPR penalty's logged step-1 mean is ~0."""
    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    for name, noise in [("same", 0.0), ("noisy", 1e-6)]:
        policy = tiny_causal_lm(tokenizer, seed=0)
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(noise * torch.randn(param.shape, generator=_gen(5)))
        config = PPOConfig(
            output_dir=str(tmp_path / name),
            max_steps=1,
            per_device_train_batch_size=4,
            response_length=6,
            progress_bar=False,
            save_model=False,
            regularizer="wasserstein",
            wpr_top_k=8,
        )
        trainer = PPOTrainer(
            config,
            policy=policy,
            ref_model=tiny_causal_lm(tokenizer, seed=0),
            tokenizer=tokenizer,
            reward=lambda prompts, responses: [0.0] * len(responses),
            prompts=["tell me about the cat .", "how was the day ?"],
        )
        assert trainer.regularizer.transport == "smooth"
        (metrics,) = trainer.train()
        assert abs(metrics["penalty/mean"]) < 1e-3, (name, metrics)
        assert metrics["wasserstein/value"] < 1e-6


def test_chunking_and_masking():
    policy, ref, _, embeddings = _problem_inputs(n=6, vocab=25, dtype=torch.float32)
    policy, ref = policy.view(2, 3, 25), ref.view(2, 3, 25)
    actions = torch.randint(0, 25, (2, 3), generator=_gen(9))
    mask = torch.tensor([[True, True, True], [True, False, False]])
    reg = WassersteinRegularizer(embeddings, lam=20.0, top_k=4, tol=1e-6, max_iter=5000)
    whole = reg.penalty(policy, ref, actions, mask)
    small = WassersteinRegularizer(embeddings, lam=20.0, top_k=4, tol=1e-6, max_iter=5000, max_chunk_elements=60)
    chunked = small.penalty(policy, ref, actions, mask)
    assert (whole.per_token[~mask] == 0).all()
    assert torch.allclose(whole.per_token, chunked.per_token, atol=1e-4)
    assert (
        whole.stats.keys()
        == chunked.stats.keys()
        >= {
            "penalty/mean",
            "kl/exact",
            "wasserstein/value",
            "sinkhorn/iters",
            "sinkhorn/marginal_err",
            "wasserstein/support_size",
            "wasserstein/dust_mass",
        }
    )
    single = reg.penalty(policy[1:, :1], ref[1:, :1], actions[1:, :1])
    assert float(single.per_token[0, 0]) == pytest.approx(float(whole.per_token[1, 0]), abs=1e-4)


def test_knn_truncation_prices_non_neighbours_through_the_dust(tmp_path):
    policy, ref, actions, embeddings = _problem_inputs(n=2, vocab=20, dtype=torch.float32)
    reg = WassersteinRegularizer(embeddings, lam=20.0, top_k=6, knn=3, knn_cache_dir=tmp_path)
    assert len(list(tmp_path.glob("knn-radius-*.pt"))) == 1
    problem = build_problem(policy, ref, actions, embeddings, top_k=6, radius=reg.radius)
    plain = build_problem(policy, ref, actions, embeddings, top_k=6)
    dust = plain.cost[:, 0, -1]
    tokens = problem.tokens
    reach = torch.maximum(reg.radius[tokens][:, :, None], reg.radius[tokens][:, None, :])
    near = plain.cost[:, :-1, :-1] <= reach * (1 + 1e-4)
    assert (~near).any() and near.any()
    assert torch.equal(problem.cost[:, :-1, :-1][near], plain.cost[:, :-1, :-1][near])
    assert torch.allclose(
        problem.cost[:, :-1, :-1], torch.where(near, plain.cost[:, :-1, :-1], 2 * dust[:, None, None])
    )
    # The k1-th neighbour itself counts as a neighbour.
    distances = torch.cdist(embeddings, embeddings)
    third = distances[0].argsort()[3]
    assert float(distances[0, third]) == pytest.approx(float(reg.radius[0]), rel=1e-5)
    out = reg.penalty(policy[None], ref[None], actions[None])
    assert torch.isfinite(out.per_token).all() and out.stats["sinkhorn/marginal_err"] < 1e-3


def test_robust_inputs_give_finite_penalties():
    vocab = 24
    policy, ref, actions, embeddings = _problem_inputs(n=6, vocab=vocab, dtype=torch.float32, scale=1.0)
    embeddings[:4] = 0.0  # tokens with all-zero embeddings
    policy[0, : vocab // 2] = -math.inf  # masked vocabulary; the sampled token is ruled out by the policy
    actions[0] = 0
    ref[1, vocab // 2 :] = -math.inf  # ...or by the reference
    actions[1] = vocab - 1
    ref[2] = policy[2]  # identical
    policy[3], ref[3] = -math.inf, -math.inf  # disjoint point masses
    policy[3, 1], ref[3, 2] = 0.0, 0.0
    actions[3] = 1
    policy[4, 5] = 60.0  # a (numerically) point mass not on the sampled token: its probability underflows
    actions[4] = 6
    for metric in ("euclidean", "cosine"):
        for lam, transport, debias, knn in [
            (100.0, "smooth", False, None),
            (1e4, "smooth", False, 5),
            (1e4, "difference", False, None),
            (100.0, "difference", False, 5),
            (1e4, "full", False, None),
            (100.0, "full", True, 5),
        ]:
            reg = WassersteinRegularizer(
                embeddings, lam=lam, top_k=5, metric=metric, transport=transport, debias=debias, knn=knn
            )
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                half_policy = policy.to(dtype)
                half_policy[4, 5] = 60.0 if dtype != torch.float16 else 30.0
                out = reg.penalty(half_policy[None], ref.to(dtype)[None], actions[None])
                assert torch.isfinite(out.per_token).all(), (metric, lam, debias, dtype)
                assert all(math.isfinite(v) for v in out.stats.values()), (metric, lam, debias, dtype, out.stats)


def test_configuration_and_input_errors():
    embeddings = torch.randn(10, 3)
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        WassersteinRegularizer(embeddings, top_k=11)
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        WassersteinRegularizer(embeddings, top_k=0)
    with pytest.raises(ValueError, match="metric must be one of"):
        WassersteinRegularizer(embeddings, top_k=2, metric="manhattan")
    with pytest.raises(ValueError, match="lam must be"):
        WassersteinRegularizer(embeddings, top_k=2, lam=0.0)
    with pytest.raises(ValueError, match="dust_cost must be"):
        WassersteinRegularizer(embeddings, top_k=2, dust_cost="min")
    with pytest.raises(ValueError, match="dust_cost must be"):
        WassersteinRegularizer(embeddings, top_k=2, dust_cost=-1.0)
    with pytest.raises(ValueError, match=r"knn must be None or an integer in \[1, V-1\]"):
        WassersteinRegularizer(embeddings, top_k=2, knn=10)
    with pytest.raises(ValueError, match=r"floating-point \(V, d\)"):
        WassersteinRegularizer(torch.zeros(10, dtype=torch.long), top_k=2)
    with pytest.raises(ValueError, match="embeddings"):
        build_regularizer("wasserstein")
    with pytest.raises(ValueError, match="transport must be one of"):
        WassersteinRegularizer(embeddings, top_k=2, transport="partial")
    with pytest.raises(ValueError, match="debias=True needs transport='full'"):
        WassersteinRegularizer(embeddings, top_k=2, debias=True)
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="newton_steps must be an integer >= 0"):
            WassersteinRegularizer(embeddings, top_k=2, newton_steps=bad)
    for bad in (-0.1, math.inf, "auto", True):
        with pytest.raises(ValueError, match="smooth_tau must be None or a finite number >= 0"):
            WassersteinRegularizer(embeddings, top_k=2, smooth_tau=bad)
    problem = build_problem(torch.randn(1, 10), torch.randn(1, 10), torch.tensor([0]), embeddings, top_k=2)
    with pytest.raises(ValueError, match="transport='smooth' needs tau"):
        solve_problem(problem, 100.0, transport="smooth")
    assert default_smooth_tau(embeddings[:1]) == 0.0

    reg = WassersteinRegularizer(embeddings, top_k=2, dust_cost=0.5)
    logits = torch.randn(2, 3, 12)
    with pytest.raises(
        ValueError, match="vocabulary mismatch: the embedding matrix has 10 rows but the logits have 12"
    ):
        reg.penalty(logits, logits, torch.zeros(2, 3, dtype=torch.long))
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="integer tensor"):
        reg.penalty(logits, logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B, T\) = \(2, 3\)"):
        reg.penalty(logits, logits, torch.zeros(3, 2, dtype=torch.long))
    assert torch.isfinite(reg.penalty(logits, logits, torch.zeros(2, 3, dtype=torch.long)).per_token).all()


def test_an_atom_with_equal_masses_gets_the_midpoint_of_its_c_transforms():
    """At a kink of the difference form (a_t = b_t > 0: the atom is neither excess nor deficit) phi_t is the
    midpoint (u_t - v_t)/2 of the soft c-transforms of POT's block potentials, u_t over the deficit atoms and
    v_t over the excess atoms; the other atoms keep POT's potentials."""
    import dataclasses

    lam = 10.0
    policy, ref, actions, embeddings = _problem_inputs(n=1, vocab=30)
    problem = build_problem(policy, ref, actions, embeddings, top_k=5)
    a, b = problem.a.clone(), problem.b.clone()
    held = np.flatnonzero(a[0].numpy() > 0)
    tie, other = int(held[1]), int(held[2])
    b[0, other] += b[0, tie] - a[0, tie]
    b[0, tie] = a[0, tie]
    assert float(b[0, other]) > 0 and int((a[0] == b[0]).sum()) == 1 + int((a[0] == 0).sum())
    problem = dataclasses.replace(problem, b=b)
    solution = solve_problem(problem, lam, tol=1e-12, max_iter=20000)

    a_np, b_np, cost = a[0].numpy(), b[0].numpy(), problem.cost[0].numpy()
    excess, deficit = np.flatnonzero(a_np > b_np), np.flatnonzero(b_np > a_np)
    moved = (a_np - b_np)[excess].sum()
    alpha, beta = (a_np - b_np)[excess] / moved, (b_np - a_np)[deficit] / moved
    block = cost[np.ix_(excess, deficit)]
    plan, log = ot.bregman.sinkhorn_log(alpha, beta, block, 1 / lam, numItermax=20000, stopThr=1e-14, log=True)
    u_tie = -np.log(np.exp(log["log_v"] - lam * cost[tie, deficit]).sum()) / lam
    v_tie = -np.log(np.exp(log["log_u"] - lam * cost[excess, tie]).sum()) / lam
    phi = np.zeros_like(a_np)
    phi[excess] = (log["log_u"] - np.log(alpha)) / lam
    phi[deficit] = -(log["log_v"] - np.log(beta)) / lam
    phi[tie] = 0.5 * (u_tie - v_tie)
    value = moved * ((plan * block).sum() + (plan * np.log(plan / np.outer(alpha, beta))).sum() / lam)
    phi[held] += value - a_np[held] @ phi[held]
    assert float(solution.value[0]) == pytest.approx(value, abs=1e-10)
    np.testing.assert_allclose(solution.potential[0].numpy()[held], phi[held], atol=1e-8)
