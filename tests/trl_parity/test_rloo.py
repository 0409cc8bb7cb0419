"""otalign's RLOOTrainer (``loss_type: sequence``, its default) against TRL 1.16's RLOOTrainer run on the same
completions: TRL's sequence-level objective, the first-order KL in the reward, leave-one-out advantages and
``normalize_advantages``; advantages, micro-batch losses, gradients and learning rates equal to 1e-5 relative."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from critic_free import Settings, compare, run_otalign, run_trl  # noqa: E402
from parity import Case, params  # noqa: E402

SHARED = (
    "RLOOConfig.num_generations",
    "RLOOConfig.temperature",
    "RLOOConfig.epsilon",
    "RLOO advantages",
    "RLOO objective",
    "TrainingArguments.learning_rate",
    "TrainingArguments.lr_scheduler_type=linear",
    "learning rate per optimizer step",
)


def rloo_cases() -> list[Case]:
    cases = []
    for beta in (0.0, 0.1):
        for normalize in (False, True):
            for accumulation, iterations in ((1, 1), (2, 2)):
                cases.append(
                    Case(
                        f"beta{beta}-norm{int(normalize)}-ga{accumulation}-it{iterations}",
                        dict(
                            algorithm="rloo",
                            loss_type="sequence",
                            beta=beta,
                            normalize_advantages=normalize,
                            scale_rewards=False,
                            gradient_accumulation_steps=accumulation,
                            num_iterations=iterations,
                            per_device_train_batch_size=4 // accumulation,
                        ),
                        (
                            *SHARED,
                            "RLOOConfig.beta",
                            f"RLOOConfig.normalize_advantages={normalize}",
                            "TrainingArguments.gradient_accumulation_steps",
                            "RLOOConfig.num_iterations",
                        ),
                    )
                )
    return cases


CASES = rloo_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_rloo_equals_trl(tmp_path, case):
    settings = Settings(**case.settings)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs = run_trl(tmp_path / "theirs", settings, rollouts, groups, micro_batches)
    # TRL's RLOO returns the micro-batch's mean (transformers divides it by the accumulation steps)
    compare(ours, theirs, loss_scale=1 / settings.gradient_accumulation_steps)
