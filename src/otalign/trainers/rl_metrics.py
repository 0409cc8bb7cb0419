"""The RL step's rollout metrics over all processes and its report of unconverged solves."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from otalign.generation import Rollout
from otalign.guard import ConvergenceError, ConvergenceWarning
from otalign.scoring import MAX_STATS

from . import ppo_math as pm
from .rollout_batch import ScoredRollout


def global_max(x: torch.Tensor, accelerator) -> float:
    """The largest entry of ``x`` over all processes."""
    t = x.max().double()
    return float(accelerator.reduce(t, reduction="max") if accelerator.num_processes > 1 else t)


def ended_with_eos(rollout: Rollout, eos_token_id: int | None) -> torch.Tensor:
    """(B,) bool: whether each response sampled EOS (False for all without an EOS id); the others were cut at
    ``response_length`` (TRL's truncated completions: sampling stops at EOS only)."""
    mask = rollout.response_mask
    if eos_token_id is None:
        return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    return (rollout.responses == eos_token_id).logical_and(mask).any(1)


def completion_metrics(scored: ScoredRollout, eos_token_id: int | None, accelerator) -> dict[str, float]:
    """TRL's ``completions/*`` over all processes: mean, min and max response length (generated tokens, EOS
    included), ``clipped_ratio`` (share of responses without EOS, cut at ``response_length``) and the same lengths
    over the responses that ended with EOS (0 when none did)."""
    acc, mask = accelerator, scored.mask
    lengths = mask.sum(1).double()
    ended = ended_with_eos(scored.rollout, eos_token_id)
    every = torch.ones_like(ended)
    terminated = torch.where(ended, lengths, torch.zeros_like(lengths))
    huge = torch.full_like(lengths, float("inf"))
    count = float(pm.global_sum(ended.sum(), acc))
    return {
        "completions/mean_length": float(pm.masked_mean(lengths, every, acc)),
        "completions/min_length": -global_max(-lengths, acc),
        "completions/max_length": global_max(lengths, acc),
        "completions/clipped_ratio": 1.0 - count / float(pm.global_sum(every.sum(), acc)),
        "completions/mean_terminated_length": float(pm.masked_mean(lengths, ended, acc)),
        "completions/min_terminated_length": -global_max(-torch.where(ended, lengths, huge), acc) if count else 0.0,
        "completions/max_terminated_length": global_max(terminated, acc),
    }


def rollout_metrics(
    scored: ScoredRollout, beta: float, distance_stat: str, accelerator, eos_token_id: int | None = None
) -> dict[str, float]:
    """Rollout statistics over all processes (token means weighted by token counts), ``beta`` used this step and
    the measured distance ``regularizer/distance`` (the statistic ``distance_stat``) the adaptive beta steers.

    Also under TRL's ``GRPOTrainer`` names: ``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std`` (each
    reward function's raw scores), ``entropy`` (the rollout policy's, tempered, per token) and
    :func:`completion_metrics`."""
    acc, mask = accelerator, scored.mask
    scores, penalty = scored.scores, scored.penalty
    rows = torch.ones_like(scores, dtype=torch.bool)

    def batch_mean(x: torch.Tensor) -> float:
        return float(pm.masked_mean(x, rows, acc))

    def token_mean(x: torch.Tensor) -> float:
        return float(pm.masked_mean(x, mask, acc))

    tokens = float(pm.global_sum(mask.sum(), acc))
    metrics = {
        "reward/mean": batch_mean(scores),
        "reward/std": math.sqrt(float(pm.masked_var(scores, rows, acc))),
        "reward/total": batch_mean(scores - beta * (penalty.per_token * mask).sum(1)),
        **{f"reward/{name}": batch_mean(values) for name, values in scored.components.items()},
        "penalty/mean": token_mean(penalty.per_token),
        "kl/exact": token_mean(scored.kl),
        "kl/exact_seq": batch_mean((scored.kl * mask).sum(1)),
        "policy/entropy": token_mean(scored.entropy),
        "response/length": batch_mean(mask.sum(1).float()),
    }
    metrics.update(
        {
            "reward": metrics["reward/mean"],
            "reward_std": metrics["reward/std"],
            "entropy": metrics["policy/entropy"],
            **completion_metrics(scored, eos_token_id, acc),
        }
    )
    for name, values in scored.components.items():
        metrics[f"rewards/{name}/mean"] = metrics[f"reward/{name}"]
        metrics[f"rewards/{name}/std"] = math.sqrt(float(pm.masked_var(values, rows, acc)))
    local_tokens = float(mask.sum())
    for name, value in penalty.stats.items():
        if name in ("penalty/mean", "kl/exact"):
            continue
        if name in MAX_STATS:
            t = torch.tensor(float(value), device=mask.device)
            metrics[name] = float(acc.reduce(t, reduction="max") if acc.num_processes > 1 else t)
        else:
            metrics[name] = float(pm.global_sum(torch.tensor(value * local_tokens), acc)) / max(tokens, 1)
    metrics["beta"] = beta
    metrics["regularizer/distance"] = metrics.get(distance_stat, metrics["penalty/mean"])
    return metrics


def report_convergence(step: int, metrics: dict[str, float], config, *, first: bool, warn: bool) -> int:
    """1 if the step's solves did not all converge (``sinkhorn/unconverged_frac`` > 0, the same on every process),
    else 0; the run's first such step warns (:class:`~otalign.guard.ConvergenceWarning`) where ``warn``.

    Raises:
        ConvergenceError: with ``config.wpr_strict``.
    """
    share = metrics.get("sinkhorn/unconverged_frac", 0.0)
    if not share > 0:
        return 0
    c = config
    full = c.wpr_transport == "full"  # the full transport runs no Newton steps
    newton = "" if full else f", and wpr_newton_steps={c.wpr_newton_steps} Newton steps did not finish"
    knobs = "wpr_max_iter or wpr_tol (the full transport runs no Newton steps)" if full else "wpr_max_iter, "
    knobs += "" if full else "wpr_newton_steps or wpr_tol"
    message = (
        f"step {step}: Sinkhorn stopped at wpr_max_iter={c.wpr_max_iter} above wpr_tol={c.wpr_tol:g}{newton}, at "
        f"{share:.1%} of the generated positions (wpr_lambda={c.wpr_lambda:g}), so their penalties are approximate; "
        f"raise {knobs}, or lower wpr_lambda"
    )
    if c.wpr_strict:
        raise ConvergenceError(message + " (stopped by --wpr_strict)")
    if first and warn:
        message += (
            "; --wpr_strict true stops the run instead (warned once per run; sinkhorn/unconverged_frac has the share "
            "of every step)"
        )
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return 1


COMPLETIONS_FILE = "completions.jsonl"
"""``log_completions``: the logged steps' samples in the run folder, one JSON line per response."""


def completion_rows(step: int, rollout: Rollout, components: dict[str, torch.Tensor], advantages: torch.Tensor):
    """TRL's ``log_completions`` table of one rollout as rows: ``step``, ``prompt`` (as the model saw it, chat
    template applied), ``completion`` (decoded, special tokens left out), each reward function's raw score under its
    name, and the response's ``advantage`` (``advantages`` (B,))."""
    scores = {name: values.tolist() for name, values in components.items()}
    return [
        {
            "step": step,
            "prompt": prompt,
            "completion": completion,
            **{name: values[i] for name, values in scores.items()},
            "advantage": float(advantages[i]),
        }
        for i, (prompt, completion) in enumerate(zip(rollout.prompt_texts, rollout.response_texts, strict=True))
    ]


class CompletionLog:
    """``<output_dir>/completions.jsonl`` (:data:`COMPLETIONS_FILE`), written by the main process: rows of
    :func:`completion_rows` appended at each logged step; on resume the rows after the checkpoint's step are dropped
    (a fresh run drops all), so the file reads as an uninterrupted run's."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / COMPLETIONS_FILE

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps up to ``step`` (0: none)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and _step_of(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)

    def append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))


def _step_of(line: str) -> float:
    """The step of a completions.jsonl line; a torn last line (a run killed while writing) counts as past every
    step, so truncation drops it."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
