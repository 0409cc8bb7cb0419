"""Training on a fixed dataset (SFT, reward model, preference optimization): the options naming it, and the seeded
order its items are read in.

Each step every process takes ``per_device_train_batch_size * gradient_accumulation_steps`` items from an endless
stream of seeded per-epoch permutations (:func:`shuffled`); the position in the stream follows from the step, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from otalign.data.truncation import truncation_field

from .config import TrainerConfig, stream_seed


@dataclass
class DatasetConfig(TrainerConfig):
    """Dataset, evaluation and saving options of the trainers that train on a fixed dataset (SFT, reward model,
    preference optimization), on top of :class:`TrainerConfig`."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "path": "data",
            "builtins": ("builtin",),
            "help": "a .jsonl/.json/.parquet file, a Hugging Face dataset name, or 'builtin' (the packaged "
            "preference pairs: dpo, reward)",
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "configuration of a Hugging Face dataset_name (and eval_dataset_name), as TRL"}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "split of dataset_name to train on"})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "path": "data",
            "builtins": ("builtin",),
            "help": "evaluation rows (file or dataset name; dpo: paired rows), evaluated as eval_strategy says "
            "(eval_... metrics)",
        },
    )
    max_length: int = field(
        default=1024,
        metadata={
            "help": "most tokens of one example, prompt + completion (longer: see truncation_mode)",
            "check": ">= 2",
        },
    )
    truncation_mode: str = truncation_field("keep_start")
    save_model: bool = field(
        default=True,
        metadata={"help": "write the trained model and tokenizer to output_dir/model (sft, reward: LoRA merged)"},
    )


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def shuffled(position: int, items: tuple[int, ...], seed: int) -> int:
    """Item at ``position`` of an endless stream of seeded per-epoch permutations of ``items``."""
    epoch, offset = divmod(position, len(items))
    return items[int(_permutation(len(items), stream_seed(seed, epoch))[offset])]
