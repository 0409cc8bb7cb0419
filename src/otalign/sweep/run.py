"""Running a sweep: the jobs (train a cell, evaluate it), the launcher that runs them, progress, markers.

Layout under ``output_dir``::

    reference/eval.json              the reference model on the held-out prompts
    <cell>/cell.json                 what the cell is (method, setting, seed, overrides), written first
    <cell>/config.json, metrics.jsonl, checkpoints/, model/     the trainer's own run folder
    <cell>/TRAINED                   written (atomically) once training finished and the model is saved
    <cell>/eval.json                 written (atomically) once the cell's evaluation finished
    results.json, frontier.png, ...  the aggregate (:mod:`otalign.sweep.aggregate`)

A rerun skips every cell with ``TRAINED`` and an ``eval.json`` made with the current evaluation settings; a cell
killed mid-training resumes from its latest checkpoint (every cell runs with ``resume: true``); one killed after
training only evaluates. Cells run through a :class:`Launcher`: :class:`SequentialLauncher` runs them one by one
in this process, :class:`RayLauncher` as parallel Ray tasks. Both call the same job function, :func:`run_job`,
which takes only picklable arguments and leaves all its results in the cell folder; this process only counts the
jobs as they finish and aggregates from the folders.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from otalign.config import ConfigError
from otalign.trainers.metrics import EVAL_PREFIX

from .config import Cell, SweepConfig, check_cells, trainer_classes
from .evaluate import EVAL_FILE, REFERENCE, eval_settings, evaluate_model, read_json, write_json_atomic

TRAINED = "TRAINED"
CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Job:
    """One unit of work: evaluate the reference (``cell`` None), or train and evaluate ``cell``."""

    cell: Cell | None

    @property
    def name(self) -> str:
        return REFERENCE if self.cell is None else self.cell.name


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
    from otalign.trainers import read_metrics

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


class Launcher(Protocol):
    """Runs jobs and reports each one finished through ``done(job, record)`` (in any order)."""

    def run(self, config: SweepConfig, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None: ...


class SequentialLauncher:
    """Every job in this process, one after the other, in grid order."""

    def run(self, config: SweepConfig, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
        for job in jobs:
            done(job, run_job(config, job))


RAY_MISSING = "--launcher ray needs ray: pip install 'otalign[cluster]'"


class RayLauncher:
    """Every job as one Ray task, all submitted at once, reported in the order they finish.

    The cluster is the one ``ray.init()`` finds: the address in ``RAY_ADDRESS``, else the cluster ``ray start`` last
    started on this machine, else a new local instance (stopped after the run; from a cluster, the run only
    disconnects). A Ray session the caller already initialised is used and left as it is. Each
    task reserves ``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs and sees only its own GPUs, none with 0
    (:func:`run_ray_job`), so Ray runs as many cells at once as the resources allow.
    Every node needs otalign installed and ``output_dir`` at the same path (a shared filesystem): the tasks write
    the cell folders, this process reads them to skip finished cells and to aggregate.

    Evaluation goes through Ray too: a cell's task evaluates the model it just trained (:func:`run_job`), on the
    cell's resources and node, so no model travels and this process needs neither a GPU nor a model. Every
    evaluation is the same wherever it runs (same prompts, per-prompt sampling seeds and W solver); each worker
    process builds the shared evaluation setup (reference, reward, solver) once. On the first failed job its error
    is raised and the jobs still queued or running are cancelled; a rerun resumes them from their checkpoints, as
    does a task Ray retries after its worker or node died. With nothing left to run, no cluster is started.

    Raises:
        ImportError: ray is not installed (:data:`RAY_MISSING`), when the launcher is built, before any job runs.
    """

    def __init__(self) -> None:
        try:
            import ray
        except ImportError as err:
            raise ImportError(RAY_MISSING) from err
        self.ray = ray

    def run(self, config: SweepConfig, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
        ray = self.ray
        if not jobs:
            return
        started = not ray.is_initialized()
        if started:
            ray.init()
        running: dict = {}
        try:
            task = ray.remote(run_ray_job).options(num_cpus=config.cpus_per_cell, num_gpus=config.gpus_per_cell)
            shared = ray.put(config)
            running = {task.remote(shared, job): job for job in jobs}
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                done(running.pop(ref), ray.get(ref))
        finally:
            for ref in running:
                ray.cancel(ref)
            if started:
                ray.shutdown()


def run_ray_job(config: SweepConfig, job: Job) -> dict:
    """:func:`run_job` in a Ray task, held to what the task reserved: as many torch threads as CPUs (Ray sets the
    task's ``OMP_NUM_THREADS``, but a reused worker process keeps the torch thread count it started with) and, with
    ``gpus_per_cell`` 0, no GPU (Ray leaves ``CUDA_VISIBLE_DEVICES`` as it is for a task reserving none, since
    2.4x, so the trainer would take GPU 0 of the node)."""
    import torch

    if not config.gpus_per_cell:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, int(config.cpus_per_cell)))
    return run_job(config, job)


LAUNCHERS: dict[str, Callable[[], Launcher]] = {"sequential": SequentialLauncher, "ray": RayLauncher}
"""``name -> launcher factory`` (the ``launcher`` field of the sweep file)."""


def run_sweep(config: SweepConfig) -> dict:
    """Run (or resume) every job of the sweep, then aggregate; with ``aggregate_only`` only aggregate.

    Returns:
        the ``results.json`` content (see :func:`otalign.sweep.aggregate.aggregate`).
    """
    from tqdm.auto import tqdm

    from .aggregate import aggregate

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
