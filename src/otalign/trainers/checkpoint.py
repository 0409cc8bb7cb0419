"""Atomic checkpoints through accelerate: ``output_dir/checkpoints/checkpoint-<step>``.

:meth:`CheckpointManager.save` has every process write ``accelerator.save_state`` (models, optimizers,
per-process RNG states of Python/NumPy/torch/CUDA, and every object registered with
``accelerator.register_for_checkpointing`` such as the scheduler and :class:`TrainerState`) into a hidden
temporary folder; once all processes are done, the main process renames it into place. A crash mid-save
leaves only the temporary folder, which the next save removes: a ``checkpoint-<step>`` folder is always
complete.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PATTERN = re.compile(r"^checkpoint-(\d+)$")


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
    """Complete checkpoints under ``output_dir/checkpoints``, oldest step first."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointManager:
    """Saves and restores the full training state of an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (models/optimizers prepared, extra state registered).
        output_dir: run folder; checkpoints go to ``output_dir/checkpoints``.
        total_limit: keep at most this many checkpoints (oldest removed first); None keeps all.
    """

    def __init__(self, accelerator, output_dir: str | Path, total_limit: int | None = None) -> None:
        self.accelerator = accelerator
        self.folder = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def save(self, step: int) -> Path:
        """Write ``checkpoint-<step>`` atomically (all processes must call this); returns its path."""
        acc = self.accelerator
        final = self.folder / f"checkpoint-{step}"
        tmp = self.folder / f".tmp-checkpoint-{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=False)
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def load(self, path: str | Path) -> None:
        """Restore everything :meth:`save` wrote (all processes must call this)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.accelerator.load_state(str(path))

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for old in list_checkpoints(self.folder.parent)[: -self.total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
