"""Launchers of a sweep's jobs: one by one in this process, or as parallel Ray tasks.

A launcher runs jobs and reports each finished one; what a job does is :meth:`otalign.sweep.run.Job.run`, which
takes only picklable arguments and leaves all its results in the cell folder, so a launcher needs nothing else of
the sweep. Another launcher (a cluster queue) is a class with :meth:`Launcher.run` and one entry in
:data:`LAUNCHERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol


class Job(Protocol):
    """What a launcher runs (a :class:`otalign.sweep.run.Job`): picklable, named, run by ``job.run(config)``."""

    name: str

    def run(self, config) -> dict: ...


class Launcher(Protocol):
    """Runs jobs and reports each one finished through ``done(job, record)`` (in any order)."""

    def run(self, config, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
        """Run ``jobs`` of the sweep ``config`` (a :class:`~otalign.sweep.SweepConfig`)."""


class SequentialLauncher:
    """Every job in this process, one after the other, in grid order."""

    def run(self, config, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
        for job in jobs:
            done(job, job.run(config))


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

    Evaluation goes through Ray too: a cell's task evaluates the model it just trained (``job.run``), on the
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

    def run(self, config, jobs: Sequence[Job], done: Callable[[Job, dict], None]) -> None:
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


def run_ray_job(config, job: Job) -> dict:
    """``job.run(config)`` (:func:`otalign.sweep.run.run_job`) in a Ray task, held to what the task reserved: as
    many torch threads as CPUs (Ray sets the task's ``OMP_NUM_THREADS``, but a reused worker process keeps the
    torch thread count it started with) and, with ``gpus_per_cell`` 0, no GPU (Ray leaves ``CUDA_VISIBLE_DEVICES``
    as it is for a task reserving none, since 2.4x, so the trainer would take GPU 0 of the node)."""
    import torch

    if not config.gpus_per_cell:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, int(config.cpus_per_cell)))
    return job.run(config)


LAUNCHERS: dict[str, Callable[[], Launcher]] = {"sequential": SequentialLauncher, "ray": RayLauncher}
"""``name -> launcher factory`` (the ``launcher`` field of the sweep file)."""
