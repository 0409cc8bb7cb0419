"""Trainer configs: dataclasses filled from a YAML file and ``--key value`` overrides, mapped 1:1 onto fields.

Every command has one dataclass (``PPOConfig``, ...) deriving from :class:`TrainerConfig`, the fields all
trainers share. :func:`parse_config` reads ``--config file.yaml`` then applies the command line, so

    otalign ppo --config ppo.yaml --learning_rate 3e-6 --report_to tensorboard,wandb

sets exactly the fields named. Unknown keys (with a did-you-mean), values of the wrong type and missing
values are reported with the file or option they came from, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NONE = ("none", "null", "~")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


@dataclass
class TrainerConfig:
    """Fields every trainer shares (names follow ``transformers.TrainingArguments`` / TRL where they exist).

    Run:
        output_dir: folder for checkpoints (``checkpoints/checkpoint-<step>``), ``metrics.jsonl`` and the model.
        seed: seeds Python, NumPy and torch on every process, and every derived sampling stream.
        max_steps: optimisation steps (for PPO: rollout batches) to run.
    Model:
        model_name_or_path: Hugging Face id, local folder, or ``default`` (the embedded SmolLM2-135M-Instruct).
        model_dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto`` weights dtype.
        use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA adapters through ``peft``.
    Optimisation:
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW.
        lr_scheduler_type, warmup_steps: ``transformers.get_scheduler`` schedule over ``max_steps``.
        max_grad_norm: gradient-norm clipping (None: off).
        per_device_train_batch_size: examples per process per step.
        gradient_accumulation_steps: micro-batches accumulated into one optimizer step.
        mixed_precision: ``no`` | ``fp16`` | ``bf16`` (accelerate autocast; log-probs stay float32).
    Logging and checkpoints:
        logging_steps: log metrics every this many steps (``metrics.jsonl`` always; ``report_to`` trackers).
        report_to: accelerate trackers, e.g. ``[tensorboard]`` or ``[wandb]``; empty: JSONL only.
        save_steps: checkpoint every this many steps and at the end (0: no checkpoints).
        save_total_limit: keep at most this many checkpoints (None: all).
        resume: continue from the latest checkpoint in ``output_dir`` (``resume_from_checkpoint`` overrides).
        resume_from_checkpoint: a checkpoint folder to continue from.
        progress_bar: show a tqdm bar on the main process.
    """

    output_dir: str = "runs/otalign"
    seed: int = 0
    max_steps: int = 100
    model_name_or_path: str = "default"
    model_dtype: str = "float32"
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    learning_rate: float = 1.5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=list)
    save_steps: int = 0
    save_total_limit: int | None = 2
    resume: bool = False
    resume_from_checkpoint: str | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        unknown = sorted(set(self.report_to) - {"tensorboard", "wandb", "all"})
        if unknown:
            raise ConfigError(f"report_to: unknown tracker(s) {unknown}; use tensorboard, wandb or all")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types(cls: type) -> dict[str, object]:
    """Resolved type annotation of every init field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def coerce(value: object, annotation: object, where: str) -> object:
    """``value`` (from YAML, or a command-line string) converted to ``annotation``; ``ConfigError`` if it does not fit.

    Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``list[X]``, ``dict``.
    Strings from the command line are parsed: ``true/false``, numbers, ``none``, comma-separated lists.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in NONE)
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is list:
        items = [v for v in value.split(",") if v] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(item, args[0] if args else str, f"{where}[{i}]") for i, item in enumerate(items)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation}")


def check_keys(keys: list[str], types_: dict[str, object], where: str) -> None:
    """``ConfigError`` naming the first key not in ``types_``, with the closest field names."""
    for key in keys:
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")


def parse_overrides(argv: list[str], types_: dict[str, object]) -> dict[str, str | bool]:
    """``--key value`` / ``--key=value`` pairs (a bare ``--flag`` is ``true`` for a bool field)."""
    values: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: expected --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        check_keys([key], types_, "command line")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if types_[key] is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"command line: --{key} needs a value")
            else:
                value, i = nxt, i + 1
        values[key] = value
        i += 1
    return values


def parse_config(cls: type, config_file: str | Path | None = None, argv: list[str] | None = None):
    """An instance of the dataclass ``cls`` from a YAML file (optional) and command-line overrides.

    Args:
        cls: a :class:`TrainerConfig` subclass.
        config_file: YAML mapping of field names to values.
        argv: ``["--key", "value", "--flag", ...]``; applied after the file.

    Raises:
        ConfigError: unknown key, bad type, unreadable file, or a value the dataclass rejects.
    """
    types_ = field_types(cls)
    values: dict[str, object] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
        check_keys(list(data), types_, str(path))
        values.update({k: coerce(v, types_[k], f"{path}: {k}") for k, v in data.items()})
    for key, value in parse_overrides(list(argv or []), types_).items():
        values[key] = coerce(value, types_[key], f"--{key}")
    return cls(**values)
