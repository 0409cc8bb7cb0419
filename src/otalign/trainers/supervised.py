"""What the SFT and reward-model trainers share: model preparation, data order, evaluation cadence, saving.

Both train one model on a fixed dataset of items (encoded examples or pairs), configured by
:class:`~otalign.trainers.dataset.DatasetConfig`. Each step every process takes
``per_device_train_batch_size * gradient_accumulation_steps`` items from seeded per-epoch permutations
(:func:`~otalign.trainers.dataset.shuffled`), in ``gradient_accumulation_steps`` micro-batches; the position
follows from the step, so a resumed run continues exactly where it stopped. Evaluation runs as ``eval_strategy``
says (:meth:`~otalign.trainers.base.BaseTrainer.evaluate_now`).
"""

from __future__ import annotations

import warnings

from otalign.models import apply_lora
from otalign.paths import written_atomically

from .base import BaseTrainer
from .config import ConfigError
from .dataset import DatasetConfig, shuffled


class SupervisedTrainer(BaseTrainer):
    """Shared steps of the SFT and reward trainers; subclasses write ``train`` and ``evaluate``."""

    def load_datasets(self, train_data, eval_data, load) -> tuple[list, list | None]:
        """``train_data``/``eval_data`` if given, else ``load(name, split, dataset_config)`` of the config's data."""
        c = self.config
        if train_data is None:
            if c.dataset_name is None:
                raise ConfigError("set dataset_name (a .jsonl/.json/.parquet file or a Hugging Face dataset name)")
            train_data = load(c.dataset_name, c.dataset_train_split, c.dataset_config)
        if eval_data is None and c.eval_dataset_name is not None:
            eval_data = load(c.eval_dataset_name, c.dataset_test_split, c.dataset_config)
        return train_data, eval_data

    def prepare_model(self, model, *, task_type: str) -> None:
        """LoRA (if configured), train mode, optimizer and schedule: sets ``policy``, ``optimizer``, ``scheduler``."""
        c = self.config
        if c.use_peft:
            model = apply_lora(
                model,
                r=c.lora_r,
                alpha=c.lora_alpha,
                dropout=c.lora_dropout,
                target_modules=c.lora_target_modules,
                task_type=task_type,
            )
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.policy, self.optimizer = self.prepare(model, self.create_optimizer(self.params))
        # FSDP2 replaces the parameters with sharded ones: clip those (the optimizer's), not the originals
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.scheduler = self.create_scheduler(self.optimizer)

    def micro_batches(self, step: int, items: list) -> list[list]:
        """This process's ``items`` for ``step``, split into ``gradient_accumulation_steps`` micro-batches."""
        c, acc = self.config, self.accelerator
        b, accum = c.step_batch_size, c.gradient_accumulation_steps
        start = ((step - 1) * acc.num_processes + acc.process_index) * b
        ids = [shuffled(start + j, tuple(range(len(items))), c.seed) for j in range(b)]
        return [[items[i] for i in ids[m::accum]] for m in range(accum)]

    def total_before(self, step: int, sizes: list[int]) -> int:
        """The sum of ``sizes`` (one per item) over the items every process took in the steps before ``step``: the
        first ``(step - 1) x step batch x processes`` positions of the seeded stream :meth:`micro_batches` reads."""
        c = self.config
        epochs, rest = divmod((step - 1) * c.step_batch_size * self.accelerator.num_processes, len(sizes))
        ids = tuple(range(len(sizes)))
        return epochs * sum(sizes) + sum(sizes[shuffled(epochs * len(sizes) + j, ids, c.seed)] for j in range(rest))

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def conclude(self, history: list[dict[str, float]]) -> list[dict[str, float]]:
        """After the last step: final evaluation (:attr:`evaluate_at_end`; logged at ``max_steps``, appended to
        ``history``), save, finish."""
        if self.evaluate_at_end:
            final = self.evaluate()
            self.metrics.log(final, self.config.max_steps)
            history.append(final)
        if self.config.save_model:
            self.save_model()
        self.finish()
        return history

    def save_model(self) -> None:
        """Save the model as a plain checkpoint (LoRA adapters merged, so the next stage loads it like any model)
        and the tokenizer to ``output_dir/model``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.policy)
        lora = hasattr(model, "merge_and_unload")
        state = None if lora else acc.get_state_dict(self.policy)  # every process: gathers FSDP / ZeRO-3 shards
        if acc.is_main_process:
            if lora:
                model = model.merge_and_unload()
            with written_atomically(self.output_dir / "model") as target:  # whole, or the previous one stays
                model.save_pretrained(target, state_dict=state)
                self.tokenizer.save_pretrained(target)


def __getattr__(name: str):
    if name == "SupervisedConfig":  # the shared dataset options were SFT's and the reward model's alone
        warnings.warn(
            "otalign.trainers.supervised.SupervisedConfig is deprecated; use otalign.trainers.dataset.DatasetConfig",
            DeprecationWarning,
            stacklevel=2,
        )
        return DatasetConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
