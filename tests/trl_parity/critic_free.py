"""GRPO and RLOO run by otalign and by TRL 1.16 on the same completions (see :mod:`parity`): the settings both sides
share, each side's run, and the comparison."""

from __future__ import annotations

import dataclasses

import torch
from parity import (
    LOSS_ATOL,
    Recorder,
    assert_close,
    assert_same_steps,
    follow_row_order,
    inject_completions,
    model_from,
    record_otalign,
    record_trl,
    tiny_models,
    trl_metrics,
)

PROMPTS = ("the cat is", "a dog was", "we love the", "it is a")
"""Prompts of one length in tokens."""
UNEVEN_PROMPTS = ("the cat", "a dog was here", "we", "it is a good day")
"""Prompts of different lengths: left-padded in a batch (TRL's position ids and otalign's agree)."""


def score(text: str) -> float:
    """A reward of the completion's text alone (both sides decode the same tokens to the same text)."""
    return float(len(text) % 7) / 3


def otalign_reward(prompts, responses, **columns):
    return [score(r) for r in responses]


def trl_reward(prompts, completions, **kwargs):
    return [score(c) for c in completions]


otalign_reward.__name__ = trl_reward.__name__ = "length"  # one name in both sides' metrics: rewards/length/mean


@dataclasses.dataclass
class Settings:
    """Fields both sides take (otalign's name; TRL's where it differs in the comment).

    ``adam_epsilon`` is large so that AdamW moves a weight whose gradient is float32 rounding noise (~1e-9) by
    ~``lr x g / eps``, not by a learning rate of either sign (with eps 1e-8 a noise-level gradient entry gets a full
    step whose sign is the noise's, and the two runs' next gradients part by more than 1e-5)."""

    algorithm: str = "grpo"
    loss_type: str = "grpo"
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    per_device_train_batch_size: int = 4
    num_generations: int = 2
    rollouts: int = 2  # TRL's max_steps = rollouts x num_iterations (optimizer steps)
    response_length: int = 5  # TRL's max_completion_length
    temperature: float = 0.9
    learning_rate: float = 3e-3
    adam_epsilon: float = 1e-3  # see below
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    scale_rewards: bool = True  # TRL's "group" / "none"
    normalize_advantages: bool = False
    seed: int = 0
    prompts: tuple[str, ...] = PROMPTS


@dataclasses.dataclass
class Run:
    """What one side recorded: per rollout the advantages, the :class:`Recorder`, and the weights at the end."""

    advantages: list[torch.Tensor]
    recorder: Recorder
    weights: dict[str, torch.Tensor]


def run_otalign(folder, s: Settings):
    """Train otalign's trainer; returns its :class:`Run`, the rollouts ``(prompt_ids, completion_ids)``, the
    prompts of each group in order, and the rows of each micro-batch in order."""
    from otalign.trainers import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tokenizer, policy, ref, _ = tiny_models(folder)
    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[s.algorithm]
    extra = {"normalize_advantages": s.normalize_advantages} if s.algorithm == "rloo" else {}
    config = config_class(
        output_dir=str(folder / "otalign"),
        max_steps=s.rollouts,
        num_iterations=s.num_iterations,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        per_device_train_batch_size=s.per_device_train_batch_size,
        num_generations=s.num_generations,
        response_length=s.response_length,
        temperature=s.temperature,
        top_k=0,
        learning_rate=s.learning_rate,
        adam_epsilon=s.adam_epsilon,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_steps,
        beta=s.beta,
        regularizer="rkl",
        kl_estimator="k1",
        loss_type=s.loss_type,
        use_bias_correction_kl=s.use_bias_correction_kl,
        scale_rewards=s.scale_rewards,
        use_chat_template=False,
        seed=s.seed,
        progress_bar=False,
        save_model=False,
        **extra,
    )
    trainer = trainer_class(
        config,
        policy=model_from(tokenizer, policy),
        ref_model=model_from(tokenizer, ref),
        tokenizer=tokenizer,
        reward=otalign_reward,
        prompts=list(s.prompts),
    )
    recorder, advantages, rollouts, groups, micro_batches = Recorder(), [], [], [], []
    record_otalign(trainer, recorder)
    compute_advantages, compute_loss = trainer.advantages, trainer.loss

    def recording_advantages(scored):
        batch = compute_advantages(scored)
        advantages.append(batch.advantages.clone())
        mask = scored.mask
        completions = [row[keep].tolist() for row, keep in zip(scored.rollout.responses, mask, strict=True)]
        rollouts.append(([trainer.prompt_ids[r] for r in scored.rows], completions))
        groups.extend(s.prompts[r] for r in scored.rows[:: s.num_generations])
        return batch

    def recording_loss(batch, rows, normalizer):
        out = compute_loss(batch, rows, normalizer)
        micro_batches.append(rows.tolist())
        recorder.losses.append(float(out[0].detach()))
        return out

    trainer.advantages, trainer.loss = recording_advantages, recording_loss
    recorder.metrics = trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.policy).named_parameters()}
    return Run(advantages, recorder, weights), rollouts, groups, micro_batches


