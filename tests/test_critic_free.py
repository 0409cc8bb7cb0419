"""GRPO and RLOO on tiny random models: advantage math, every regularizer family in the reward or the loss, the
adaptive beta, resume, bad input."""

from __future__ import annotations

import types

import pytest
import torch
from test_ppo import good_share

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.trainers import (
    BetaController,
    ConfigError,
    GRPOConfig,
    GRPOTrainer,
    PPOConfig,
    PPOTrainer,
    RLOOConfig,
    RLOOTrainer,
    read_metrics,
)
from otalign.trainers.critic_free import group_advantages, token_weights
from otalign.trainers.rollout_batch import RolloutBatch

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = [
    "write one sentence about the cat .",
    "tell you about my day .",
    "describe the city in the rain .",
    "what is your friend ?",
]
TRAINERS = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}


def characters(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that differs between the responses of a group from the start: characters / 20."""
    return [len(r) / 20 for r in responses]


def make(
    tmp_path,
    algorithm: str = "grpo",
    *,
    policy_seed: int = 0,
    reward=characters,
    prompts=PROMPTS,
    eval_prompts=None,
    **overrides,
):
    config_cls, trainer_cls = TRAINERS[algorithm]
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        response_length=5,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
        wpr_top_k=8,
        prompts="builtin",
        reward_fn=["sentiment"],
    )
    if algorithm != "ppo":
        settings["num_generations"] = 2
    settings.update(overrides)
    return trainer_cls(
        config_cls(**settings),
        policy=tiny_causal_lm(tokenizer, seed=policy_seed),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        reward=reward,
        prompts=prompts,
        eval_prompts=eval_prompts,
    )


def test_grpo_and_rloo_advantages_match_hand_computed_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 3, unbiased std sqrt(14/3); group 2: all equal
    grpo = group_advantages(rewards, 4, algorithm="grpo", scale=False)
    assert grpo.tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    scaled = group_advantages(rewards, 4, algorithm="grpo", scale=True)
    std = (14 / 3) ** 0.5
    assert scaled.tolist() == pytest.approx([x / (std + 1e-4) for x in (-2.0, -1.0, 0.0, 3.0)] + [0.0] * 4)
    rloo = group_advantages(rewards, 4, algorithm="rloo", scale=False)
    # 1 - mean(2, 3, 6) = -8/3; 2 - mean(1, 3, 6) = -4/3; 3 - 3 = 0; 6 - 2 = 4
    assert rloo.tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="groups of >= 2"):
        group_advantages(rewards, 3, algorithm="grpo", scale=False)


def test_loss_type_normalisations_match_hand_computed_values():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    token_mean = (1 + 2 + 3 + 4) / 4
    expected = {"grpo": ((1 + 2 + 3) / 3 + 4) / 2, "bnpo": token_mean, "dapo": token_mean, "dr_grpo": 10 / (2 * 4)}
    for loss_type, value in expected.items():
        weights, units = token_weights(mask, loss_type, max_length=4)
        assert float((weights * loss).sum() / units.sum()) == pytest.approx(value), loss_type
    with pytest.raises(ValueError, match="loss_type"):
        token_weights(mask, "seq", 4)


def trl_grpo_loss(per_token_loss, mask, loss_type, micro, *, accumulation, steps_per_generation, max_length):
    """TRL 1.16 ``GRPOTrainer._compute_loss``'s aggregation of one micro-batch (rows ``micro``, one process), as TRL
    writes it: the value whose gradient the optimizer step accumulates."""
    loss, m = per_token_loss[micro], mask[micro].float()
    if loss_type == "grpo":
        return ((loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (loss * m).sum() / m.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (loss * m).sum() / (loss.size(0) * max_length) / accumulation
    num_items_in_batch = mask.sum()  # the whole generation batch (gathered over processes)
    normalizer = num_items_in_batch.clamp(min=1.0) * accumulation / steps_per_generation
    return (loss * m).sum() / normalizer


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_each_loss_type_aggregates_an_optimizer_step_as_trl(loss_type):
    """Two mini-batches of two micro-batches of two responses of different lengths: the summed micro-batch losses of
    each optimizer step equal TRL's (``steps_per_generation`` 4 = 2 optimizer steps per generation)."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]] * 2).bool()
    mask[5:, 3:] = False  # the second mini-batch shorter than the first
    per_token_loss = torch.arange(40, dtype=torch.float32).reshape(8, 5).sqrt()
    trainer = GRPOTrainer.__new__(GRPOTrainer)  # normalizers need only the config and the process count
    trainer.config = GRPOConfig(
        loss_type=loss_type,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_generations=2,
        response_length=5,
    )
    trainer.accelerator = types.SimpleNamespace(num_processes=1)
    weights, units = token_weights(mask, loss_type, max_length=5)
    batch = RolloutBatch(None, torch.zeros(8), units, weights)
    for minibatch in torch.arange(8).chunk(2):
        micro = minibatch.chunk(2)
        ours = sum(
            (weights[rows] * per_token_loss[rows]).sum() / z
            for rows, z in zip(micro, trainer.normalizers(batch, micro), strict=True)
        )
        trl = sum(
            trl_grpo_loss(per_token_loss, mask, loss_type, rows, accumulation=2, steps_per_generation=4, max_length=5)
            for rows in micro
        )
        assert float(ours) == pytest.approx(float(trl), rel=1e-6)
        token_mean = float((per_token_loss[minibatch] * mask[minibatch]).sum() / mask[minibatch].sum())
        if loss_type == "bnpo":  # TRL's bnpo is not the mini-batch's token mean (otalign's bnpo before it was TRL's)
            assert float(ours) != pytest.approx(token_mean, rel=1e-3)
        if loss_type == "dapo":  # TRL's dapo is not either, with two mini-batches of different token counts
            assert float(ours) != pytest.approx(token_mean, rel=1e-3)


def test_use_bias_correction_kl_changes_the_update_not_the_loss_value(tmp_path):
    """The k3 term's ratio is 1 at the rollout policy: the first step's losses are equal with and without it; its
    gradient differs, so the second step's are not."""
    settings = dict(regularizer="rkl", penalty_in="loss", beta=0.5, policy_seed=1, learning_rate=1e-2)
    corrected = make(tmp_path / "a", **settings).train()
    plain = make(tmp_path / "b", use_bias_correction_kl=False, **settings).train()
    assert corrected[0]["loss/penalty"] == pytest.approx(plain[0]["loss/penalty"], rel=1e-6)
    assert corrected[0]["loss/penalty"] > 0  # policy seed 1 against reference seed 0
    assert corrected[1]["loss/penalty"] != pytest.approx(plain[1]["loss/penalty"], rel=1e-4)


def test_rloo_sequence_objective_is_trls():
    """TRL 1.16 ``RLOOTrainer._compute_loss``: ratio exp(sum logp - sum old) per response, -min(ratio A, clip(ratio) A)
    averaged over the responses; value and gradient, with ratios inside and outside the clip range."""
    from otalign.trainers import ppo_math as pm

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    old = -torch.arange(1, 17, dtype=torch.float32).reshape(4, 4).sqrt()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    for shift in (0.0, 0.05, -0.3):  # ratio 1, mostly inside, outside the clip range
        moved = old + shift * torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None]
        ours_in = moved.clone().requires_grad_(True)
        loss, stats = pm.sequence_policy_loss(ours_in, old, advantages, mask, cliprange=0.2, normalizer=4.0)
        loss.backward()
        trl_in = moved.clone().requires_grad_(True)
        logps, old_logps = (trl_in * mask).sum(1), (old * mask).sum(1)
        coef_1 = torch.exp(logps - old_logps)
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.2)
        trl = -torch.min(coef_1 * advantages, coef_2 * advantages)
        trl.mean().backward()
        # float32: the sum of differences (ours) against the difference of sums (TRL's)
        assert float(loss.detach()) == pytest.approx(float(trl.mean().detach()), rel=1e-5)
        assert torch.allclose(ours_in.grad, trl_in.grad, rtol=1e-5, atol=1e-7)
        clipped = (coef_1 < 0.8) & (advantages < 0) | (coef_1 > 1.2) & (advantages > 0)
        assert float(stats["policy/clipfrac"]) == float((clipped * mask.sum(1)).sum())
    assert float(stats["policy/clipfrac"]) > 0  # the last shift clips


