"""Atomic, verified checkpoints through accelerate: ``output_dir/checkpoints/checkpoint-<step>``.

:meth:`CheckpointManager.save` has every process write ``accelerator.save_state`` (models, optimizers,
per-process RNG states of Python/NumPy/torch/CUDA, and every object registered with
``accelerator.register_for_checkpointing`` such as the scheduler and :class:`TrainerState`) into a hidden
temporary folder; once all processes are done, the main process writes ``manifest.json`` (every file's size in
bytes and SHA-256) last, and renames the folder into place. A crash mid-save leaves only the temporary folder,
which the next save removes. A save that fails (a full disk) removes its temporary folder and stops with one line
(:class:`CheckpointError`) naming the checkpoint, the free space and the space a checkpoint needs.

A model holding LoRA adapters (peft) is saved without its frozen base weights (the pretrained ones every run and
resume loads): its model file holds the trainable parameters only (adapters, a value head), as TRL/PEFT
checkpoints do, and the manifest lists it under ``trainable_only`` with a print of its frozen weights (the sum of
squares of each frozen tensor); :meth:`CheckpointManager.load` refuses a model whose frozen weights differ from
that print (adapters on other base weights), loads non-strictly and checks that each model file held exactly the
keys it should.

The manifest also records the run's :data:`RESUME_SETTINGS` (``settings``): the schedule, optimizer and batch
shape the saved state belongs to. :meth:`CheckpointManager.load` given the resuming run's settings refuses, in one
line naming each field and both values, a resume that changed any of them: the saved optimizer and scheduler state
and the data position cannot continue a run with another ``max_steps``, learning rate or batch size exactly (a
longer ``max_steps`` would stretch a decay the finished steps already followed).

Files can still be damaged after the rename (a copy cut short, a truncated file): :func:`latest_checkpoint` checks
each checkpoint against its manifest, newest first, says in one line which file of which checkpoint is broken, and
returns the newest intact one. Checkpoints written before manifests existed are taken as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from otalign.paths import out_of_space

PATTERN = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message is one line naming the path."""


RESUME_SETTINGS = (
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "num_mini_batches",
    "num_generations",
    "seed",
)
"""Config fields a resume must keep (those the config has): they fix the learning-rate schedule, the optimizer
and the batches (see the module docstring). The batch size itself is kept as ``examples_per_step``
(:func:`resume_settings`): a run may resume on another number of processes with the per-process batch scaled."""


def resume_settings(config, processes: int) -> dict:
    """``{field: value}`` of the :data:`RESUME_SETTINGS` that ``config`` has (``max_steps`` as the run computed it),
    and ``examples_per_step``: ``config.step_batch_size`` (per process, ``per_device_train_batch_size x
    gradient_accumulation_steps``, RL also ``x num_mini_batches``) times ``processes``."""
    settings = {name: getattr(config, name) for name in RESUME_SETTINGS if hasattr(config, name)}
    return {**settings, "examples_per_step": config.step_batch_size * processes}


def changed_settings(path: str | Path, settings: Mapping) -> str | None:
    """The :data:`RESUME_SETTINGS` whose values in ``settings`` differ from those the checkpoint at ``path`` was
    written with, as ``"max_steps 3 -> 6, learning_rate 0.0005 -> 0.001"``; None when none differs, when the
    checkpoint records no settings (written before they were recorded), or when the resumed run trains no step
    (``settings["max_steps"]`` at most the checkpoint's step: it only loads the state)."""
    path = Path(path)
    step = PATTERN.match(path.name)
    if step is not None and settings.get("max_steps") is not None and settings["max_steps"] <= int(step.group(1)):
        return None
    saved = _read_manifest(path).get("settings") or {}
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in settings.items() if k in saved and saved[k] != v]
    return ", ".join(changed) or None


