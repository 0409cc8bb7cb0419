"""Fields every trainer shares (:class:`TrainerConfig`) and the seeds derived from its ``seed``
(:func:`stream_seed`); parsing lives in :mod:`otalign.config` (re-exported here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from otalign.config import (
    MIXED_PRECISION,
    MODEL_DTYPES,
    Config,
    ConfigError,
    check_keys,
    coerce,
    field_types,
    parse_config,
    redefault,
)
from otalign.guard import ON_NONFINITE

TRACKERS = ("tensorboard", "wandb", "all")
SEED_MIX = 7919
"""Multiplier of :func:`stream_seed` (a prime)."""


def stream_seed(seed: int, k: int) -> int:
    """Seed of the ``k``-th stream of a run seeded with ``seed`` (an epoch's order of prompts or rows, a step's
    order of mini-batches): ``seed * 7919 + k``, a different seed for every (seed, k) with ``0 <= k < 7919``."""
    return seed * SEED_MIX + k


UNSUPPORTED_SCHEDULERS = (
    "reduce_lr_on_plateau",
    "greedy",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
"""``transformers`` schedules the trainers cannot drive: the first two step on a validation metric, the others need
``lr_scheduler_kwargs`` (``min_lr``, ``num_decay_steps``), which the trainers do not take."""


def _schedulers() -> list[str]:
    """The ``transformers.SchedulerType`` values but :data:`UNSUPPORTED_SCHEDULERS`."""
    from transformers import SchedulerType

    return [s.value for s in SchedulerType if s.value not in UNSUPPORTED_SCHEDULERS]


@dataclass
class TrainerConfig(Config):
    """Fields every trainer shares (names follow ``transformers.TrainingArguments`` / TRL where they exist)."""

    output_dir: str = field(
        default="runs/otalign",
        metadata={
            "path": "output_dir",
            "help": "folder for checkpoints (checkpoints/checkpoint-<step>), metrics.jsonl and the model",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seeds Python, NumPy, torch and every derived sampling stream",
            "check": "[0, 4294967295]",  # NumPy takes seeds in [0, 2**32)
        },
    )
    max_steps: int = field(
        default=100,
        metadata={
            "help": "optimisation steps to run (RL: rollouts, each num_epochs x num_mini_batches optimizer steps)",
            "check": ">= 1",
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "passes over the training rows (RL: prompts x num_generations) instead of max_steps (none: "
            "max_steps decides); the steps are ceil(epochs x rows / (step batch x processes))",
            "check": "> 0",
        },
    )
    model_name_or_path: str = field(
        default="default",
        metadata={
            "path": "model",
            "help": "Hugging Face id, local folder, or 'default' (the embedded SmolLM2-135M-Instruct)",
        },
    )
    model_dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": MODEL_DTYPES})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank", "check": ">= 1"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha", "check": "> 0"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA inputs", "check": "[0, 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "modules LoRA adapts (peft target_modules)"}
    )
    learning_rate: float = field(default=1.5e-5, metadata={"help": "AdamW learning rate", "check": ">= 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay", "check": ">= 0"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "check": "[0, 1)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (transformers default)", "check": "[0, 1)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon", "check": "> 0"})
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "transformers.get_scheduler schedule over max_steps", "choices": _schedulers},
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps of the schedule", "check": ">= 0"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "gradient-norm clipping (none: off)", "check": "> 0"}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "examples per process per forward/backward pass (micro-batch)", "check": ">= 1"}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "micro-batches per optimizer step (multiplies the batch, as in TRL)", "check": ">= 1"},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass (less memory, more time)"}
    )
    mixed_precision: str = field(
        default="no",
        metadata={"help": "accelerate autocast (log-probs stay float32)", "choices": MIXED_PRECISION},
    )
    logging_steps: int = field(
        default=1, metadata={"help": "log metrics every this many steps (metrics.jsonl and trackers)", "check": ">= 1"}
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "accelerate trackers (empty: metrics.jsonl only)", "choices": TRACKERS},
    )
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every this many steps and at the end (0: never)", "check": ">= 0"}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "keep at most this many checkpoints (none: all)", "check": ">= 1"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh in an output_dir that holds a run (else: an error)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"path": "dir", "help": "a checkpoint folder to continue from (overrides resume)"}
    )
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar on the main process"})
    on_nonfinite: str = field(
        default="error",
        metadata={
            "help": "a NaN/inf loss, gradient norm, reward or penalty: error (stop, naming step and cause) or skip "
            "the optimizer step and count it (nonfinite/skipped_steps); non-finite logits always stop",
            "choices": ON_NONFINITE,
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "after training, upload output_dir/model to the Hugging Face Hub repo hub_model_id (needs "
            "save_model and a token: HF_TOKEN or `hf auth login`)"
        },
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "the Hub repo, 'name' (under the token's account) or 'owner/name' (none: output_dir's name)"},
    )
    hub_private_repo: bool | None = field(
        default=None, metadata={"help": "make a new Hub repo private (none: the Hub account's default)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overwrite_output_dir and (self.resume or self.resume_from_checkpoint is not None):
            which = "resume" if self.resume else "resume_from_checkpoint"
            raise ConfigError(
                f"{which} continues the run in output_dir, overwrite_output_dir starts it afresh: give one", which
            )
        if not self.use_peft:
            for f in dataclasses.fields(self):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                if f.name.startswith("lora_") and getattr(self, f.name) != default:
                    raise ConfigError(f"{f.name} sets up LoRA, which needs use_peft (set use_peft: true)", f.name)
        if self.push_to_hub:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            if not getattr(self, "save_model", True):
                raise ConfigError("push_to_hub uploads the saved model: it needs save_model", "push_to_hub")
            try:
                validate_repo_id(self.hub_repo_id)
            except HFValidationError as error:
                raise ConfigError(
                    f"hub_model_id {self.hub_repo_id!r} is not a Hub repo id: {error}", "hub_model_id"
                ) from None

    def validate(self) -> None:
        """The checks of :meth:`Config.validate`, and with ``push_to_hub`` a Hub token, before anything loads."""
        super().validate()
        if self.push_to_hub:
            from huggingface_hub import get_token

            if get_token() is None:
                raise ConfigError(
                    "push_to_hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`", "push_to_hub"
                )

    @property
    def hub_repo_id(self) -> str:
        """The Hub repo ``push_to_hub`` uploads to: ``hub_model_id``, else the name of ``output_dir`` (as
        ``transformers.TrainingArguments``)."""
        return self.hub_model_id or Path(self.output_dir).resolve().name

    @property
    def step_batch_size(self) -> int:
        """Examples per process per optimizer step: ``per_device_train_batch_size * gradient_accumulation_steps``
        (as ``transformers.TrainingArguments``)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


__all__ = [
    "MIXED_PRECISION",
    "MODEL_DTYPES",
    "ConfigError",
    "TrainerConfig",
    "check_keys",
    "coerce",
    "field_types",
    "parse_config",
    "redefault",
    "stream_seed",
]