def test_rloo_normalize_advantages_standardises_over_the_rollout_as_trl(tmp_path):
    trainer = make(tmp_path, "rloo", normalize_advantages=True, max_steps=1, per_device_train_batch_size=8)
    captured = []
    advantages = trainer.advantages
    trainer.advantages = lambda scored: captured.append((scored, advantages(scored))) or captured[-1][1]
    trainer.train()
    scored, batch = captured[0]
    a = group_advantages(trainer.sequence_rewards(scored), 2, algorithm="rloo", scale=False)
    expected = (a - a.mean()) / (a.std() + 1e-4)  # TRL: (A - nanmean(A)) / (nanstd(A) + 1e-4), std unbiased
    assert batch.advantages.tolist() == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert float(a.std()) > 0.1 and float(batch.advantages.std()) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("loss_type", ["sequence", "dapo"])
def test_rloo_trains_with_either_objective_and_the_penalty_in_the_loss(tmp_path, loss_type):
    trainer = make(tmp_path, "rloo", loss_type=loss_type, penalty_in="loss", regularizer="wasserstein", beta=0.5)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert history[1]["loss/penalty"] > 0 and all(v == v for v in history[1].values())
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.params, strict=True))
    with pytest.raises(ConfigError, match="loss_type"):
        GRPOConfig(loss_type="sequence")  # TRL's GRPO has no such loss


