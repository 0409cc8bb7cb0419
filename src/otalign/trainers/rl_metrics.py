"""The RL step's rollout metrics over all processes and its report of unconverged solves."""

from __future__ import annotations

import math
import warnings

import torch

from otalign.guard import ConvergenceError, ConvergenceWarning
from otalign.scoring import MAX_STATS

from . import ppo_math as pm
from .rollout_batch import ScoredRollout


def rollout_metrics(scored: ScoredRollout, beta: float, distance_stat: str, accelerator) -> dict[str, float]:
    """Rollout statistics over all processes (token means weighted by token counts), ``beta`` used this step and
    the measured distance ``regularizer/distance`` (the statistic ``distance_stat``) the adaptive beta steers."""
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
    message = (
        f"step {step}: Sinkhorn stopped at wpr_max_iter={c.wpr_max_iter} above wpr_tol={c.wpr_tol:g}, and "
        f"wpr_newton_steps={c.wpr_newton_steps} Newton steps did not finish, at {share:.1%} of the generated "
        f"positions (wpr_lambda={c.wpr_lambda:g}), so their penalties are approximate; raise wpr_max_iter, "
        "wpr_newton_steps or wpr_tol, or lower wpr_lambda"
    )
    if c.wpr_strict:
        raise ConvergenceError(message)
    if first and warn:
        message += " (warned once per run; sinkhorn/unconverged_frac has the share of every step)"
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
    return 1
