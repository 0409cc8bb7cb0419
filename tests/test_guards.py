"""Guard rails on tiny random models: a non-finite loss, gradient, reward or logit stops a run at its step (exit 2,
last checkpoint intact and loadable, no model written) or, with ``on_nonfinite skip``, skips and counts the step;
NaN/inf settings are rejected up front; unconverged Sinkhorn solves are counted, warned about once, or fatal."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch

from otalign.cli import main
from otalign.config import Config
from otalign.eval.policy import ot_values
from otalign.generation import SamplingParams, generate
from otalign.losses import build_preference_loss
from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.regularizers import WassersteinRegularizer
from otalign.trainers import (
    ConfigError,
    ConvergenceError,
    ConvergenceWarning,
    GRPOConfig,
    GRPOTrainer,
    MetricsLogger,
    NonFiniteError,
    PPOConfig,
    PreferenceConfig,
    PreferenceTrainer,
    list_checkpoints,
    read_metrics,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = ["write one sentence about the cat .", "tell you about my day .", "describe the city .", "what is it ?"]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class NaNOnCall:
    """A DPO (sigmoid) loss that is NaN on its ``k``-th call (1-based), keeping the graph so the gradient is NaN too;
    ``before`` holds the trainer's policy weights at that call (set ``trainer`` first)."""

    paired, needs_kl = True, False

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.trainer, self.before = k, 0, None, None
        self.inner = build_preference_loss("sigmoid", beta=0.1)

    def __call__(self, *logps):
        self.calls += 1
        out = self.inner(*logps)
        if self.calls == self.k:
            self.before = weights(self.trainer.policy)
            out.loss = out.loss * float("nan")
        return out


def dpo(tmp_path, loss, **overrides) -> PreferenceTrainer:
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        dataset_name=str(FIXTURES / "preference_pairs.jsonl"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        progress_bar=False,
        save_steps=1,
    )
    settings.update(overrides)
    trainer = PreferenceTrainer(
        PreferenceConfig(**settings),
        policy=tiny_causal_lm(tokenizer, seed=0),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        loss=loss,
    )
    loss.trainer = trainer
    return trainer


def grpo(tmp_path, reward, *, policy=None, **overrides) -> GRPOTrainer:
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        num_generations=2,
        response_length=4,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
        wpr_top_k=8,
        reward_fn=["sentiment"],
    )
    settings.update(overrides)
    return GRPOTrainer(
        GRPOConfig(**settings),
        policy=policy if policy is not None else tiny_causal_lm(tokenizer, seed=1),
        ref_model=tiny_causal_lm(tokenizer, seed=0),
        tokenizer=tokenizer,
        reward=reward,
        prompts=PROMPTS,
    )