@pytest.mark.parametrize("penalty_in", ["reward", "loss"])
@pytest.mark.parametrize("regularizer", ["kl", "js", "wasserstein"])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_two_steps_per_trainer_regularizer_and_penalty_placement(tmp_path, algorithm, regularizer, penalty_in):
    trainer = make(tmp_path, algorithm, regularizer=regularizer, penalty_in=penalty_in, beta=0.5, num_mini_batches=2)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    for metrics in history:
        assert all(v == v for k, v in metrics.items() if k != "value/explained_variance"), metrics  # no NaN
        assert metrics["beta"] == 0.5 and "reward/characters" in metrics and "regularizer/distance" in metrics
    assert history[0]["kl/exact"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first rollout
    assert history[1]["kl/exact"] > 0
    if penalty_in == "loss":
        assert history[1]["loss/penalty"] > 0  # the distance term is in the loss once the policy moved
    else:
        assert history[1]["loss/penalty"] == 0
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.params, strict=True))


@pytest.mark.parametrize("regularizer", ["fkl", "wasserstein"])
def test_surrogate_potentials_from_the_current_policy(tmp_path, regularizer):
    trainer = make(tmp_path, regularizer=regularizer, loss_potentials="current", beta=0.5, num_iterations=3)
    history = trainer.train()
    assert history[1]["loss/penalty"] > 0 and all(v == v for v in history[1].values())


def test_multiple_reward_functions_are_weighted_and_logged_by_name(tmp_path):
    def length(prompts, responses):
        return [float(len(r.split())) for r in responses]

    trainer = make(tmp_path, reward=[good_share, length], reward_weights=[2.0, -0.5], max_steps=1)
    (metrics,) = trainer.train()
    expected = 2.0 * metrics["reward/good_share"] - 0.5 * metrics["reward/length"]
    assert metrics["reward/mean"] == pytest.approx(expected, abs=1e-6)


