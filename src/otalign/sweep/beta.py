"""Sensitivity to the penalty coefficient (the WPR paper's Figure 4): a grid of beta per regularizer.

One of the ``otalign analyze`` analyses (registered in :data:`otalign.eval.analysis.ANALYSES` below), it lives
with the sweep because it is one: a special case of ``otalign sweep``, run through the same code: one method per
regularizer, its ``betas`` as the method's grid, one seed. Every run starts from the same base PPO config
(``ppo_config`` file, then the ``ppo`` overrides) with only ``regularizer`` and ``beta`` changed; every trained
policy and the reference answer the same held-out prompts with the same sampling seeds. Besides the sweep's own
outputs (``results.json``, ``frontier.png``, one folder per run), it writes ``beta_sweep.json`` (per run: mean
reward and the win rate against the reference, ties one half, with 95% intervals over prompts) and
``beta_sweep.png`` (both against beta).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from otalign.config import Config, ConfigError
from otalign.data.prompts import PROMPT_SETS
from otalign.eval.analysis import ANALYSES
from otalign.eval.analysis.sampling import save_figure
from otalign.paths import write_text_atomically
from otalign.regularizers import REGULARIZERS

from .config import SweepConfig
from .run import run_sweep


@dataclass
class BetaSweepConfig(Config):
    """Settings of ``otalign analyze beta-sweep``."""

    output_dir: str = field(
        default="reports/beta-sweep",
        metadata={
            "path": "output_dir",
            "help": "beta_sweep.json, beta_sweep.png and one PPO run folder per (regularizer, beta)",
        },
    )
    ppo_config: str | None = field(default=None, metadata={"help": "YAML file with the base PPOConfig"})
    ppo: dict = field(
        default_factory=dict,
        metadata={"help": "PPOConfig overrides on top of ppo_config", "section": "otalign.trainers.ppo:PPOConfig"},
    )
    regularizers: list[str] = field(
        default_factory=lambda: ["rkl", "wasserstein"],
        metadata={"help": "regularizers of the grid", "choices": REGULARIZERS.names},
    )
    betas: list[float] = field(
        default_factory=lambda: [0.01, 0.05, 0.1], metadata={"help": "betas of the grid", "check": ">= 0"}
    )
    eval_prompts: str = field(
        default="builtin",
        metadata={"path": "data", "builtins": PROMPT_SETS, "help": "held-out prompts ('builtin' or a prompt dataset)"},
    )
    eval_split: str = field(default="test", metadata={"help": "split of the built-in prompts"})
    num_eval_prompts: int = field(
        default=40, metadata={"help": "prompts evaluated (seeded subsample)", "check": ">= 1"}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch", "check": ">= 1"})
    seed: int = field(default=0, metadata={"help": "evaluation sampling seed", "check": "[0, 4294967295]"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.regularizers or not self.betas:
            raise ConfigError("regularizers and betas must not be empty")

    def sweep(self):
        """The equivalent :class:`~otalign.sweep.SweepConfig` (``ConfigError`` names a bad ``ppo`` field)."""
        return SweepConfig(
            command="ppo",
            output_dir=self.output_dir,
            base_config=self.ppo_config,
            base=dict(self.ppo),
            methods={r: {"regularizer": r, "grid": {"beta": list(self.betas)}} for r in self.regularizers},
            seeds=[self.seed],
            eval_prompts=self.eval_prompts,
            eval_split=self.eval_split,
            num_eval_prompts=self.num_eval_prompts,
            eval_batch_size=self.eval_batch_size,
            eval_seed=self.seed,
            analyses=[],
        )


def run_beta_sweep(config: BetaSweepConfig) -> dict:
    """Train and evaluate every (regularizer, beta) as a sweep; write ``beta_sweep.json`` and ``beta_sweep.png``."""
    results = run_sweep(config.sweep())
    runs = [
        {
            "regularizer": c["method"],
            "beta": c["setting"]["beta"],
            "run_dir": str(Path(config.output_dir) / c["name"]),
            "reward_mean": c["reward"],
            "reward_ci95": c["reward_ci95_prompts"],
            "win_rate": c["win_rate"],
            "win_rate_ci95": c["win_rate_ci95_prompts"],
            "kl_per_token": c["kl_per_token"],
            "w_per_token": c["w_per_token"],
        }
        for c in results["cells"]
    ]
    ref = results["reference"]
    reference = {"reward_mean": ref["reward"], "reward_ci95": ref["reward_ci95_prompts"]}
    report = {"config": asdict(config), "reference": reference, "runs": runs}
    out = Path(config.output_dir)
    write_text_atomically(out / "beta_sweep.json", json.dumps(report, indent=2) + "\n")
    _plot(report, out / "beta_sweep.png")
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for regularizer in dict.fromkeys(r["regularizer"] for r in report["runs"]):
        runs = sorted((r for r in report["runs"] if r["regularizer"] == regularizer), key=lambda r: r["beta"])
        betas = [r["beta"] for r in runs]
        for ax, key in ((axes[0], "win_rate"), (axes[1], "reward_mean")):
            ci = "win_rate_ci95" if key == "win_rate" else "reward_ci95"
            values, errors = [r[key] for r in runs], [r[ci] for r in runs]
            ax.errorbar(betas, values, yerr=errors, marker="o", capsize=3, label=regularizer)
    axes[0].axhline(0.5, color="gray", linestyle=":")
    axes[1].axhline(report["reference"]["reward_mean"], color="gray", linestyle=":", label="reference")
    for ax, label in ((axes[0], "win rate vs reference"), (axes[1], "mean reward")):
        if all(r["beta"] > 0 for r in report["runs"]):
            ax.set_xscale("log")
        ax.set(xlabel="beta", ylabel=label)
        ax.legend()
    save_figure(fig, path)


ANALYSES.add(
    "beta-sweep",
    run_beta_sweep,
    help="PPO over a beta grid per regularizer: win rate and reward vs beta (Figure 4)",
    config=BetaSweepConfig,
)
