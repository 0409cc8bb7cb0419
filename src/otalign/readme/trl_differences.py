"""The README's "Differences from TRL" table: one :class:`Row` per TRL field or behaviour whose otalign meaning a
TRL user should know, and :func:`markdown`, the table ``python -m otalign.readme`` writes between the README's
``<!-- registry:trl_differences -->`` markers.

Adding a row is one entry in :data:`ROWS`. A row either states a deliberate difference (``why``: the reason, never
empty) or that otalign does the same as TRL (``why`` None, shown as a dash), and names in ``keys`` the TRL fields
and behaviours it speaks of. ``tests/trl_parity/test_trl_differences.py`` holds the table to the parity suite, which
runs TRL 1.16 itself beside otalign: a difference row may not name a key a passing parity case proves equal, every
known mismatch of the suite (a strict xfail) must be named by a difference row, and a row claiming sameness must be
backed by a parity case or by the test it names in ``tested_by``.
"""

from __future__ import annotations

from typing import NamedTuple


class Row(NamedTuple):
    """One row of the table.

    Attributes:
        what: the TRL field(s) or behaviour (markdown).
        trl: what TRL 1.16 (or ``transformers.TrainingArguments``) does.
        otalign: what otalign does.
        why: the reason for a deliberate difference; None when otalign does the same as TRL.
        keys: the TRL fields/behaviours the row is about, in the vocabulary of the parity cases' ``proves``
            (``Config.field``, ``Config.field=value`` or a named behaviour).
        tested_by: for a row claiming sameness that no parity case covers: the test (a path in the repository)
            that shows it.
    """

    what: str
    trl: str
    otalign: str
    why: str | None
    keys: tuple[str, ...]
    tested_by: str | None = None


