"""What every trainer shares: accelerator, seeding, optimizer and schedule, checkpoints, metrics, progress.

A concrete trainer (PPO, SFT, reward, preference) builds its models, calls :meth:`BaseTrainer.prepare`
with them, then writes its own loop top to bottom::

    start = self.begin()                       # resume if asked, open trackers
    for step in self.steps(start):             # progress bar over the remaining steps
        ...                                    # the method's loop body
        self.end_step(step, metrics)           # log, checkpoint
    self.finish()

The trainer owns the loop; the math (losses, penalties, advantages) lives in functions it calls.

**Non-finite values.** The loop body hands each micro-batch's loss (and any other value the step depends on) to
``self.guard.watch``; :meth:`BaseTrainer.apply_gradients` adds the gradient norm and lets
:class:`~otalign.guard.FiniteGuard` decide before the optimizer steps: a NaN or infinity stops the run with a
:class:`~otalign.guard.NonFiniteError` (step, quantity, likely cause), or with ``on_nonfinite: skip`` the step's
gradients are dropped and ``nonfinite/skipped_steps`` counts it. The checkpoint of the last good step stays as it
was, and no model is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from otalign.guard import FiniteGuard
from otalign.paths import write_text_atomically, written_atomically

from .checkpoint import CheckpointManager, TrainerState, latest_checkpoint, resume_settings
from .config import OPTIMIZERS, ConfigError, TrainerConfig
from .metrics import EVAL_PREFIX, MetricsLogger


def check_output_dir(config: TrainerConfig) -> None:
    """``ConfigError`` if a new run (no ``resume``/``resume_from_checkpoint``) would reuse an ``output_dir`` that holds
    a run's ``metrics.jsonl`` or checkpoints, unless ``overwrite_output_dir``: never append to or mix with old
    metrics silently."""
    if config.resume or config.resume_from_checkpoint or config.overwrite_output_dir:
        return
    out = Path(config.output_dir)
    found = [p.name for p in (out / "metrics.jsonl", out / "checkpoints") if p.exists()]
    if found:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(found)}); pass --resume to continue it "
            "or --overwrite_output_dir to start over"
        )


class BaseTrainer:
    """Shared infrastructure for the trainers of :mod:`otalign.trainers`.

    Args:
        config: the command's config (a :class:`TrainerConfig` subclass).
        accelerator: an existing ``Accelerator`` (one per process); default: made from the config.
    """

    project_name = "otalign"

    def __init__(self, config: TrainerConfig, accelerator: Accelerator | None = None) -> None:
        config.validate()  # paths (model, data, output folder) before anything loads
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=self.trackers() or None,
            project_dir=str(self.output_dir),
        )
        check_output_dir(config)
        set_seed(config.seed)
        self.state = TrainerState()
        self.metrics = MetricsLogger(self.accelerator, self.output_dir)
        self.checkpoints = CheckpointManager(self.accelerator, self.output_dir, config.save_total_limit)
        self.guard = FiniteGuard(self.accelerator, config.on_nonfinite)
        self._updated = False  # an optimizer step was applied in this process (for the guard's likely cause)
        self._grad_norms: list[float] = []  # gradient norms of the applied optimizer steps since the last advance
        self._learning_rates: list[float] = []  # learning rates of the optimizer steps since the last advance
        self.num_examples: int | None = None  # training-set size (count_examples), for epoch and num_train_epochs

    def print(self, *args) -> None:
        """Print on the main process only."""
        self.accelerator.print("[otalign]", *args, flush=True)

    def trackers(self) -> list:
        """accelerate's ``log_with``: ``report_to``, with ``run_name`` set its tensorboard writing to
        ``output_dir/<project>/<run_name>`` (a tracker object; wandb gets the name in :meth:`begin`)."""
        c = self.config
        if c.run_name is None or "tensorboard" not in c.report_to:
            return list(c.report_to)
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(f"{self.project_name}/{c.run_name}", str(self.output_dir))
        return [tracker if name == "tensorboard" else name for name in c.report_to]

    def create_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over ``params`` with the config's learning rate, betas, epsilon and weight decay; ``optim``
        ``adamw_torch_fused`` runs its fused kernel (:data:`~otalign.trainers.config.OPTIMIZERS`)."""
        c = self.config
        fused = {"fused": True} if OPTIMIZERS[c.optim] else {}
        return torch.optim.AdamW(
            params,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
            **fused,
        )

    optimizer_steps_per_step = 1
    """Optimizer steps one step of the loop takes (RL: ``num_epochs x num_mini_batches`` per rollout)."""

    def create_scheduler(self, optimizer: torch.optim.Optimizer):
        """``transformers.get_scheduler`` over ``max_steps x optimizer_steps_per_step`` optimizer steps with
        ``warmup_steps`` optimizer steps of warmup, stepped once per optimizer step as TRL's (applied or skipped,
        whatever the number of processes; saved with every checkpoint)."""
        from transformers import get_scheduler

        c = self.config
        total = c.max_steps * self.optimizer_steps_per_step
        scheduler = get_scheduler(
            c.lr_scheduler_type, optimizer, num_warmup_steps=c.warmup_steps, num_training_steps=total
        )
        self.accelerator.register_for_checkpointing(scheduler)
        return scheduler

    def prepare(self, *objects):
        """``accelerator.prepare`` the models and optimizer (with ``gradient_checkpointing``: enabled, non-reentrant,
        on every model that supports it), and register :attr:`state` for checkpoints."""
        if self.config.gradient_checkpointing:
            for obj in objects:
                if hasattr(obj, "activation_checkpointing_enable"):  # transformers >= 5.2x
                    obj.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                elif hasattr(obj, "gradient_checkpointing_enable"):
                    obj.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        prepared = self.accelerator.prepare(*objects)
        self.accelerator.register_for_checkpointing(self.state)
        return prepared

    def begin(self) -> int:
        """Resume if the config asks, start the trackers, write ``config.json``; returns the first step to run."""
        c = self.config
        self.checkpoints.settings = resume_settings(c, self.accelerator.num_processes)
        path = c.resume_from_checkpoint
        if c.resume and path is None:
            path = latest_checkpoint(self.output_dir)
            if path is None:
                self.print(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}, starting from scratch")
        if path is not None:
            self.checkpoints.load(path)
            self.metrics.truncate_after(self.state.global_step)
            self.print(f"resumed from {path} at step {self.state.global_step}")
        else:
            self.metrics.reset()
            if c.overwrite_output_dir and self.accelerator.is_main_process:
                shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)  # never resume into an old run
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.output_dir / "config.json", json.dumps(c.to_dict(), indent=2))
        if c.report_to:
            names = {"wandb": {"name": c.run_name}} if c.run_name is not None else {}
            self.accelerator.init_trackers(self.project_name, config=_flat(c.to_dict()), init_kwargs=names)
        return self.state.global_step + 1

    def steps(self, start: int) -> Iterator[int]:
        """Steps ``start .. max_steps`` with a progress bar on the main process (when enabled)."""
        from tqdm.auto import tqdm

        c = self.config
        show = c.progress_bar and self.accelerator.is_local_main_process
        bar = tqdm(total=c.max_steps, initial=start - 1, disable=not show, desc=type(self).__name__, dynamic_ncols=True)
        self._bar = bar
        try:
            for step in range(start, c.max_steps + 1):
                yield step
                bar.update(1)
        finally:
            bar.close()

    def count_examples(self, examples: int) -> None:
        """Record the size of the training set (rows; RL: prompts x responses per prompt), call before
        :meth:`create_scheduler`: the ``epoch`` metric counts passes over it and, with ``num_train_epochs``,
        ``config.max_steps`` becomes ``ceil(num_train_epochs * examples / (step_batch_size * processes))``."""
        c = self.config
        self.num_examples = examples
        if c.num_train_epochs is not None:
            per_step = c.step_batch_size * self.accelerator.num_processes
            c.max_steps = max(1, math.ceil(c.num_train_epochs * examples / per_step - 1e-9))

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` (just run, ``state.samples_seen`` advanced) completed a pass over the training rows: the
        step at which TRL's epoch-wise evaluation and saving happen (a step here may run past the pass's end)."""
        if not self.num_examples:
            return False
        after = self.state.samples_seen
        before = after - self.config.step_batch_size * self.accelerator.num_processes
        return after // self.num_examples > max(before, 0) // self.num_examples

    def plan_evaluation(self, has_data: bool) -> None:
        """Fix when :meth:`evaluate_now` and :meth:`evaluate_at_end` say yes, from ``eval_strategy``/``eval_steps``
        (:meth:`~otalign.trainers.config.TrainerConfig.eval_interval`; a :class:`ConfigError` when they ask for
        evaluation without data)."""
        self.eval_every = self.config.eval_interval(has_data)

    eval_every: int | None = None
    """Evaluation cadence (:meth:`plan_evaluation`): None never, 0 after the last step, n also every n steps."""

    def evaluate_now(self, step: int) -> bool:
        """True at an intermediate evaluation step: every ``eval_every`` steps or, with ``eval_strategy`` epoch, a
        step that ends a pass (:meth:`ends_epoch`); the last step is :meth:`evaluate_at_end`'s."""
        if self.eval_every is None or step == self.config.max_steps:
            return False
        if self.config.eval_strategy == "epoch":
            return self.ends_epoch(step)
        return bool(self.eval_every) and step % self.eval_every == 0

    @property
    def evaluate_at_end(self) -> bool:
        """Whether the trainer evaluates after its last step (any evaluation cadence does, as TRL's ``steps``)."""
        return self.eval_every is not None

    def save_now(self, step: int) -> bool:
        """Whether ``step`` writes a checkpoint: ``save_strategy`` steps every ``save_steps`` (0: never) and the
        last step; epoch each step that ends a pass (:meth:`ends_epoch`) and the last step; no never."""
        c = self.config
        if c.save_strategy == "steps":
            return bool(c.save_steps) and (step % c.save_steps == 0 or step == c.max_steps)
        if c.save_strategy == "epoch":
            return step == c.max_steps or self.ends_epoch(step)
        return False

    def end_step(self, step: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` with ``epoch`` (passes over the training set so far, as TRL; with ``on_nonfinite:
        skip`` also ``nonfinite/skipped_steps``, the optimizer steps skipped so far) every ``logging_steps``, at
        the last step and with any ``eval_`` metric, and checkpoint when :meth:`save_now` says so."""
        c = self.config
        self.state.global_step = step
        if self.num_examples:
            metrics["epoch"] = self.state.samples_seen / self.num_examples
        if c.on_nonfinite == "skip":
            metrics["nonfinite/skipped_steps"] = float(self.state.skipped_steps)
        evaluated = any(key.startswith(EVAL_PREFIX) for key in metrics)  # as TRL: evaluations are always logged
        if step % c.logging_steps == 0 or step == c.max_steps or evaluated:
            self.metrics.log(metrics, step)
            bar = getattr(self, "_bar", None)
            if bar is not None:
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in self.progress_keys if k in metrics}, refresh=False)
        if self.save_now(step):
            self.checkpoints.save(step)

    def no_sync(self, *, last: bool):
        """Skip the data-parallel gradient all-reduce on all but the last micro-batch of a step."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.policy)

    def optimizer_step(self, step: int) -> dict[str, float]:
        """After a step's backward passes: :meth:`apply_gradients`, then :meth:`advance`; returns its metrics."""
        self.apply_gradients(step)
        return self.advance()

    def apply_gradients(self, step: int) -> bool:
        """Clip ``self.params``' gradients (``max_grad_norm``; none: only measure their norm), check the values
        watched since the last optimizer step and the gradient norm (``self.guard``), step ``self.optimizer``
        unless the guard skips the step (``on_nonfinite: skip``, counted in ``state.skipped_steps``), zero the
        gradients, step the schedule (either way); returns whether the step was applied.

        Raises:
            NonFiniteError: a watched value or the gradient norm is NaN or infinite (``on_nonfinite: error``).
        """
        c, acc = self.config, self.accelerator
        norm = acc.clip_grad_norm_(self.params, math.inf if c.max_grad_norm is None else c.max_grad_norm)
        if norm is not None and acc.scaler is None:  # fp16: the grad scaler skips overflowing steps itself
            self.guard.watch("the gradient norm", norm, self.divergence_cause())
        applied = self.guard.passes(step)
        if applied:
            self.optimizer.step()
            self._updated = True
            if norm is not None:
                self._grad_norms.append(float(norm))
        else:
            self.state.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step_schedule()
        return applied

    def step_schedule(self) -> None:
        """Record the learning rate of the optimizer step just taken (or skipped), then advance the schedule."""
        self._learning_rates.append(self.scheduler.get_last_lr()[0])
        self.scheduler.step()

    def skip_optimizer_steps(self, count: int) -> None:
        """``count`` optimizer steps that did not run (a whole step skipped before its updates, ``on_nonfinite:
        skip``): counted in ``state.skipped_steps``, and the schedule moves past them as past a skipped step."""
        self.state.skipped_steps += count
        for _ in range(count):
            self.step_schedule()

    def advance(self) -> dict[str, float]:
        """End a step's updates: advance the data position (``state.samples_seen``).

        Returns:
            The step's optimizer metrics under TRL's names: ``learning_rate`` (the one the step's optimizer steps
            used, their mean when there are several) and ``grad_norm`` (total gradient norm before clipping,
            averaged over the step's applied optimizer steps; absent when none was applied).
        """
        rates = self._learning_rates or [self.scheduler.get_last_lr()[0]]
        metrics = {"learning_rate": sum(rates) / len(rates)}
        if self._grad_norms:
            metrics["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        self._grad_norms.clear()
        self._learning_rates.clear()
        self.state.samples_seen += self.config.step_batch_size * self.accelerator.num_processes
        return metrics

    def divergence_cause(self) -> str:
        """The likely cause of a non-finite loss or gradient, for the guard's message: the inputs or the initial
        weights before any update, else the learning rate (and fp16's range)."""
        c = self.config
        if not self._updated and self.state.global_step == 0:
            return "no update was applied yet: the model's weights, its dtype or the data give it"
        fp16 = ", or fp16 overflowed (use bf16)" if c.mixed_precision == "fp16" else ""
        return f"learning_rate {c.learning_rate:g} is likely too high{fp16}"

    progress_keys: tuple[str, ...] = ()
    """Metrics shown next to the progress bar."""

    def finish(self) -> None:
        """Push the saved model (``push_to_hub``), close trackers and wait for all processes.

        The process group stays up (it ends with the process) so that another trainer can follow in the
        same processes, as the stages of ``otalign pipeline`` do: ``Accelerator.end_training`` would destroy
        it, and the next stage's collectives would fail.
        """
        self.push_model()
        self.accelerator.wait_for_everyone()
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def push_model(self) -> None:
        """With ``push_to_hub``, on the main process: upload ``output_dir/model`` to the Hub repo ``hub_repo_id``,
        creating it if missing (``HfApi.create_repo(exist_ok=True)`` then ``upload_folder``)."""
        c = self.config
        if not (c.push_to_hub and self.accelerator.is_main_process):
            return
        from huggingface_hub import HfApi

        api = HfApi()
        folder = self.output_dir / "model"
        repo = api.create_repo(c.hub_repo_id, private=c.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message="otalign: trained model")
        self.print(f"pushed {folder} to {repo}")

    def save_model(self) -> None:
        """Save the trained ``self.policy`` (``save_pretrained``) and ``self.tokenizer`` to ``output_dir/model``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.policy)  # every process: gathers FSDP / ZeRO-3 shards
        if acc.is_main_process:
            with written_atomically(self.output_dir / "model") as target:  # whole, or the previous one stays
                acc.unwrap_model(self.policy).save_pretrained(target, state_dict=state)
                self.tokenizer.save_pretrained(target)


def _flat(config: dict) -> dict:
    """Tracker-friendly hyperparameters: lists and None become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
