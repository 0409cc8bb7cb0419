"""Fields every trainer shares (:class:`TrainerConfig`) and the seeds derived from its ``seed``
(:func:`stream_seed`); parsing lives in :mod:`otalign.config` (re-exported here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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
EVAL_STRATEGIES = ("no", "steps", "epoch")
"""``eval_strategy`` values (``transformers.IntervalStrategy``)."""
SAVE_STRATEGIES = ("no", "steps", "epoch")
"""``save_strategy`` values (``transformers.SaveStrategy`` but ``best``, which needs ``metric_for_best_model``)."""
OPTIMIZERS = {"adamw_torch": False, "adamw_torch_fused": True}
"""``optim`` values (``transformers.OptimizerNames``) the trainers drive, each ``torch.optim.AdamW`` with this
``fused`` setting; the others (8-bit, paged, Adafactor, ...) need packages or state the trainers do not manage."""
MODEL_INIT_DTYPE_KEYS = ("dtype", "torch_dtype")
"""``model_init_kwargs`` keys that name the weights dtype (``torch_dtype`` is transformers' older name)."""
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
    bf16: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: true is mixed_precision bf16, false refuses it (none: mixed_precision decides)"},
    )
    fp16: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: true is mixed_precision fp16, false refuses it (none: mixed_precision decides)"},
    )
    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": "optimizer (transformers' names): adamw_torch (torch.optim.AdamW) or adamw_torch_fused (its "
            "fused kernel, same updates)",
            "choices": tuple(OPTIMIZERS),
        },
    )
    model_init_kwargs: dict | None = field(
        default=None,
        metadata={
            "help": "keyword arguments of from_pretrained for the trained model (and a reference loaded from a "
            "path), as TRL: e.g. {dtype: bfloat16, attn_implementation: sdpa}; dtype (or torch_dtype) sets "
            "model_dtype"
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "attention kernel of the loaded models (eager, sdpa, flash_attention_2, ...; none: "
            "transformers' choice)"
        },
    )
    logging_steps: int = field(
        default=1, metadata={"help": "log metrics every this many steps (metrics.jsonl and trackers)", "check": ">= 1"}
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={"help": "accelerate trackers (empty: metrics.jsonl only)", "choices": TRACKERS},
    )
    run_name: str | None = field(
        default=None,
        metadata={
            "help": "name of the run in the trackers (wandb's run name; tensorboard writes to "
            "output_dir/otalign/<run_name>) and in config.json (none: unnamed, tensorboard in output_dir/otalign)"
        },
    )
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "split of eval_dataset_name to evaluate (a Hub dataset, saved folder or built-in set)"},
    )
    eval_strategy: str | None = field(
        default=None,
        metadata={
            "help": "when to evaluate on the held-out set (TRL's): steps (every eval_steps and after the last "
            "step), epoch (after each step that completes a pass over the training rows, and after the last), no "
            "(never); none: steps when there is evaluation data, else no",
            "choices": EVAL_STRATEGIES,
        },
    )
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "evaluate every this many steps (0: with eval_strategy steps logging_steps, as TRL; unset "
            "eval_strategy: after the last step only)",
            "check": ">= 0",
        },
    )
    per_device_eval_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "examples (RL: prompts) per process per evaluation batch (none: per_device_train_batch_size)",
            "check": ">= 1",
        },
    )
    save_strategy: str = field(
        default="steps",
        metadata={
            "help": "when to checkpoint (TRL's): steps (every save_steps and after the last step; save_steps 0: "
            "never), epoch (after each step that completes a pass over the training rows, and after the last), no",
            "choices": SAVE_STRATEGIES,
        },
    )
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every this many steps and at the end (0: never)", "check": ">= 0"}
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "keep at most this many checkpoints, removing the oldest once a new one is complete (none: all)",
            "check": ">= 1",
        },
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
        self._resolve_precision()
        self._resolve_model_init_kwargs()
        if self.eval_strategy in ("no", "epoch") and self.eval_steps:
            raise ConfigError(
                f"eval_steps needs eval_strategy steps, got eval_strategy {self.eval_strategy}", "eval_steps"
            )
        if self.save_strategy != "steps" and self.save_steps:
            raise ConfigError(
                f"save_steps needs save_strategy steps, got save_strategy {self.save_strategy}", "save_steps"
            )
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

    def _resolve_precision(self) -> None:
        """``bf16``/``fp16`` (TRL's names) onto ``mixed_precision``: true sets it, false refuses it; a value
        contradicting ``mixed_precision`` or the other flag is a :class:`ConfigError`."""
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true: choose one mixed precision", "bf16")
        for name in ("bf16", "fp16"):
            flag = getattr(self, name)
            if flag is None:
                continue
            if flag and self.mixed_precision not in ("no", name):
                raise ConfigError(f"{name} true contradicts mixed_precision {self.mixed_precision}", name)
            if not flag and self.mixed_precision == name:
                raise ConfigError(f"{name} false contradicts mixed_precision {name}", name)
            if flag:
                self.mixed_precision = name

    def _resolve_model_init_kwargs(self) -> None:
        """``model_init_kwargs``' ``dtype`` (or ``torch_dtype``) onto ``model_dtype`` and its ``attn_implementation``
        onto the field; one of them given twice with two values is a :class:`ConfigError`."""
        kwargs = self.model_init_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"model_init_kwargs must be a mapping, got {kwargs!r}", "model_init_kwargs")
        dtypes = {k: kwargs[k] for k in MODEL_INIT_DTYPE_KEYS if k in kwargs}
        if len(set(map(str, dtypes.values()))) > 1:
            raise ConfigError(f"model_init_kwargs names two dtypes: {dtypes}", "model_init_kwargs")
        if dtypes:
            dtype = str(next(iter(dtypes.values()))).removeprefix("torch.")
            if dtype not in MODEL_DTYPES:
                raise ConfigError(
                    f"model_init_kwargs dtype {dtype!r}: choose one of {list(MODEL_DTYPES)}", "model_init_kwargs"
                )
            if self.model_dtype not in ("float32", dtype):
                raise ConfigError(
                    f"model_init_kwargs dtype {dtype} contradicts model_dtype {self.model_dtype}", "model_init_kwargs"
                )
            self.model_dtype = dtype
        attn = kwargs.get("attn_implementation")
        if attn is not None:
            if self.attn_implementation not in (None, attn):
                raise ConfigError(
                    f"model_init_kwargs attn_implementation {attn} contradicts attn_implementation "
                    f"{self.attn_implementation}",
                    "model_init_kwargs",
                )
            self.attn_implementation = attn

    @property
    def model_kwargs(self) -> dict:
        """Keyword arguments of :func:`otalign.models.load_causal_lm` for the trained model: ``dtype`` (the
        ``model_dtype`` name), ``attn_implementation`` when set, and the rest of ``model_init_kwargs``."""
        kwargs = {k: v for k, v in (self.model_init_kwargs or {}).items() if k not in MODEL_INIT_DTYPE_KEYS}
        kwargs["dtype"] = self.model_dtype
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    eval_data_fields: ClassVar[tuple[str, ...]] = ("eval_dataset_name",)
    """The fields that give a command evaluation data (named when ``eval_strategy``/``eval_steps`` has none)."""

    def eval_interval(self, has_data: bool) -> int | None:
        """When the trainer evaluates: None never, 0 after the last step only, n every n steps and after the last
        (``eval_strategy`` epoch: :meth:`BaseTrainer.evaluate_now` adds the steps that end a pass).

        Args:
            has_data: whether the trainer has evaluation data (from the config or given in Python).

        Raises:
            ConfigError: ``eval_strategy`` steps/epoch or ``eval_steps`` without evaluation data, naming the fields.
        """
        strategy = self.eval_strategy
        if strategy == "no" or (strategy is None and not has_data and not self.eval_steps):
            return None
        if not has_data:
            which = f"eval_strategy {strategy}" if strategy is not None else f"eval_steps {self.eval_steps}"
            raise ConfigError(
                f"{which} evaluates on held-out data: set {' or '.join(self.eval_data_fields)}",
                "eval_strategy" if strategy is not None else "eval_steps",
            )
        if strategy == "steps":
            return self.eval_steps or self.logging_steps
        return self.eval_steps if strategy is None else 0

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
    def eval_batch_size(self) -> int:
        """Examples (RL: prompts) per process per evaluation batch: ``per_device_eval_batch_size`` or
        ``per_device_train_batch_size``."""
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def step_batch_size(self) -> int:
        """Examples per process per optimizer step: ``per_device_train_batch_size * gradient_accumulation_steps``
        (as ``transformers.TrainingArguments``)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


__all__ = [
    "EVAL_STRATEGIES",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "SAVE_STRATEGIES",
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