ROWS: tuple[Row, ...] = (
    Row(
        what="`gradient_accumulation_steps`",
        trl="multiplies the batch",
        otalign=(
            "the same: a step takes `per_device_train_batch_size x gradient_accumulation_steps` examples per "
            "process (PPO: `x num_mini_batches` rollouts, as TRL's `PPOConfig`)"
        ),
        why=None,
        keys=("TrainingArguments.gradient_accumulation_steps",),
    ),
    Row(
        what="`loss_type: ipo`",
        trl="log-probs averaged per completion token",
        otalign="the same (rewards metrics from the summed log-probs, as TRL)",
        why=None,
        keys=("DPOConfig.loss_type=ipo",),
    ),
    Row(
        what="`label_smoothing`",
        trl="used by `robust`, `aot`, `aot_unpaired` (and `exo_pair`); ignored by `sigmoid`, `hinge`, `ipo`",
        otalign=(
            "used by `robust`, `aot`, `aot_unpaired`; **rejected** (config error) for the losses that do not read"
            " it, never ignored"
        ),
        why="a silently ignored option is a bug",
        keys=("DPOConfig.label_smoothing with sigmoid, hinge, ipo",),
    ),
    Row(
        what="`aot`, `aot_unpaired`",
        trl="logistic loss only; the sort spans one device's batch",
        otalign=(
            "`aot_h` also offers `hinge2` and `lsq`; the sort spans **all processes** (gathered, gradients to the"
            " local part)"
        ),
        why=(
            "the AOT loss is defined on the batch distribution; a per-device sort changes the loss with the "
            "device count"
        ),
        keys=("DPOConfig.loss_type=aot across processes", "aot_h"),
    ),
    Row(
        what="`kto`",
        trl="reference point z0 from mismatched prompt/completion pairs of the batch, clamped at 0",
        otalign=(
            "z0 from otalign's own mismatched pairs of the step (`otalign.losses.kto`), clamped at 0, averaged "
            "over all processes, logged as `kto/z0`"
        ),
        why="one z0 for the global batch",
        keys=("KTO reference point z0",),
    ),
    Row(
        what="`aot_paired`",
        trl="—",
        otalign="deprecated alias of `aot` (FutureWarning)",
        why="earlier otalign name",
        keys=("loss_type alias aot_paired",),
    ),
    Row(
        what="`adam_beta2`",
        trl="0.999",
        otalign="the same: 0.999, transformers' default (earlier otalign versions: 0.95)",
        why=None,
        keys=("TrainingArguments.adam_beta2",),
    ),
    Row(
        what="`max_length`, `truncation_mode`",
        trl=(
            "`DPOConfig`: `keep_start` (default; `keep_end` deprecated, to be removed in 2.0) on prompt + "
            "completion, a row whose prompt alone fills `max_length` dropped; `SFTConfig`: `keep_start`, a row "
            "left with no trained token dropped; `RewardConfig` has no truncation: longer pairs are filtered out"
        ),
        otalign=(
            "`sft`: the same modes and default; **`dpo` (also KTO) defaults to `keep_end`**; every command also "
            "offers `error` (stop, naming file, row and field); `reward` defaults to `error` and can truncate; a "
            "row truncated to no completion token is an error, never dropped"
        ),
        why=(
            "`dpo`'s `keep_end` is deliberate for now: it keeps the end of every completion (with the EOS the "
            "loss scores) and cuts the prompt's start, and runs stay comparable with the metrics recorded by "
            "earlier otalign versions; no command's data is silently dropped"
        ),
        keys=("DPOConfig.truncation_mode default", "rows longer than max_length"),
    ),
    Row(
        what="SFT `messages` rows",
        trl=(
            "the loss covers every token of the conversation unless `assistant_only_loss` (assistant tokens, from"
            " the template's generation markers)"
        ),
        otalign=(
            "the loss covers the assistant turns only, each cut out of the chat template's rendering; no "
            "`assistant_only_loss` field"
        ),
        why=(
            "training on user turns teaches the model to write them; otalign needs no generation markers in the "
            "template"
        ),
        keys=("SFT messages loss", "SFTConfig.assistant_only_loss"),
    ),
    Row(
        what="SFT plain-text `prompt`/`completion` rows",
        trl="`prompt + completion` tokenized as one string; the completion starts where it parts from the prompt's "
        "own tokenization",
        otalign="prompt and completion tokenized apart, their ids joined (the same tokens when the completion starts "
        "at a word boundary, e.g. with a space; a loss 6.3% apart on rows that do not, measured by "
        "`tests/trl_parity`)",
        why="not changed yet: joint tokenization is planned; until then start completions with their separating space",
        keys=("SFT tokenization of prompt + completion text",),
    ),
    Row(
        what=(
            "chat template not prefix-preserving (the prompt with `add_generation_prompt` does not begin the "
            "prompt + completion)"
        ),
        trl=(
            "trains: the completion starts where the two tokenizations part, the prompt's end left out of "
            "training, with a warning"
        ),
        otalign="stops before training, naming the row and where the two renderings part",
        why="a model trained on a context it never sees at inference is a silent bug",
        keys=("chat template not prefix-preserving",),
    ),
    Row(
        what="`max_prompt_length`, `max_completion_length` (`DPOConfig`)",
        trl="deprecated in TRL 0.28, gone since",
        otalign="not offered: `max_length` and `truncation_mode` decide",
        why=None,
        keys=("DPOConfig.max_prompt_length", "DPOConfig.max_completion_length"),
        tested_by="tests/trl_parity/test_trl_differences.py",
    ),
    Row(
        what="reference with LoRA",
        trl="the base model with adapters disabled",
        otalign=(
            "the same (`otalign.models.AdapterDisabled`) when no reference is given: no second copy (538 MB of "
            "float32 weights saved for SmolLM2-135M), equal metrics (`tests/test_lora_reference.py`)"
        ),
        why=None,
        keys=("reference with LoRA",),
        tested_by="tests/test_lora_reference.py",
    ),
    Row(
        what="metric names",
        trl=(
            "`learning_rate`, `grad_norm`, `epoch`, `eval_loss`, `logits/chosen`, `num_tokens`, "
            "`mean_token_accuracy`, `entropy`, ..."
        ),
        otalign=(
            "the same names: `learning_rate`, `grad_norm` (every trainer, mean over a step's optimizer steps), "
            "`epoch` (passes over the training rows; RL: prompts x `num_generations`), evaluation with the prefix"
            " `eval_` (`eval_loss`, `eval_rewards/accuracies`), DPO `logits/*`, SFT `num_tokens`, "
            "`mean_token_accuracy`, `entropy`"
        ),
        why=None,
        keys=("metric names",),
        tested_by="tests/test_trl_semantics.py",
    ),
    Row(
        what="averaging of `logits/*`, `mean_token_accuracy`, `entropy`",
        trl="per micro-batch (token-weighted over its processes), then the mean over a logging window's micro-batches",
        otalign=(
            "token-weighted over the whole step (all micro-batches and processes); equal to TRL's with one "
            "micro-batch per step"
        ),
        why="a step's metric should not depend on how it is split into micro-batches",
        keys=("metric averaging over micro-batches",),
    ),
    Row(
        what="`push_to_hub`, `hub_model_id`, `hub_private_repo`",
        trl="push at every save and at the end (`hub_strategy`), token also from `hub_token`",
        otalign=(
            "the final `output_dir/model` only, at the end; the token from `HF_TOKEN` or `hf auth login` only (no"
            " `hub_token` field, so no token lands in `config.json`); checked before any model loads"
        ),
        why="a token missing at the end of a long run should fail at its start",
        keys=("TrainingArguments.push_to_hub", "TrainingArguments.hub_token"),
    ),
    Row(
        what="`num_train_epochs`",
        trl="default 3; a `max_steps` > 0 overrides it",
        otalign=(
            "default none (`max_steps` decides); when set it decides, `max_steps` = ceil(epochs x rows / (step "
            "batch x processes)), recorded in `config.json`"
        ),
        why="`max_steps` has a default here, so an explicit epoch count must win",
        keys=("TrainingArguments.num_train_epochs",),
    ),
    Row(
        what="`max_steps`, `warmup_steps`, the schedule (GRPO, RLOO, PPO)",
        trl="`max_steps` counts optimizer steps; the schedule steps once per optimizer step",
        otalign=(
            "the schedule is TRL's: stepped once per optimizer step, over `max_steps x num_iterations x "
            "num_mini_batches` optimizer steps (PPO: `num_ppo_epochs`), `warmup_steps` in optimizer steps (the "
            "same learning rates, tested); but **`max_steps` counts rollouts**, and so do `global_step`, "
            "`checkpoint-<n>`, `save_steps`, `logging_steps` and the `step` of `metrics.jsonl`; a row's "
            "`learning_rate` is the mean over its rollout's optimizer steps. TRL's `max_steps` = otalign's "
            "`max_steps x num_iterations x num_mini_batches` (`num_mini_batches` = TRL's `steps_per_generation / "
            "gradient_accumulation_steps`)"
        ),
        why=(
            "a rollout is the unit a checkpoint can resume from exactly (its samples, scores and advantages are "
            "not saved), so steps, checkpoints and logs count rollouts"
        ),
        keys=("RL max_steps counts rollouts",),
    ),
    Row(
        what="`loss_type` (GRPO, RLOO's `token` objective)",
        trl="`grpo`, `bnpo`, `dr_grpo`, `dapo` (default)",
        otalign=(
            "the same four, normalised as TRL (tested beside TRL's `GRPOTrainer` with accumulation and two passes "
            "per rollout); default `grpo`, see defaults below; earlier otalign versions' `bnpo` "
            "is TRL's `dapo`"
        ),
        why=None,
        keys=(
            "GRPOConfig.loss_type=grpo",
            "GRPOConfig.loss_type=bnpo",
            "GRPOConfig.loss_type=dr_grpo",
            "GRPOConfig.loss_type=dapo",
        ),
    ),
    Row(
        what="`use_bias_correction_kl`",
        trl="default true: GRPO's k3 KL term times exp(logp - logp_old)",
        otalign=(
            "the same, default true, for the reverse KL's k3 term with `penalty_in: loss` (every RL trainer); the"
            " other regularizers' loss surrogate sums over the whole vocabulary at each position and needs no "
            "correction"
        ),
        why=None,
        keys=("GRPOConfig.use_bias_correction_kl=True", "GRPOConfig.use_bias_correction_kl=False"),
    ),
    Row(
        what="RLOO objective",
        trl=(
            "sequence-level clipped ratio exp(sum logp - sum logp_old), mean over responses; "
            "`normalize_advantages` over the generation batch; no `loss_type`"
        ),
        otalign=(
            "the same by default (`loss_type: sequence`, tested beside TRL's `RLOOTrainer`; `normalize_advantages` the"
            " same, over all processes); RLOO also takes a GRPO `loss_type` (per-token ratios) and "
            "`scale_rewards` (group std, default off)"
        ),
        why="the per-token variant is earlier otalign's RLOO, kept for comparison",
        keys=("RLOOConfig.loss_type (per-token variants)", "RLOOConfig.scale_rewards"),
    ),
    Row(
        what="GRPO/RLOO metric names",
        trl=(
            "`reward`, `reward_std`, `rewards/<fn>/mean`, `frac_reward_zero_std`, `kl`, `entropy`, "
            "`clip_ratio/*`, `completions/*`, `num_tokens`, logged per optimizer step"
        ),
        otalign=(
            "the same keys, one row per rollout, beside otalign's own (`reward/mean`, `kl/exact`, ... which the "
            "sweep and analysis readers use); `kl` and `entropy` from the rollout (TRL: averaged over the "
            "optimizer steps' micro-batches at the current policy, equal at the first); `kl` also with beta 0; "
            "`clip_ratio/*` token-weighted over the rollout's optimizer steps (RLOO's sequence ratios counted "
            "once per token); `clip_ratio/low_min`, `high_max` as TRL (min/max over a micro-batch's responses on "
            "all processes, mean over the rollout's micro-batches)"
        ),
        why="the rollout is otalign's logging unit",
        keys=("RL metrics per rollout",),
    ),
    Row(
        what="`completions/clipped_ratio`, `completions/*_terminated_length` (GRPO, RLOO)",
        trl="a completion whose last token is EOS or the pad token counts as terminated",
        otalign="EOS only: a response that sampled the pad token and went on to `response_length` is clipped "
        "(otherwise the same keys and values, tested beside TRL)",
        why="sampling stops at EOS only, so a sampled pad token ends nothing; the metric follows the sampler",
        keys=("completions/clipped_ratio with a sampled pad token",),
    ),
    Row(
        what="GRPO/RLOO defaults",
        trl=(
            "`GRPOConfig`: `loss_type dapo`, `beta 0.0`, `temperature 1.0`, `top_k 0`, `num_generations 8`, "
            "`learning_rate 1e-6`; `RLOOConfig`: `beta 0.05`, `num_generations 2`, `temperature 1.0`, `top_k 0`, "
            "`learning_rate 1e-6`"
        ),
        otalign=(
            "`loss_type grpo` (GRPO); `beta`: the regularizer's own default (WPR paper Table 10: rkl 0.005, "
            "wasserstein 0.05, ...); `temperature 0.8`, `top_k 50` (WPR paper Table 9, every RL command); "
            "`num_generations 4`; `learning_rate 1.5e-5`"
        ),
        why=(
            "beta 0 would switch off the regularizer, which is what otalign compares; one sampling setting for "
            "PPO, GRPO and RLOO keeps their runs comparable (the paper's); 4 responses and 1.5e-5 are what the "
            "default model learns the built-in arithmetic task with in 20 steps "
            "(`benchmarks/grpo_verifiable.py`), and `grpo` is the normalisation its committed run used; pass "
            "TRL's values to get TRL's setting"
        ),
        keys=("GRPO/RLOO defaults",),
    ),
    Row(
        what="`scale_rewards` (GRPO)",
        trl="`group` (default), `batch` (the whole generation batch's std), `none`; `true`/`false` mean `group`/`none`",
        otalign="the same values and meanings (`batch`: the std over all processes' rollouts); RLOO offers it too, "
        "default `none`",
        why=None,
        keys=("GRPOConfig.scale_rewards",),
        tested_by="tests/test_trl_fields.py",
    ),
    Row(
        what="`epsilon`, `epsilon_high` (GRPO, RLOO)",
        trl="the ratio clipped to `[1 - epsilon, 1 + epsilon_high]`, `epsilon_high` defaulting to `epsilon` (0.2); "
        "`clip_ratio/*` against the two bounds",
        otalign="the same (loss, gradients and `clip_ratio/*` checked against TRL's lines); `cliprange`, otalign's "
        "earlier name, is the other name of `epsilon` (two different values refused)",
        why=None,
        keys=("GRPOConfig.epsilon", "GRPOConfig.epsilon_high", "RLOOConfig.epsilon", "RLOOConfig.epsilon_high"),
        tested_by="tests/test_trl_fields.py",
    ),
    Row(
        what="`max_completion_length` (GRPO, RLOO)",
        trl="new tokens per completion at most (256)",
        otalign="the other name of `response_length` (256; two different values refused)",
        why=None,
        keys=("GRPOConfig.max_completion_length", "RLOOConfig.max_completion_length"),
        tested_by="tests/test_trl_fields.py",
    ),
    Row(
        what="`mask_truncated_completions` (GRPO, RLOO)",
        trl="a completion whose last token is neither EOS nor the pad token gets a zero completion mask: no loss "
        "or gradient, out of the `dapo`/`bnpo` token counts and the `kl`/`clip_ratio` metrics, still in the "
        "group baselines and the `grpo`/`dr_grpo`/RLOO means over completions, its RLOO KL penalty 0",
        otalign="the same for a response without EOS (the loss, normalisers and `kl`/`clip_ratio/*` from the "
        "masked rollout); `entropy` and `completions/*` stay over every response",
        why="sampling stops at EOS only, so a sampled pad token ends nothing (as `completions/clipped_ratio`); "
        "`entropy` is measured at the rollout, before the loss",
        keys=("GRPOConfig.mask_truncated_completions with a sampled pad token", "entropy with masked completions"),
    ),
    Row(
        what="`log_completions`, `num_completions_to_print` (GRPO, RLOO)",
        trl="at each logging step the latest generation batch: `num_completions_to_print` random rows printed "
        "with `rich`, a `completions` table to wandb/trackio, GRPO also "
        "`output_dir/completions/completions_<step>.parquet`",
        otalign="at each logged step the step's rollout of all processes appended to `output_dir/completions.jsonl` "
        "(TRL's columns: `step`, `prompt`, `completion`, each reward function's score, `advantage`), the first "
        "`num_completions_to_print` printed as JSON lines, a `completions` table to trackers with `log_table` "
        "(wandb)",
        why="one JSON-lines file beside `metrics.jsonl`, cut back on resume like it, needs neither pandas nor "
        "rich; the first rows make the printout reproducible",
        keys=("GRPOConfig.log_completions", "GRPOConfig.num_completions_to_print"),
    ),
    Row(
        what="`completion_only_loss` (SFT)",
        trl="None (default) or True: the loss on the completion of prompt-completion rows; False: on the whole "
        "sequence; True with language-modeling rows is an error",
        otalign="the same (`messages` rows: see above)",
        why=None,
        keys=("SFTConfig.completion_only_loss",),
        tested_by="tests/test_trl_fields.py",
    ),
    Row(
        what="RL held-out evaluation (`eval_strategy`, `eval_steps`, an eval prompt set)",
        trl="`num_generations_eval` responses per prompt; every training metric with the `eval_` prefix (`eval_kl` "
        "is k3)",
        otalign="one seeded response per prompt, the same seeds at every evaluation; `eval_reward`, "
        "`eval_reward_std`, `eval_kl/exact` (full vocabulary), `eval_regularizer/distance` and the regularizer's "
        "statistics",
        why="the same random numbers each time, so changes between evaluations come from the policy; the exact "
        "distance is what the method regularizes",
        keys=("RL evaluation",),
    ),
    Row(
        what="`eval_strategy` default, `per_device_eval_batch_size` default",
        trl="`no`; 8",
        otalign="unset: `steps` when eval data is given (`eval_steps` 0: after the last step only), else `no`; "
        "`per_device_train_batch_size`",
        why="earlier configs that name eval data keep evaluating after training, with the same batching",
        keys=("TrainingArguments.eval_strategy default", "TrainingArguments.per_device_eval_batch_size default"),
    ),
    Row(
        what="`save_strategy`, `save_steps`, `save_total_limit` defaults",
        trl="`steps`, 500, None; `best` with `metric_for_best_model`",
        otalign="`steps`, 0 (never, not even at the end), 2 (the checkpoint just written is always kept); `best` "
        "refused; `epoch` saves at the step that finishes a pass",
        why="checkpoints are opt-in and bounded in disk; there is no `metric_for_best_model`",
        keys=("TrainingArguments.save_steps default", "TrainingArguments.save_total_limit default"),
    ),
    Row(
        what="`bf16`, `fp16`, `optim`",
        trl="`bf16` True unless `fp16`; `optim` `adamw_torch_fused` (torch >= 2.8) and many others",
        otalign="aliases of `mixed_precision` (default none: float32); `optim` `adamw_torch` (default) or "
        "`adamw_torch_fused`, anything else refused naming both",
        why="float32 by default keeps CPU runs and recorded numbers comparable; the same AdamW update either way, "
        "the other optimizers need packages or state otalign does not manage",
        keys=("TrainingArguments.bf16 default", "TrainingArguments.optim"),
    ),
    Row(
        what="`run_name`, `model_init_kwargs`",
        trl="W&B run name (falls back to `output_dir`); kwargs for every model TRL loads",
        otalign="W&B name and TensorBoard subfolder (unset: `output_dir/otalign`); `dtype`/`torch_dtype` and "
        "`attn_implementation` for the policy and a path-loaded reference (not PPO's critic or an RL reward "
        "model)",
        why="keeps the existing TensorBoard folder; the kwargs describe the models they are given for",
        keys=("TrainingArguments.run_name", "model_init_kwargs"),
    ),
    Row(
        what="a rollout's micro-batches across `num_iterations` passes (GRPO, RLOO)",
        trl="the generation batch is shuffled once and every pass reuses the same micro-batches",
        otalign="reshuffled before every pass (equal gradients given the same micro-batches, tested); only `bnpo`, "
        "a token mean per micro-batch, depends on the split",
        why="one update loop for PPO, GRPO and RLOO, which reshuffles every epoch as TRL's `PPOTrainer` does",
        keys=("micro-batch split across num_iterations passes",),
    ),
)
"""The table's rows, in the README's order."""

HEADER = ("what", "TRL 1.16", "otalign", "why")


def differences() -> tuple[Row, ...]:
    """The rows that state a deliberate difference (a ``why``)."""
    return tuple(row for row in ROWS if row.why is not None)


def markdown() -> str:
    """The table as the README shows it (a dash in ``why`` where otalign does the same as TRL)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in ROWS:
        lines.append(f"| {row.what} | {row.trl} | {row.otalign} | {row.why or '—'} |")
    return "\n".join(lines)
