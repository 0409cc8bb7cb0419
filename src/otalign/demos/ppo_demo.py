"""The main job (``make demo`` / ``otalign demo``): WPR vs the RKL baseline, trained and compared end to end.

On the embedded default model (SmolLM2-135M-Instruct), the built-in prompts and the built-in sentiment
reward: train PPO with the Wasserstein penalty (WPR) and with the reverse-KL penalty for a short run each,
then evaluate the reference and both policies on the held-out prompts with the same sampling seeds, and
write a report directory:

- ``report.json``: per method, mean reward (95% CI), win rate against the reference by the reward (95% CI),
  exact KL and entropic OT distance (difference transport) to the reference per token, settings and timings;
- ``frontier.png``: reward vs KL and reward vs OT distance, per method (with the training trajectories);
- ``samples.md``: the three models' answers side by side;
- ``wpr/`` and ``rkl/``: each run's ``metrics.jsonl`` and ``config.json``.

The defaults fit 10 minutes on 2 CPU cores: LoRA adapters on the policy, a value head on a frozen
backbone for the critic, short responses. Every field of :class:`DemoConfig` is a ``--key value`` option.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from otalign.config import MIXED_PRECISION, Config
from otalign.data import load_prompts, render_prompt
from otalign.eval.analysis.sampling import save_figure
from otalign.eval.policy import EvalResult, evaluate_policy
from otalign.generation import encode_prompts
from otalign.models import frozen_copy, load_causal_lm, load_tokenizer
from otalign.paths import write_text_atomically
from otalign.regularizers import build_regularizer
from otalign.rewards import build_reward
from otalign.runs import read_metrics
from otalign.trainers import PPOConfig, PPOTrainer

METHODS = {"wpr": "wasserstein", "rkl": "rkl"}

STUDIES = (
    "docs/results/ (wpr-vs-kl/README.md: WPR vs RKL; preference/README.md: DPO, IPO, OTPO, AOT, KTO; 3 seeds, "
    "intervals; regenerate with otalign sweep)"
)
"""Where the demo's summary points for evidence."""


@dataclass
class DemoConfig(Config):
    """Settings of the demo (defaults: 2 CPU cores, 10 minutes); evaluation uses ``seed + 1``."""

    out: str = field(default="reports/demo", metadata={"path": "output_dir", "help": "report directory"})
    model_name_or_path: str = field(
        default="default",
        metadata={"path": "model", "help": "policy/reference model ('default': the embedded SmolLM2-135M-Instruct)"},
    )
    max_steps: int = field(default=8, metadata={"help": "PPO steps per method", "check": ">= 1"})
    batch_size: int = field(default=8, metadata={"help": "rollouts per step", "check": ">= 1"})
    response_length: int = field(default=16, metadata={"help": "new tokens per response", "check": ">= 1"})
    learning_rate: float = field(
        default=3e-4, metadata={"help": "AdamW learning rate (of the LoRA adapters with use_peft)", "check": ">= 0"}
    )
    use_peft: bool = field(default=True, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2 r)", "check": ">= 1"})
    critic_freeze_backbone: bool = field(default=True, metadata={"help": "train only the critic's value head"})
    beta_wpr: float = field(default=0.05, metadata={"help": "penalty coefficient of WPR", "check": ">= 0"})
    beta_rkl: float = field(default=0.05, metadata={"help": "penalty coefficient of RKL", "check": ">= 0"})
    wpr_top_k: int = field(
        default=128, metadata={"help": "tokens of each distribution in the WPR support (paper: 128)", "check": ">= 1"}
    )
    eval_prompts: int = field(default=0, metadata={"help": "held-out prompts evaluated (0: all 40)", "check": ">= 0"})
    eval_batch_size: int = field(default=20, metadata={"help": "prompts per evaluation batch", "check": ">= 1"})
    mixed_precision: str = field(
        default="no", metadata={"help": "accelerate autocast (GPU)", "choices": MIXED_PRECISION}
    )
    seed: int = field(default=0, metadata={"help": "training seed", "check": "[0, 4294967295]"})
    time_budget_minutes: float = field(
        default=10.0, metadata={"help": "wall time the run announces and checks itself against", "check": "> 0"}
    )


