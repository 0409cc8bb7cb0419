"""``otalign sweep``: a grid of training runs x seeds, one shared held-out evaluation, and the aggregate.

- :mod:`.config`: the sweep file (:class:`SweepConfig`), the trainer table (:data:`TRAINERS`), grid expansion;
- :mod:`.run`: cells as jobs, the launchers (sequential, Ray), markers, resume, progress (:func:`run_sweep`);
- :mod:`.evaluate`: every policy and the reference on the same prompts and sampling seeds, one W solver;
- :mod:`.aggregate`: intervals across seeds and prompts, frontiers, head-to-head at matched KL, the paper's
  analyses; rebuilt from the cell folders alone (``--aggregate_only``).
"""

from __future__ import annotations

from .aggregate import aggregate
from .config import TRAINERS, Cell, SweepConfig, expand_grid, parse_sweep_config
from .run import LAUNCHERS, Job, Launcher, RayLauncher, SequentialLauncher, run_job, run_sweep

__all__ = [
    "LAUNCHERS",
    "TRAINERS",
    "Cell",
    "Job",
    "Launcher",
    "RayLauncher",
    "SequentialLauncher",
    "SweepConfig",
    "aggregate",
    "expand_grid",
    "parse_sweep_config",
    "run_job",
    "run_sweep",
]
