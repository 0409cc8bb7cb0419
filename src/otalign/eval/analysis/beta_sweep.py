"""Sensitivity to the penalty coefficient (the WPR paper's Figure 4): a grid of beta per regularizer, each a PPO
run through :class:`~otalign.trainers.PPOTrainer`, evaluated on held-out prompts against the reference.

Every run starts from the same base PPO config (``ppo_config`` file, then the ``ppo`` overrides) with only
``regularizer`` and ``beta`` changed. Each trained policy and the reference answer the same held-out prompts
with the same sampling seeds (:func:`~otalign.trainers.evaluation.evaluate_policy`); reported per run: mean
reward and the win rate against the reference by the run's reward (ties count one half), with 95% intervals.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from otalign.config import Config, ConfigError, check_section
from otalign.regularizers import REGULARIZERS

from ..winrate import subsample
from .sampling import save_figure


@dataclass
class BetaSweepConfig(Config):
    """Settings of ``otalign analyze beta-sweep``."""

    output_dir: str = field(
        default="reports/beta-sweep",
        metadata={"help": "beta_sweep.json, beta_sweep.png and one PPO run folder per (regularizer, beta)"},
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
    eval_prompts: str = field(default="builtin", metadata={"help": "held-out prompts ('builtin' or a file)"})
    eval_split: str = field(default="test", metadata={"help": "split of the built-in prompts"})
    num_eval_prompts: int = field(
        default=40, metadata={"help": "prompts evaluated (seeded subsample)", "check": ">= 1"}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch", "check": ">= 1"})
    seed: int = field(default=0, metadata={"help": "evaluation sampling seed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.regularizers or not self.betas:
            raise ConfigError("regularizers and betas must not be empty")

    def base_ppo(self):
        """The base PPOConfig: the file, then the ``ppo`` overrides (checked and converted like the file's)."""
        from otalign.trainers import PPOConfig, parse_config

        base = parse_config(PPOConfig, self.ppo_config)
        return dataclasses.replace(base, **check_section(PPOConfig, self.ppo, "ppo"))


def run_beta_sweep(config: BetaSweepConfig) -> dict:
    """Train and evaluate every (regularizer, beta); write ``beta_sweep.json`` and ``beta_sweep.png``."""
    from otalign.data import load_prompts

    out = Path(config.output_dir)
    base = config.base_ppo()
    prompts = load_prompts(config.eval_prompts, config.eval_split)
    prompts = [prompts[i] for i in subsample(len(prompts), config.num_eval_prompts, np.random.default_rng(config.seed))]
    runs, reference = [], None
    for regularizer in config.regularizers:
        for beta in config.betas:
            run_dir = out / f"{regularizer}-beta{beta:g}"
            ppo = dataclasses.replace(
                base,
                regularizer=regularizer,
                beta=beta,
                output_dir=str(run_dir),
                overwrite_output_dir=not base.resume,  # a rerun of the sweep replaces its runs
                save_model=False,
                progress_bar=False,
            )
            result, reference = train_and_evaluate(ppo, prompts, config, reference)
            runs.append({"regularizer": regularizer, "beta": beta, "run_dir": str(run_dir)})
            runs[-1].update(result.summary(reference))
            print(
                f"{regularizer} beta={beta:g}: reward {result.summary()['reward_mean']:.3f}, "
                f"win rate vs reference {runs[-1]['win_rate']:.3f}"
            )
    report = {"config": asdict(config), "reference": reference.summary(), "runs": runs}
    (out / "beta_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "beta_sweep.png")
    return report


def train_and_evaluate(ppo, prompts: list, config: BetaSweepConfig, reference=None):
    """Train one PPO run; ``(policy's EvalResult, reference's EvalResult)`` on ``prompts`` (the reference is
    evaluated only when ``reference`` is None: every run starts from the same model)."""
    from otalign.data import render_prompt
    from otalign.generation import encode_prompts
    from otalign.trainers import PPOTrainer
    from otalign.trainers.evaluation import evaluate_policy

    trainer = PPOTrainer(ppo)
    trainer.train()
    texts = [render_prompt(p, trainer.tokenizer, use_chat_template=ppo.use_chat_template) for p in prompts]
    ids = encode_prompts(trainer.tokenizer, texts, max_prompt_length=ppo.max_prompt_length)
    models = [trainer.accelerator.unwrap_model(trainer.policy)] + ([trainer.ref_model] if reference is None else [])
    results = [
        evaluate_policy(
            model,
            trainer.ref_model,
            trainer.tokenizer,
            texts,
            ids,
            trainer.reward,
            params=ppo.sampling,
            seed=config.seed,
            batch_size=config.eval_batch_size,
        )
        for model in models
    ]
    return results[0], reference if reference is not None else results[1]


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