class FlakyReward:
    """Response length / 10, NaN for the first response of call ``k``; ``policies`` holds the policy weights at
    each call (set ``trainer`` first)."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.trainer, self.policies = k, 0, None, []
        self.__name__ = "flaky"

    def __call__(self, prompts, responses):
        self.calls += 1
        self.policies.append(weights(self.trainer.policy))
        return [math.nan if self.calls == self.k and i == 0 else len(r) / 10 for i, r in enumerate(responses)]


# ---------------------------------------------------------------------------------------------------- settings


def test_nan_and_inf_settings_are_rejected_when_the_config_is_built():
    for value in (math.nan, math.inf):
        with pytest.raises(ConfigError, match=f"beta must be a finite number, got {value}"):
            PPOConfig(beta=value)
        with pytest.raises(ConfigError, match=f"beta must be a finite number, got {value}"):
            PreferenceConfig(beta=value)
    with pytest.raises(ConfigError, match="missing_eos_penalty must be a finite number, got nan"):
        PPOConfig(missing_eos_penalty=math.nan)  # a float field without a check
    with pytest.raises(ConfigError, match=r"reward_weights must be a finite number, got inf"):
        PPOConfig(reward_weights=[1.0, math.inf])
    with pytest.raises(ConfigError, match="unknown on_nonfinite 'ignore'"):
        PPOConfig(on_nonfinite="ignore")


def test_a_field_that_allows_inf_takes_inf_but_not_nan():
    @dataclasses.dataclass
    class Limits(Config):
        limit: float = dataclasses.field(default=1.0, metadata={"check": "> 0", "allow_inf": True})

    assert Limits(limit=math.inf).limit == math.inf
    with pytest.raises(ConfigError, match="limit must be a finite number, got nan"):
        Limits(limit=math.nan)
    with pytest.raises(ConfigError, match="limit must be > 0, got -inf"):
        Limits(limit=-math.inf)


def test_command_line_rejects_beta_nan_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["dpo", "--beta", "nan", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", "missing"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "otalign dpo: error: --beta must be a finite number, got nan"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("command", ["sft", "dpo", "reward", "ppo"])
def test_learning_rate_too_high_stops_at_step_two_with_checkpoint_one_intact(tmp_path, capsys, command):
    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    data = {"sft": "sft_pairs.jsonl", "dpo": "preference_pairs.jsonl", "reward": "preference_pairs.jsonl"}
    argv = [command, "--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "4"]
    argv += ["--save_steps", "1", "--per_device_train_batch_size", "4", "--progress_bar", "false"]
    argv += ["--dataset_name", str(FIXTURES / data[command])] if command in data else ["--response_length", "4"]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--learning_rate", "1e8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"otalign {command}: error: step 2: the ")
    assert "is NaN (learning_rate 1e+08 is likely too high)" in err or "is infinite (learning_rate 1e+08" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "model").exists()
    assert [row["step"] for row in read_metrics(out)] == [1]
    # the checkpoint of step 1 loads: resuming it with max_steps 1 runs nothing and exits cleanly
    assert main([*argv, "--resume", "--max_steps", "1", "--save_model", "false"]) == 0
    assert [row["step"] for row in read_metrics(out)] == [1]


def test_nan_loss_stops_the_preference_run_before_the_update(tmp_path):
    loss = NaNOnCall(2)
    trainer = dpo(tmp_path, loss)
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss is NaN \(learning_rate 0.003 is likely too high\)"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "model").exists()
    assert same_weights(weights(trainer.policy), loss.before)  # the NaN gradient was never applied
    resumed = dpo(tmp_path, NaNOnCall(0), max_steps=1, resume=True, save_model=False)
    resumed.train()
    assert resumed.state.global_step == 1 and same_weights(weights(resumed.policy), loss.before)


def test_on_nonfinite_skip_skips_and_counts_the_step(tmp_path):
    loss = NaNOnCall(2)
    trainer = dpo(tmp_path, loss, on_nonfinite="skip", max_steps=2, save_steps=0, save_model=True)
    with pytest.warns(RuntimeWarning, match="metrics.jsonl: loss is nan at step 2, written as null"):
        trainer.train()
    assert same_weights(weights(trainer.policy), loss.before)  # step 2 changed nothing
    rows = read_metrics(tmp_path)
    assert [row["nonfinite/skipped_steps"] for row in rows] == [0, 1]
    assert rows[0]["loss"] is not None and rows[1]["loss"] is None
    assert trainer.state.skipped_steps == 1 and (tmp_path / "model" / "config.json").is_file()


def test_nan_reward_stops_an_rl_run_at_its_step(tmp_path):
    reward = FlakyReward(2)
    trainer = grpo(tmp_path, reward, save_steps=1, save_model=True)
    reward.trainer = trainer
    with pytest.raises(NonFiniteError, match=r"^step 2: the score of reward 'flaky' is NaN \(.*prompt rows \[\d\]\)"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "model").exists()
    assert same_weights(weights(trainer.policy), reward.policies[1])


def test_nan_reward_with_skip_skips_the_rl_update_and_goes_on(tmp_path):
    reward = FlakyReward(2)
    trainer = grpo(tmp_path, reward, on_nonfinite="skip")
    reward.trainer = trainer
    with pytest.warns(RuntimeWarning, match="reward/mean is nan at step 2"):
        trainer.train()
    per_step = trainer.num_epochs * trainer.config.num_mini_batches
    rows = read_metrics(tmp_path)
    assert [row["nonfinite/skipped_steps"] for row in rows] == [0, per_step, per_step]
    assert "loss/policy" in rows[0] and "loss/policy" not in rows[1] and "loss/policy" in rows[2]
    assert same_weights(reward.policies[1], reward.policies[2])  # step 2 did not move the policy
    assert not same_weights(reward.policies[0], reward.policies[1])  # step 1 did


def test_nonfinite_logits_stop_sampling_even_with_skip(tmp_path):
    tokenizer = tiny_tokenizer()
    broken = tiny_causal_lm(tokenizer, seed=1)
    with torch.no_grad():
        broken.get_output_embeddings().weight[3] = math.nan
    with pytest.raises(NonFiniteError, match="logits at sampling are NaN"):
        generate(broken, tokenizer, [[5, 6]], ["p"], [0], SamplingParams(max_new_tokens=3))
    trainer = grpo(tmp_path, FlakyReward(0), policy=broken, on_nonfinite="skip", save_steps=1)
    with pytest.raises(NonFiniteError, match=r"^step 1: the policy's next-token logits at sampling are NaN.*no update"):
        trainer.train()
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


class TwoProcesses:
    """A stand-in accelerator of process 0 of 2 whose peer watched ``peer`` codes: ``reduce`` takes the max."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, peer: list[int]) -> None:
        self.peer = torch.tensor(peer)

    def reduce(self, codes, reduction):
        assert reduction == "max"
        return torch.maximum(codes, self.peer)