def run_trl(folder, s: Settings, rollouts, groups, micro_batches) -> Run:
    """Train TRL's own trainer on otalign's completions, prompts and micro-batch rows (:mod:`parity`)."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tokenizer, _, ref, path = tiny_models(folder)
    common = dict(
        output_dir=str(folder / "trl"),
        max_steps=s.rollouts * s.num_iterations,
        num_iterations=s.num_iterations,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        per_device_train_batch_size=s.per_device_train_batch_size,
        num_generations=s.num_generations,
        max_completion_length=s.response_length,
        temperature=s.temperature,
        learning_rate=s.learning_rate,
        adam_epsilon=s.adam_epsilon,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_steps,
        beta=s.beta,
        shuffle_dataset=False,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        seed=s.seed,
    )
    if s.algorithm == "grpo":
        config = GRPOConfig(
            **common,
            loss_type=s.loss_type,
            use_bias_correction_kl=s.use_bias_correction_kl,
            scale_rewards="group" if s.scale_rewards else "none",
        )
        trainer_class = GRPOTrainer
    else:
        config = RLOOConfig(**common, normalize_advantages=s.normalize_advantages)
        trainer_class = RLOOTrainer
    trainer = trainer_class(
        AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=trl_reward,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": groups}),
        processing_class=tokenizer,
    )
    if trainer.ref_model is not None:  # TRL built it from the policy's path: make it the distinct reference
        trainer.ref_model.load_state_dict(ref)
    recorder, advantages = Recorder(), []
    record_trl(trainer, recorder)
    inject_completions(trainer, rollouts, logprobs=s.algorithm == "grpo")
    follow_row_order(trainer, micro_batches)
    generate_and_score = trainer._generate_and_score_completions

    def recording(generation_batch):
        batch = generate_and_score(generation_batch)
        advantages.append(batch["advantages"].clone())
        return batch

    trainer._generate_and_score_completions = recording
    trainer.train()
    recorder.metrics = trl_metrics(trainer)
    return Run(advantages, recorder, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})


def compare(ours: Run, theirs: Run, *, loss_scale: float = 1.0) -> None:
    """Equal advantages, micro-batch losses (TRL's times ``loss_scale``), gradients, learning rates and final
    weights."""
    assert len(ours.advantages) == len(theirs.advantages)
    for k, (mine, trl) in enumerate(zip(ours.advantages, theirs.advantages, strict=True)):
        assert_close(mine, trl, f"advantages of rollout {k}")
    losses = [loss * loss_scale for loss in theirs.recorder.losses]
    assert_close(ours.recorder.losses, losses, "micro-batch losses", atol=LOSS_ATOL)
    assert_same_steps(ours.recorder, theirs.recorder)
    for name, value in theirs.weights.items():
        assert_close(ours.weights[name], value, f"final weights {name}")
