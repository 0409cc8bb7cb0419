"""otalign's GRPOTrainer against TRL 1.16's GRPOTrainer run on the same completions: advantages, micro-batch
losses, gradients and learning rates of every optimizer step (and the weights at the end) equal to 1e-5 relative,
for every ``loss_type``, beta 0 and > 0 with and without ``use_bias_correction_kl``, ``num_iterations`` 1 and 2,
``gradient_accumulation_steps`` 1 and 2, under a linear schedule."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from critic_free import Settings, compare, run_otalign, run_trl  # noqa: E402
from parity import Case, params  # noqa: E402

SHARED = (
    "GRPOConfig.num_generations",
    "GRPOConfig.temperature",
    "GRPOConfig.epsilon",
    "GRPOConfig.scale_rewards=group",
    "GRPOConfig.max_completion_length",
    "GRPO advantages",
    "TrainingArguments.per_device_train_batch_size",
    "TrainingArguments.learning_rate",
    "TrainingArguments.lr_scheduler_type=linear",
    "TrainingArguments.max_grad_norm",
    "TrainingArguments.adam_beta2",
)


def grpo_cases() -> list[Case]:
    cases = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for accumulation in (1, 2):
            for iterations in (1, 2):
                cases.append(
                    Case(
                        f"{loss_type}-ga{accumulation}-it{iterations}",
                        dict(
                            loss_type=loss_type,
                            gradient_accumulation_steps=accumulation,
                            num_iterations=iterations,
                            per_device_train_batch_size=4 // accumulation,
                        ),
                        (
                            *SHARED,
                            f"GRPOConfig.loss_type={loss_type}",
                            "TrainingArguments.gradient_accumulation_steps",
                            "GRPOConfig.num_iterations",
                            "learning rate per optimizer step",
                        ),
                    )
                )
    for bias_correction in (True, False):
        for loss_type in ("grpo", "dapo"):
            cases.append(
                Case(
                    f"{loss_type}-beta-bias{int(bias_correction)}-ga2-it2",
                    dict(
                        loss_type=loss_type,
                        beta=0.2,
                        use_bias_correction_kl=bias_correction,
                        gradient_accumulation_steps=2,
                        per_device_train_batch_size=2,
                        num_iterations=2,
                    ),
                    (
                        *SHARED,
                        f"GRPOConfig.loss_type={loss_type}",
                        "GRPOConfig.beta",
                        f"GRPOConfig.use_bias_correction_kl={bias_correction}",
                        "GRPO k3 KL term",
                    ),
                )
            )
    return cases


CASES = grpo_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_grpo_equals_trl(tmp_path, case):
    settings = Settings(algorithm="grpo", **case.settings)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs = run_trl(tmp_path / "theirs", settings, rollouts, groups, micro_batches)
    compare(ours, theirs)