def test_data_dependent_reward_sees_the_prompt_rows_columns(tmp_path):
    seen = []

    def exact(prompts, responses, answer):
        seen.extend(zip(prompts, answer, strict=True))
        return [float(r.strip() == a) for r, a in zip(responses, answer, strict=True)]

    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)]
    make(tmp_path, reward=exact, prompts=rows, max_steps=1).train()
    assert len(seen) == 4 and len({a for _, a in seen}) == 2  # two prompts, each answered twice
    by_answer = {a: p for p, a in seen}
    for answer, prompt in by_answer.items():
        assert PROMPTS[int(answer)] in prompt  # each response is scored against its own row's answer


def test_beta_controller_update_rule():
    controller = BetaController(0.1, target=2.0, horizon=100.0)
    assert controller.update(3.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped to +0.2
    assert controller.update(1.8, 10) == pytest.approx(0.102 * (1 - 0.1 * 10 / 100))
    fixed = BetaController(0.1)
    assert fixed.update(100.0, 10) == 0.1
    controller.load_state_dict(fixed.state_dict())
    assert controller.value == 0.1


def test_adaptive_beta_holds_the_distance_near_its_target_where_a_fixed_beta_overshoots(tmp_path):
    # PPO, KL in the reward, a reward ("good" share) that pulls the tiny policy ever further from the reference
    common = dict(per_device_train_batch_size=8, learning_rate=3e-3, regularizer="kl", penalty_in="reward", beta=0.05)
    common.update(response_length=4, prompts=PROMPTS, reward=good_share)
    target = 0.03
    fixed = make(tmp_path / "fixed", "ppo", max_steps=40, **common).train()
    adaptive = make(tmp_path / "adaptive", "ppo", max_steps=70, beta_target=target, beta_horizon=8.0, **common).train()
    overshoot = [row["regularizer/distance"] for row in fixed[-10:]]
    steered = [row["regularizer/distance"] for row in adaptive[-10:]]
    assert min(overshoot) > 1.5 * target, overshoot  # a fixed beta lets the KL run away
    assert all(abs(d - target) < 0.25 * target for d in steered), steered  # the controller holds it within 25%
    assert abs(sum(steered) / len(steered) - target) < 0.15 * target, steered
    assert max(row["beta"] for row in adaptive) > 10 * adaptive[0]["beta"]  # it took a 10x beta to pull it back


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, assert_resume_matches):
    settings = dict(max_steps=4, save_steps=2, regularizer="wasserstein", beta_target=0.01, beta_horizon=20.0)
    make(tmp_path / "full", save_total_limit=None, **settings).train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    make(tmp_path / "resumed", policy_seed=5, resume_from_checkpoint=str(checkpoint), **settings).train()
    assert_resume_matches(tmp_path / "full", tmp_path / "resumed", [3, 4])
    assert read_metrics(tmp_path / "full")[2]["beta"] != read_metrics(tmp_path / "full")[0]["beta"]


def test_bad_input_fails_with_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="divisible by num_generations=3"):
        GRPOConfig(num_generations=3, per_device_train_batch_size=8)
    with pytest.raises(ConfigError, match="beta_target must be > 0, got 0.0"):
        RLOOConfig(beta_target=0.0)
    with pytest.raises(ConfigError, match="unknown reward_fn 'nope'; choose one of"):
        GRPOConfig(reward_fn="arithmetic,nope")
    with pytest.raises(ValueError, match=r"reward_weights has 1 entries for 2 reward function\(s\)"):
        make(tmp_path, reward=[good_share, characters], reward_weights=[1.0])

    def nan_on_row_two(prompts, responses):
        return [float("nan") if i == 2 else 0.0 for i in range(len(responses))]

    with pytest.raises(ValueError, match=r"step 1: the score of reward 'nan_on_row_two' is NaN .*prompt rows \[\d+\]"):
        make(tmp_path, reward=nan_on_row_two).train()
    with pytest.raises(ValueError, match="returned 1 scores for 4 responses"):
        make(tmp_path, reward=lambda p, r: [0.0]).train()