class Clock:
    """Prints stage messages with the elapsed wall time against the budget."""

    def __init__(self, budget_minutes: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget_minutes * 60

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        print(f"[otalign demo {self.elapsed / 60:4.1f}/{self.budget / 60:.0f} min] {message}", flush=True)


def ppo_config(demo: DemoConfig, method: str) -> PPOConfig:
    """The PPO config of one method of the demo."""
    return PPOConfig(
        output_dir=str(Path(demo.out) / method),
        overwrite_output_dir=True,  # a rerun of the demo replaces its runs
        seed=demo.seed,
        max_steps=demo.max_steps,
        model_name_or_path=demo.model_name_or_path,
        per_device_train_batch_size=demo.batch_size,
        response_length=demo.response_length,
        learning_rate=demo.learning_rate,
        lr_scheduler_type="constant",
        use_peft=demo.use_peft,
        **({"lora_r": demo.lora_r, "lora_alpha": 2 * demo.lora_r} if demo.use_peft else {}),
        critic_freeze_backbone=demo.critic_freeze_backbone,
        regularizer=METHODS[method],
        beta=demo.beta_wpr if method == "wpr" else demo.beta_rkl,
        wpr_top_k=demo.wpr_top_k,
        mixed_precision=demo.mixed_precision,
        save_model=False,
    )


def run(demo: DemoConfig) -> dict:
    """Train, evaluate and write the report; returns the ``report.json`` content."""
    clock = Clock(demo.time_budget_minutes)
    out = Path(demo.out)
    out.mkdir(parents=True, exist_ok=True)
    clock.say(
        f"WPR vs RKL PPO on {demo.model_name_or_path!r}, built-in prompts, sentiment reward; "
        f"{demo.max_steps} steps x {demo.batch_size} rollouts per method; budget {demo.time_budget_minutes:.0f} min"
    )
    tokenizer = load_tokenizer(demo.model_name_or_path)
    base = load_causal_lm(demo.model_name_or_path)
    reference = frozen_copy(base)
    reward = build_reward("sentiment")
    train_prompts = load_prompts("builtin", "train")
    test_prompts = load_prompts("builtin", "test")
    if demo.eval_prompts:
        test_prompts = test_prompts[: demo.eval_prompts]
    clock.say(f"model loaded; {len(train_prompts)} training prompts, {len(test_prompts)} held-out prompts")

    policies, trainers = {}, {}
    for method in METHODS:
        clock.say(f"training {method.upper()} ({METHODS[method]} penalty)")
        trainer = PPOTrainer(
            ppo_config(demo, method),
            policy=copy.deepcopy(base),
            ref_model=reference,
            tokenizer=tokenizer,
            reward=reward,
            prompts=train_prompts,
        )
        history = trainer.train()
        last = history[-1]
        clock.say(
            f"{method.upper()} done: reward/mean {last['reward/mean']:.3f}, kl/exact {last['kl/exact']:.4f} "
            f"(first step: reward/mean {history[0]['reward/mean']:.3f})"
        )
        policies[method] = trainer.accelerator.unwrap_model(trainer.policy)
        trainers[method] = trainer

    clock.say(f"evaluating reference, WPR and RKL on {len(test_prompts)} held-out prompts")
    config = trainers["wpr"].config
    wpr = trainers["wpr"].regularizer  # the difference transport is 0 for the reference itself
    ot_regularizer = build_regularizer(
        "wasserstein", embeddings=wpr.embeddings, lam=wpr.lam, top_k=wpr.top_k, max_iter=wpr.max_iter
    )
    device = trainers["wpr"].accelerator.device
    texts = [render_prompt(p, tokenizer) for p in test_prompts]
    ids = encode_prompts(tokenizer, texts, max_prompt_length=config.max_prompt_length)
    models = {"reference": reference.to(device), **policies}
    results: dict[str, EvalResult] = {}
    for name, model in models.items():
        results[name] = evaluate_policy(
            model,
            reference,
            tokenizer,
            texts,
            ids,
            reward,
            params=config.sampling,
            seed=demo.seed + 1,
            batch_size=demo.eval_batch_size,
            ot_regularizer=ot_regularizer,
        )
        clock.say(f"  {name}: mean reward {sum(results[name].scores) / len(results[name].scores):.3f}")

    report = {
        "settings": asdict(demo),
        "methods": {
            name: {
                **res.summary(None if name == "reference" else results["reference"]),
                **({"regularizer": METHODS[name], "beta": trainers[name].beta} if name in METHODS else {}),
            }
            for name, res in results.items()
        },
        "notes": {
            "reward": "VADER compound sentiment of the response, in [-1, 1]",
            "ci95": "normal approximation, 1.96 standard errors over held-out prompts",
            "win_rate": "share of held-out prompts where the method's reward beats the reference's (ties 1/2)",
            "kl_per_token": "exact full-vocabulary KL(pi || pi_ref) in nats, averaged over generated tokens",
            "ot_per_token": "entropic OT distance to pi_ref (the policy's excess mass moved onto its deficit, lambda "
            "as in training, 0 for the reference; cost: Euclidean distance of the reference's token embeddings), "
            "per token",
            "distributions": f"softmax(logits / temperature), temperature {config.temperature}",
        },
    }
    write_text_atomically(out / "report.json", json.dumps(report, indent=2))
    write_samples(out / "samples.md", results)
    plot_frontier(out / "frontier.png", report, out)
    report["wall_time_s"] = clock.elapsed
    write_text_atomically(out / "report.json", json.dumps(report, indent=2))
    print_table(report)
    within = "within" if clock.elapsed <= clock.budget else "OVER"
    clock.say(f"report written to {out}/ (report.json, frontier.png, samples.md); {within} the time budget")
    clock.say(f"one seed and a few steps decide nothing: the seeded studies with intervals are in {STUDIES}")
    return report


def print_table(report: dict) -> None:
    """The per-method summary as a text table."""
    print(f"{'method':<10} {'reward':>16} {'win vs ref':>16} {'KL/token':>10} {'OT/token':>10}")
    for name, m in report["methods"].items():
        win = f"{m['win_rate']:.2f} ± {m['win_rate_ci95']:.2f}" if "win_rate" in m else "-"
        reward = f"{m['reward_mean']:.3f} ± {m['reward_ci95']:.3f}"
        print(
            f"{name:<10} {reward:>16} {win:>16} {m['kl_per_token']:>10.4f} {m.get('ot_per_token', float('nan')):>10.4f}"
        )


def write_samples(path: Path, results: dict[str, EvalResult]) -> None:
    """Markdown with each held-out prompt and the three models' answers (reward in brackets)."""
    names = list(results)
    first = results[names[0]]
    lines = ["# Held-out samples", "", "Same sampling seed per prompt for every model; reward in brackets.", ""]
    for i, prompt in enumerate(first.prompts):
        lines += [f"## Prompt {i + 1}", "", "```", prompt.strip(), "```", ""]
        for name in names:
            text = results[name].responses[i].strip().replace("\n", " ")
            lines.append(f"- **{name}** [{results[name].scores[i]:+.3f}]: {text}")
        lines.append("")
    write_text_atomically(path, "\n".join(lines))


def plot_frontier(path: Path, report: dict, out: Path) -> None:
    """Reward vs KL and reward vs OT distance: held-out points per method (95% CI) and training trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "black", "wpr": "tab:blue", "rkl": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "kl_per_token", "exact KL to reference (nats/token)"),
        (axes[1], "ot_per_token", "OT distance to reference (per token)"),
    ):
        for name, m in report["methods"].items():
            ax.errorbar(
                m[key],
                m["reward_mean"],
                yerr=m["reward_ci95"],
                fmt="o",
                color=colors.get(name),
                capsize=3,
                label=f"{name} (held-out)",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("mean reward (sentiment)")
        ax.grid(alpha=0.3)
    for method in METHODS:
        rows = read_metrics(out / method)
        axes[0].plot(
            [r["kl/exact"] for r in rows],
            [r["reward/mean"] for r in rows],
            "-",
            alpha=0.35,
            color=colors[method],
            label=f"{method} (training)",
        )
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("Reward vs distance to the reference: WPR vs RKL")
    save_figure(fig, path)


def main(demo: DemoConfig | None = None) -> int:
    torch.manual_seed(0)
    run(demo or DemoConfig())
    return 0
