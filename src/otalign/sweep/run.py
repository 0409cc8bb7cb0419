"""Running a sweep: the jobs (train a cell, evaluate it), the launcher that runs them, progress, markers.

The folder layout is :mod:`otalign.sweep.layout`.

A rerun skips every cell with ``TRAINED`` and an ``eval.json`` made with the current evaluation settings; a cell
killed mid-training resumes from its latest checkpoint (every cell runs with ``resume: true``); one killed after
training only evaluates. Cells run through a launcher (:mod:`otalign.sweep.launchers`): one by one in this process, or
as parallel Ray tasks. Both call the same job function, :func:`run_job`, which takes only picklable arguments and
leaves all its results in the cell folder; this process only counts the jobs as they finish and aggregates from the
folders.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otalign.config import ConfigError
from otalign.runs import EVAL_PREFIX, read_metrics

from .aggregate import aggregate
from .config import Cell, SweepConfig, check_cells, trainer_classes
from .evaluate import eval_settings, evaluate_model
from .launchers import LAUNCHERS
from .layout import CELL_FILE, EVAL_FILE, REFERENCE, TRAINED, read_json, write_json_atomic


@dataclass(frozen=True)
class Job:
    """One unit of work: evaluate the reference (``cell`` None), or train and evaluate ``cell``."""

    cell: Cell | None

    @property
    def name(self) -> str:
        return REFERENCE if self.cell is None else self.cell.name

    def run(self, config: SweepConfig) -> dict:
        """:func:`run_job` of this job (what a launcher calls, wherever it runs)."""
        return run_job(config, self)


def cell_folder(config: SweepConfig, job: Job) -> Path:
    return Path(config.output_dir) / job.name


def is_done(config: SweepConfig, job: Job) -> bool:
    """Trained (for a cell) and evaluated with the current evaluation settings."""
    folder = cell_folder(config, job)
    if job.cell is not None and not (folder / TRAINED).is_file():
        return False
    done = read_json(folder / EVAL_FILE)
    return done is not None and done.get("settings") == eval_settings(config)


IGNORED_CHANGES = (
    "resume",
    "resume_from_checkpoint",
    "progress_bar",
    "report_to",
    "logging_steps",
    "save_steps",
    "save_total_limit",
)
"""Config fields a cell may change between runs (they do not change what it trains)."""


def check_unchanged(config: SweepConfig, cells: Sequence[Cell]) -> None:
    """``ConfigError`` when a cell folder was started with other settings than the cell has now (the folder's
    ``config.json``, written by the trainer), naming the cell and the first field that differs. A field the
    folder's config lacks (added to otalign since) counts as unchanged while it keeps its default."""
    for cell in cells:
        started = read_json(Path(config.output_dir) / cell.name / "config.json")
        if started is None:
            continue
        cell_config = config.cell_config(cell)
        now = json.loads(json.dumps(cell_config.to_dict()))
        defaults = json.loads(json.dumps(type(cell_config)().to_dict()))
        for key in now:
            if key not in started and now[key] == defaults.get(key):
                continue
            if key == "max_steps" and now.get("num_train_epochs") is not None:
                continue  # the trainer derived it from the epochs (count_examples) and recorded that
            if key not in IGNORED_CHANGES and started.get(key) != now[key]:
                raise ConfigError(
                    f"cell {cell.name} was started with {key}={started.get(key)!r}, the sweep now sets {now[key]!r}: "
                    "restore the setting, or delete the cell's folder to train it again"
                )


def train_cell(config: SweepConfig, cell: Cell) -> dict:
    """Train ``cell`` unless its ``TRAINED`` marker exists (resuming from its latest checkpoint); returns the
    marker's content: the last logged training metrics, the trainer's own held-out metrics (``eval_...``, e.g. a
    preference trainer's pair accuracy on ``eval_dataset_name``), the summed step time (``train_s``, wall clock,
    all steps) and the wall and CPU seconds of the session that finished it (``session_*_s``, setup included; on
    a shared machine the CPU time is what the run costs)."""
    folder = Path(config.output_dir) / cell.name
    marker = read_json(folder / TRAINED)
    if marker is not None:
        return marker
    cell_config = config.cell_config(cell)
    write_json_atomic(
        folder / CELL_FILE,
        {
            "name": cell.name,
            "command": config.command,
            "method": cell.method,
            "setting": cell.setting,
            "setting_name": cell.setting_name,
            "seed": cell.seed,
            "overrides": cell.overrides,
        },
    )
    _, trainer_cls = trainer_classes(config.command)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer = trainer_cls(cell_config)
    trainer.train()
    del trainer
    gc.collect()
    logged = read_metrics(folder)
    rows = [r for r in logged if "time/step" in r]
    marker = {
        "eval_metrics": next((r for r in reversed(logged) if any(k.startswith(EVAL_PREFIX) for k in r)), {}),
        "steps": cell_config.max_steps,
        "train_s": sum(r["time/step"] for r in rows),
        "session_wall_s": time.perf_counter() - wall,
        "session_cpu_s": time.process_time() - cpu,
        "last_metrics": rows[-1] if rows else {},
    }
    if not config.keep_checkpoints:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    write_json_atomic(folder / TRAINED, marker)
    return marker


def run_job(config: SweepConfig, job: Job) -> dict:
    """Do what is left of ``job``: train (cells), then evaluate; returns the evaluation's record."""
    folder = cell_folder(config, job)
    if job.cell is None:
        return evaluate_model(config, folder, None)
    train_cell(config, job.cell)
    return evaluate_model(config, folder, folder / "model")


def run_sweep(config: SweepConfig) -> dict:
    """Run (or resume) every job of the sweep, then aggregate; with ``aggregate_only`` only aggregate.

    Returns:
        the ``results.json`` content (see :func:`otalign.sweep.aggregate.aggregate`).
    """
    from tqdm.auto import tqdm

    if config.aggregate_only:
        return aggregate(config)
    cells = check_cells(config)  # every cell's config is checked before anything trains
    check_unchanged(config, cells)
    launcher = LAUNCHERS[config.launcher]()
    jobs = [Job(None)] + [Job(cell) for cell in cells]
    pending = [job for job in jobs if not is_done(config, job)]
    finished = len(jobs) - len(pending)
    print(
        f"[otalign] sweep: {len(cells)} cells ({len(config.method_specs)} methods x settings x {len(config.seeds)} "
        f"seeds) + the reference in {config.output_dir}; {finished} of {len(jobs)} already done",
        flush=True,
    )
    bar = tqdm(total=len(jobs), initial=finished, desc="sweep", unit="job", dynamic_ncols=True)
    start = time.perf_counter()

    def done(job: Job, record: dict) -> None:
        bar.update(1)
        s = record["summary"]
        bar.write(
            f"[otalign] sweep: {job.name} done ({bar.n}/{len(jobs)}, {(time.perf_counter() - start) / 60:.1f} min): "
            f"reward {s['reward_mean']:.3f} ± {s['reward_ci95']:.3f}, KL {s['kl_per_token']:.4f}/token, "
            f"W {s.get('ot_per_token', float('nan')):.4f}/token"
        )

    try:
        launcher.run(config, pending, done)
    finally:
        bar.close()
    return aggregate(config)