@dataclass
class TrainerState:
    """Loop position saved with every checkpoint.

    Attributes:
        global_step: optimizer steps completed.
        samples_seen: examples (prompts) consumed across all processes: the data position.
        skipped_steps: optimizer steps skipped for a non-finite value (``on_nonfinite: skip``).
        num_input_tokens_seen: RL: prompt and response tokens sampled so far by all processes (TRL's
            ``num_tokens``; 0 in a checkpoint written before it was kept).
    """

    global_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    num_input_tokens_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints under ``output_dir/checkpoints`` (renamed into place, so fully written once), oldest step first;
    :func:`verify_checkpoint` checks one's files."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path, extra: Mapping | None = None) -> dict:
    """Write ``folder/manifest.json``: ``{"files": {relative path: {"bytes", "sha256"}}, **extra}`` of every file
    in it (:class:`CheckpointManager` adds ``trainable_only``, the indices of the models saved without their frozen
    weights, and ``frozen_weights``, per such model the sum of squares of each frozen tensor, in name order)."""
    folder = Path(folder)
    manifest = {"files": {p.relative_to(folder).as_posix(): _entry(p) for p in _files(folder)}, **(extra or {})}
    with (folder / MANIFEST).open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` is broken (one phrase naming the file), or None when every file matches its
    manifest (size, then SHA-256) or the checkpoint has no manifest (written before manifests existed)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (:func:`verify_checkpoint`), or None. Each newer broken one is named in one
    line on stderr (by the main process), with the file at fault and the checkpoint used instead."""
    found = list_checkpoints(output_dir)
    for i in range(len(found) - 1, -1, -1):
        why = verify_checkpoint(found[i])
        if why is None:
            return found[i]
        instead = f"resuming from {found[i - 1].name}" if i else "no older checkpoint"
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"checkpoint {found[i]} is broken: {why}; {instead}", file=sys.stderr, flush=True)
    return None


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _has_adapters(model) -> bool:
    """Whether ``model`` holds a peft (LoRA) model and frozen parameters."""
    return any(hasattr(m, "peft_config") for m in model.modules()) and any(
        not p.requires_grad for p in model.parameters()
    )


def _frozen_sums(model) -> list[float]:
    """Sum of squares of each frozen parameter (float64, in ``named_parameters`` order): the base weights' print."""
    import torch

    with torch.no_grad():
        sums = [p.detach().double().square().sum() for _, p in model.named_parameters() if not p.requires_grad]
        return torch.stack(sums).tolist() if sums else []


def _same_sums(now: list[float], saved: list[float] | None) -> bool:
    """Equal up to summation order (relative 1e-9: float64 sums of float32 squares)."""
    if saved is None or len(now) != len(saved):
        return False
    return all(abs(a - b) <= 1e-9 * abs(b) for a, b in zip(now, saved, strict=True))


def _trainable_names(model) -> set[str]:
    return {n.removeprefix("module.") for n, p in model.named_parameters() if p.requires_grad}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files(folder)) if folder.is_dir() else 0


class CheckpointManager:
    """Saves and restores the full training state of an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (models/optimizers prepared, extra state registered).
        output_dir: run folder; checkpoints go to ``output_dir/checkpoints``.
        total_limit: keep at most this many checkpoints, the one just saved always among them (oldest removed
            first, once the new one is complete); None keeps all.
    """

    def __init__(self, accelerator, output_dir: str | Path, total_limit: int | None = None) -> None:
        self.accelerator = accelerator
        self.folder = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit
        self._partial: dict = {}
        self.settings: dict = {}
        """The run's :func:`resume_settings`, recorded in each checkpoint's manifest (set by the trainer)."""
        accelerator.register_save_state_pre_hook(self._keep_trainable)

    def _keep_trainable(self, models: list, weights: list[dict], output_dir: str) -> None:
        """accelerate's pre-save hook: the state dict of a model holding LoRA adapters (peft) keeps only its
        trainable parameters (the adapters, a value head); its frozen base weights are the pretrained ones the run
        starts from, loaded again on resume. Other models are saved whole."""
        self._partial = {"trainable_only": [], "frozen_weights": {}}
        for i, (model, state) in enumerate(zip(models, weights, strict=False)):
            if not _has_adapters(model):
                continue
            trainable = _trainable_names(model)
            for key in [k for k in state if k.removeprefix("module.") not in trainable]:
                del state[key]
            self._partial["trainable_only"].append(i)
            self._partial["frozen_weights"][str(i)] = _frozen_sums(model)

    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (all processes must call this); returns its path."""
        acc = self.accelerator
        final = self.folder / f"checkpoint-{step}"
        tmp = self.folder / f".tmp-checkpoint-{step}"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=False)
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_manifest(tmp, {**self._partial, "settings": self.settings})
        except (OSError, RuntimeError) as err:
            self._failed(final, tmp, err)
            raise
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune(final)
        acc.wait_for_everyone()
        return final

    def _failed(self, final: Path, tmp: Path, err: BaseException) -> None:
        """After a failed save: remove the temporary folder; on a full disk raise :class:`CheckpointError`."""
        written = _folder_bytes(tmp)
        free_then = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if not out_of_space(err, free_then):
            return
        found = list_checkpoints(self.folder.parent)
        previous = found[-1] if found else None
        needed = max(_folder_bytes(previous) if previous is not None else 0, written)
        free = shutil.disk_usage(self.folder).free if self.folder.exists() else 0
        raise CheckpointError(
            f"no space left to write checkpoint {final}: {free / 2**20:.0f} MiB free on its disk, a checkpoint "
            f"needs {'about' if previous is not None else 'more than'} {needed / 2**20:.0f} MiB "
            "(the partial write was removed)"
        ) from None

    def load(self, path: str | Path) -> None:
        """Restore everything :meth:`save` wrote (all processes must call this).

        Raises:
            FileNotFoundError: no such checkpoint.
            CheckpointError: a file does not match the manifest, or cannot be read back (one line naming it).
            ValueError: :attr:`settings` differ from those the checkpoint was written with (:func:`changed_settings`).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        why = verify_checkpoint(path)
        if why is not None:
            raise CheckpointError(f"checkpoint {path} is broken: {why}")
        if changed := changed_settings(path, self.settings):
            raise ValueError(
                f"cannot resume from {path}: {changed} since it was written (its optimizer, schedule and data "
                "position belong to the old values); resume with them, or start afresh with --overwrite_output_dir"
            )
        manifest = _read_manifest(path)
        partial = manifest.get("trainable_only", [])
        for i in partial:  # the adapters only fit the base weights they were trained on
            model = self.accelerator._models[i]
            if not _same_sums(_frozen_sums(model), manifest.get("frozen_weights", {}).get(str(i))):
                raise CheckpointError(
                    f"checkpoint {path} holds LoRA adapters trained on other base weights than this model's "
                    "(it saves the adapters only): start from the same --model_name_or_path"
                )
        try:
            self.accelerator.load_state(str(path), **({"strict": False} if partial else {}))
            if partial:
                self._check_keys(path, partial)
        except CheckpointError:
            raise
        except (RuntimeError, EOFError, ValueError, KeyError, OSError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise CheckpointError(f"checkpoint {path} could not be read: {type(err).__name__}: {first}") from None

    def _check_keys(self, path: Path, partial: list[int]) -> None:
        """After a non-strict load: each model file held exactly the keys it should (the trainable parameters of a
        model saved without its frozen weights, every key of the others); else :class:`CheckpointError`."""
        import torch

        for i, model in enumerate(self.accelerator._models):
            file = path / ("pytorch_model.bin" if i == 0 else f"pytorch_model_{i}.bin")
            if not file.is_file():
                continue
            got = {
                k.removeprefix("module.") for k in torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            }
            want = _trainable_names(model) if i in partial else {k.removeprefix("module.") for k in model.state_dict()}
            if got != want:
                missing, extra = sorted(want - got)[:3], sorted(got - want)[:3]
                raise CheckpointError(
                    f"checkpoint {path}: {file.name} does not fit this model (missing {missing}, unexpected {extra})"
                )

    def _prune(self, saved: Path) -> None:
        """Keep ``total_limit`` checkpoints: ``saved`` (just written and complete, so the newest intact one) and the
        newest others by step; remove the rest, oldest first (as ``transformers``' ``save_total_limit``). A
        checkpoint of a higher step left by an earlier run (a resume from an older one) is among the others: it
        never pushes out ``saved``."""
        if self.total_limit is None:
            return
        others = [p for p in list_checkpoints(self.folder.parent) if p != saved]
        for old in others[: max(len(others) - (self.total_limit - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