def test_command_line_runs_grpo_and_rloo_on_a_saved_tiny_model(tmp_path):
    from otalign.cli import main
    from otalign.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}", "answer": "good"}}\n' for p in PROMPTS))
    for command in ("grpo", "rloo"):
        out = tmp_path / command
        args = [command, "--model_name_or_path", model, "--output_dir", str(out), "--prompts", str(prompts)]
        args += ["--reward_fn", "arithmetic,sentiment", "--reward_weights", "1,0.5", "--max_steps", "1"]
        args += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--response_length", "3"]
        args += ["--progress_bar", "false", "--save_model", "false"]
        assert main(args) == 0
        (row,) = read_metrics(out)
        assert {"reward/arithmetic", "reward/sentiment", "beta"} <= set(row)


def test_a_grpo_loss_gradient_is_the_smoothed_distances_finite_difference(tmp_path):
    """GRPO with the penalty in the loss and the default transport (``smooth``): with zero advantages (a constant
    reward) the step's loss is beta x the surrogate, and its gradient with respect to the policy's weights, along a
    random direction, equals the central finite difference of beta sum_t w_t h_tau(W_t) / Z computed in float64
    from the models themselves (W_t the entropic distance at each generated position, w and Z the loss_type's
    weights and normalizer): the scoring pass, the potentials, the weights and the normaliser all agree."""
    import copy

    from otalign.generation import response_logits
    from otalign.regularizers import WassersteinRegularizer

    trainer = make(
        tmp_path,
        policy_seed=1,
        reward=lambda prompts, responses: [1.0] * len(responses),
        regularizer="wasserstein",
        penalty_in="loss",
        beta=0.5,
        max_steps=1,
        wpr_tol=1e-6,
        wpr_max_iter=20_000,
    )
    reg = trainer.regularizer
    assert reg.transport == "smooth"  # the default GRPO runs with penalty_in: loss
    exact = WassersteinRegularizer(
        reg.embeddings.double(), lam=reg.lam, top_k=reg.top_k, smooth_tau=reg.tau, tol=1e-12, max_iter=200_000
    )
    temperature, checked = trainer.config.temperature, []
    original_loss = trainer.loss

    def loss(batch, rows, normalizer):
        out = original_loss(batch, rows, normalizer)
        if checked:
            return out
        assert float(batch.advantages.abs().max()) == 0.0
        params = [p for p in trainer.policy.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out[0], params, retain_graph=True)
        direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        norm = sum(float((d * d).sum()) for d in direction) ** 0.5
        direction = [d / norm for d in direction]  # a unit step in weight space
        analytic = sum(float((g.double() * d).sum()) for g, d in zip(grads, direction, strict=True))
        rollout, mask, weights = batch.scored.rollout, batch.scored.mask[rows], batch.weights[rows].double()
        with torch.no_grad():
            ref_logits = response_logits(trainer.ref_model.double(), rollout, rows).double() / temperature
            trainer.ref_model.float()

            def distance(h: float) -> float:
                moved = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.policy)).double()
                for p, d in zip([p for p in moved.parameters() if p.requires_grad], direction, strict=True):
                    p.add_(h * d.double())
                logits = response_logits(moved, rollout, rows) / temperature
                value = exact.support_gradient(logits, ref_logits, rollout.responses[rows], mask).value
                per_position = torch.zeros(mask.shape, dtype=torch.float64)
                per_position[mask] = value
                return float(0.5 * (per_position * weights).sum() / normalizer)

            h = 1e-3  # a unit direction: 1e-2 is past the quadratic zone, 1e-5 is rounding (measured)
            numeric = (distance(h) - distance(-h)) / (2 * h)
        checked.append((analytic, numeric))
        return out

    trainer.loss = loss
    trainer.train()
    (analytic, numeric), *_ = checked
    assert abs(numeric) > 1e-4  # the policy (seed 1) is away from the reference (seed 0): a real gradient
    assert analytic == pytest.approx(numeric, rel=2e-3)
