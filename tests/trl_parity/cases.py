"""What the parity suite runs and what each case proves equal to TRL 1.16 (:class:`parity.Case`): the one list
``test_trl_differences.py`` holds the README's differences table to. Importing it needs no TRL.

A key is a TRL field (``Config.field``, ``Config.field=value`` where only that value is covered) or a named
behaviour; the rows of :mod:`otalign.readme.trl_differences` use the same vocabulary.
"""

from __future__ import annotations

from critic_free import UNEVEN_PROMPTS
from parity import Case

GRPO_SHARED = (
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
                            *GRPO_SHARED,
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
                        *GRPO_SHARED,
                        f"GRPOConfig.loss_type={loss_type}",
                        "GRPOConfig.beta",
                        f"GRPOConfig.use_bias_correction_kl={bias_correction}",
                        "GRPO k3 KL term",
                    ),
                )
            )
    cases.append(
        Case(
            "warmup-unscaled-it2",
            dict(loss_type="grpo", num_iterations=2, warmup_steps=2, rollouts=3, scale_rewards=False),
            (
                *(key for key in GRPO_SHARED if key != "GRPOConfig.scale_rewards=group"),
                "GRPOConfig.scale_rewards=none",
                "TrainingArguments.warmup_steps",
                "learning rate per optimizer step",
            ),
        )
    )
    cases.append(
        Case(
            "uneven-prompts-beta-ga2",
            dict(
                prompts=UNEVEN_PROMPTS,
                loss_type="dapo",
                beta=0.2,
                gradient_accumulation_steps=2,
                per_device_train_batch_size=2,
            ),
            (*GRPO_SHARED, "left-padded prompts", "GRPOConfig.beta", "GRPOConfig.loss_type=dapo"),
        )
    )
    return cases


GRPO_CASES = grpo_cases()


RL_METRICS = (
    "reward",
    "reward_std",
    "rewards/length/mean",
    "rewards/length/std",
    "frac_reward_zero_std",
    "kl",
    "entropy",
    "num_tokens",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "learning_rate",
    "grad_norm",
    "epoch",
)
"""TRL's GRPO/RLOO metric keys compared row by row (one optimizer step and micro-batch per rollout, so that TRL's
``kl`` and ``entropy``, taken at the current policy in the loss, are at the rollout policy as otalign's)."""
TERMINATION_METRICS = (
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
)
PAD_ENDED = (
    "TRL counts a completion whose last token is the pad token as terminated, otalign only one that reached EOS; "
    "the tiny policy samples the pad token at the last position in 1 of 4 completions: clipped_ratio 0.75 (TRL) "
    "against 1.0, terminated lengths 5 against 0"
)
METRIC_CASES = [
    Case(
        f"{algorithm}-metrics",
        dict(algorithm=algorithm, beta=beta, metrics=RL_METRICS, **extra),
        (f"{algorithm.upper()} metric keys",),
    )
    for algorithm, beta, extra in (
        ("grpo", 0.2, {}),
        ("rloo", 0.1, dict(loss_type="sequence", scale_rewards=False)),
    )
] + [
    Case(
        "grpo-termination-metrics",
        dict(algorithm="grpo", beta=0.2, metrics=TERMINATION_METRICS),
        ("completions/clipped_ratio with a sampled pad token",),
        differs=PAD_ENDED,
    )
]


RLOO_SHARED = (
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
                            *RLOO_SHARED,
                            "RLOOConfig.beta",
                            f"RLOOConfig.normalize_advantages={normalize}",
                            "TrainingArguments.gradient_accumulation_steps",
                            "RLOOConfig.num_iterations",
                        ),
                    )
                )
    return cases


RLOO_CASES = rloo_cases()


DPO_SHARED = (
    "DPOConfig.beta",
    "DPO tokenization",
    "TrainingArguments.per_device_train_batch_size",
    "TrainingArguments.learning_rate",
    "TrainingArguments.lr_scheduler_type=linear",
    "TrainingArguments.max_grad_norm",
    "learning rate per optimizer step",
)


def dpo_cases() -> list[Case]:
    cases = []
    for loss_type, smoothing in (
        ("sigmoid", 0.0),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("robust", 0.1),
        ("aot", 0.0),
        ("aot", 0.1),
        ("aot_unpaired", 0.1),
    ):
        for accumulation in (1, 2):
            proves = (*DPO_SHARED, f"DPOConfig.loss_type={loss_type}", "TrainingArguments.gradient_accumulation_steps")
            if smoothing:
                proves = (*proves, f"DPOConfig.label_smoothing ({loss_type})")
            if accumulation == 1:
                proves = (*proves, "DPO metric keys")
            cases.append(
                Case(
                    f"{loss_type}-s{smoothing}-ga{accumulation}",
                    dict(loss_type=loss_type, label_smoothing=smoothing, gradient_accumulation_steps=accumulation),
                    proves,
                )
            )
    return cases


DPO_CASES = dpo_cases()


SFT_BATCH = 4
"""Rows per optimizer step."""
SFT_SHARED = (
    "SFTConfig.completion_only_loss=True",
    "SFT loss",
    "TrainingArguments.gradient_accumulation_steps",
    "TrainingArguments.learning_rate",
    "TrainingArguments.lr_scheduler_type=linear",
    "learning rate per optimizer step",
)
SFT_METRICS = ("num_tokens", "mean_token_accuracy", "learning_rate", "grad_norm")
"""TRL's SFT metric keys compared in each logged row (with one micro-batch per step)."""
SFT_CASES = [
    Case(
        "ga1",
        dict(gradient_accumulation_steps=1, per_device_train_batch_size=SFT_BATCH, metrics=SFT_METRICS),
        (*SFT_SHARED, "SFT tokenization of prompt, completion", "SFT metric keys"),
    ),
    Case(
        "ga2",
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=SFT_BATCH // 2),
        (*SFT_SHARED, "SFT tokenization of prompt, completion"),
    ),
    Case(
        "joined-prompt-completion-text",
        dict(gradient_accumulation_steps=1, per_device_train_batch_size=SFT_BATCH, rows="raw"),
        ("SFT tokenization of prompt + completion text",),
        differs="TRL tokenizes prompt + completion as one string ('... .the cat' gives an unknown token on the tiny "
        "word-level tokenizer), otalign each part apart: step loss 6.3% apart",
    ),
    Case(
        "entropy-metric",
        dict(gradient_accumulation_steps=1, per_device_train_batch_size=SFT_BATCH, metrics=("entropy",)),
        ("SFT entropy metric",),
    ),
]

CASES = GRPO_CASES + RLOO_CASES + METRIC_CASES + DPO_CASES + SFT_CASES
"""Every parity case."""