def test_the_guard_decides_alike_on_every_process():
    from otalign.guard import FiniteGuard

    for mode in ("error", "skip"):
        guard = FiniteGuard(TwoProcesses([0, 2]), mode)  # this process is finite, its peer's gradient norm is NaN
        guard.watch("the loss", torch.tensor(1.0), "a")
        guard.watch("the gradient norm", torch.tensor(2.0), "lr too high")
        if mode == "error":
            with pytest.raises(NonFiniteError, match=r"^step 5: the gradient norm is NaN \(lr too high\)"):
                guard.passes(5)
        else:
            assert guard.passes(5) is False
        guard.watch("the loss", torch.tensor(1.0), "a")
        guard.watch("the gradient norm", torch.tensor(2.0), "b")
        guard.accelerator.peer = torch.tensor([0, 0])
        assert guard.passes(6) is True  # the record was cleared


def test_metrics_logger_warns_once_per_metric_written_as_null(tmp_path):
    logger = MetricsLogger(type("Acc", (), {"is_main_process": True, "trackers": []})(), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            logger.log({"a": math.nan, "b": 1.0, "c": math.inf if step == 2 else 0.0}, step)
    assert [str(w.message).split(",")[0] for w in caught] == [
        "metrics.jsonl: a is nan at step 1",
        "metrics.jsonl: c is inf at step 2",
    ]
    assert [row["a"] for row in read_metrics(tmp_path)] == [None, None]


# ---------------------------------------------------------------------------------------------------- Sinkhorn


def wasserstein_run(tmp_path, **overrides):
    settings = dict(regularizer="wasserstein", max_steps=2, wpr_lambda=1e6, wpr_max_iter=3, wpr_newton_steps=0)
    return grpo(tmp_path, lambda p, r: [len(x) / 10 for x in r], **{**settings, **overrides})


def test_unconverged_sinkhorn_is_counted_and_warned_about_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = wasserstein_run(tmp_path).train()
    found = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(found) == 1
    assert str(found[0].message).startswith(
        "step 1: Sinkhorn stopped at wpr_max_iter=3 above wpr_tol=1e-07, and wpr_newton_steps=0 Newton steps did not "
    )
    assert "wpr_lambda=1e+06" in str(found[0].message)
    assert all(0 < row["sinkhorn/unconverged_frac"] <= 1 for row in history)
    assert [row["sinkhorn/unconverged_frac"] for row in read_metrics(tmp_path)] == [
        pytest.approx(row["sinkhorn/unconverged_frac"]) for row in history
    ]


def test_converged_sinkhorn_reports_zero_and_no_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = wasserstein_run(tmp_path, wpr_lambda=10.0, wpr_max_iter=1000, max_steps=1).train()
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert history[0]["sinkhorn/unconverged_frac"] == 0.0


def test_wpr_strict_makes_an_unconverged_solve_an_error_before_the_update(tmp_path):
    trainer = wasserstein_run(tmp_path, wpr_strict=True, save_steps=1)
    before = weights(trainer.policy)
    with pytest.raises(ConvergenceError, match=r"^step 1: Sinkhorn stopped at wpr_max_iter=3 above wpr_tol"):
        trainer.train()
    assert same_weights(weights(trainer.policy), before) and list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("transport", ["full", "smooth"])
@pytest.mark.parametrize("strict", [False, True])
def test_the_convergence_report_names_only_the_options_of_its_transport(transport, strict):
    """The full transport runs no Newton steps, so its report never suggests wpr_newton_steps; the warning names
    --wpr_strict (what stops the run instead) and the error says it stopped it."""
    from otalign.trainers import PPOConfig
    from otalign.trainers.rl_metrics import report_convergence

    config = PPOConfig(regularizer="wasserstein", wpr_transport=transport, wpr_strict=strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report_convergence(4, {"sinkhorn/unconverged_frac": 0.25}, config, first=True, warn=True)
            message = str(caught[0].message)
        except ConvergenceError as err:
            message = str(err)
    assert message.startswith("step 4: Sinkhorn stopped at wpr_max_iter=")
    assert ("wpr_newton_steps" in message) == (transport != "full")
    assert message.endswith("(stopped by --wpr_strict)") if strict else "--wpr_strict true stops the run" in message


def test_ot_values_warn_about_unconverged_positions():
    generator = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(6, 12, generator=generator), torch.randn(6, 12, generator=generator)
    actions = torch.randint(0, 12, (6,), generator=generator)
    embeddings = torch.randn(12, 4, generator=generator)
    loose = WassersteinRegularizer(embeddings, lam=1e6, top_k=4, max_iter=3, newton_steps=0)
    with pytest.warns(
        ConvergenceWarning, match=r"max_iter=3 above tol=1e-07, and newton_steps=0 .* at [1-6] of 6 positions"
    ):
        ot_values(loose, policy, ref, actions)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        values = ot_values(WassersteinRegularizer(embeddings, lam=1.0, top_k=4), policy, ref, actions)
    assert torch.isfinite(values).all()


def test_both_ot_results_have_per_problem_convergence_and_one_potential_convention():
    from otalign.ot import sinkhorn, unbalanced_sinkhorn

    a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    b = torch.tensor([[0.3, 0.3, 0.4], [0.6, 0.2, 0.2]])
    cost = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = 0.01
    for solve in (sinkhorn, lambda *args, **kw: unbalanced_sinkhorn(*args, rho=1.0, **kw)):
        loose, tight = solve(a, b, cost, eps, max_iter=1, tol=1e-12), solve(a, b, cost, 1.0, max_iter=5000, tol=1e-5)
        assert loose.converged.dtype == torch.bool and loose.converged.tolist() == [False, False]
        assert tight.converged.tolist() == [True, True] and tight.iters.shape == (2,)
        held = a > 0
        torch.testing.assert_close(loose.f[held], (loose.u + eps * a.log())[held])
        torch.testing.assert_close(loose.g, loose.v + eps * b.log())
        assert torch.isneginf(loose.f[~held]).all() and torch.isfinite(loose.u).all()


@pytest.mark.multiprocess
def test_two_processes_stop_or_skip_together(tmp_path, two_process_cli):
    """Under a 2-process launch both processes stop at the same step with the same line (and the launch fails; once
    one process exits the launcher terminates the other, which may not have printed yet), or both skip and count the
    same steps (a disagreement would hang the next gradient all-reduce)."""
    model = save_tiny_model(tmp_path / "tiny")
    argv = ["sft", f"--model_name_or_path={model}", f"--dataset_name={FIXTURES / 'sft_pairs.jsonl'}"]
    argv += ["--max_steps=3", "--learning_rate=1e8", "--per_device_train_batch_size=2", "--progress_bar=false"]
    done = two_process_cli([*argv, f"--output_dir={tmp_path / 'error'}", "--save_steps=1"], check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("otalign sft: error:")]
    # Each process that gets to print says the same; the launcher may stop the second one before it prints.
    assert len(lines) in (1, 2) and len(set(lines)) == 1 and "step 2: the gradient norm is NaN" in lines[0]
    assert [p.name for p in list_checkpoints(tmp_path / "error")] == ["checkpoint-1"]
    assert not (tmp_path / "error" / "model").exists()
    two_process_cli([*argv, f"--output_dir={tmp_path / 'skip'}", "--on_nonfinite=skip", "--save_model=false"])
    assert [row["nonfinite/skipped_steps"] for row in read_metrics(tmp_path / "skip")] == [0, 1, 2]
