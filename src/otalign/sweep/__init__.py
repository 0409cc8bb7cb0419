"""``otalign sweep``: a grid of training runs x seeds, one shared held-out evaluation, and the aggregate.

- :mod:`.config`: the sweep file (:class:`SweepConfig`), the trainer table (:data:`TRAINERS`), grid expansion;
- :mod:`.run`: cells as jobs, markers, resume, progress (:func:`run_sweep`);
- :mod:`.launchers`: what runs the jobs: one by one in this process, or as parallel Ray tasks;
- :mod:`.layout`: the files of a sweep's folder;
- :mod:`.evaluate`: every policy and the reference on the same prompts and sampling seeds, one W solver;
- :mod:`.aggregate`: intervals across seeds and prompts, frontiers, head-to-head at matched KL, the paper's
  analyses; rebuilt from the cell folders alone (``--aggregate_only``);
- :mod:`.beta`: ``otalign analyze beta-sweep``, a sweep over beta per regularizer (registered in
  :data:`otalign.eval.analysis.ANALYSES` from there).
"""

from __future__ import annotations

from .aggregate import aggregate
from .beta import BetaSweepConfig, run_beta_sweep
from .config import TRAINERS, Cell, SweepConfig, expand_grid, parse_sweep_config
from .launchers import LAUNCHERS, Launcher, RayLauncher, SequentialLauncher
from .run import Job, run_job, run_sweep

__all__ = [
    "LAUNCHERS",
    "TRAINERS",
    "BetaSweepConfig",
    "Cell",
    "Job",
    "Launcher",
    "RayLauncher",
    "SequentialLauncher",
    "SweepConfig",
    "aggregate",
    "expand_grid",
    "parse_sweep_config",
    "run_beta_sweep",
    "run_job",
    "run_sweep",
]
