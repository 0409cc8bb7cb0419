"""The preference trainer's metrics: per-example records of a micro-batch, and TRL's metric names from them."""

from __future__ import annotations

import torch


def example_records(
    rewards: torch.Tensor,
    logps: torch.Tensor,
    labels: torch.Tensor,
    logit_sums: torch.Tensor,
    tokens: torch.Tensor,
    pairs: int,
) -> dict[str, torch.Tensor]:
    """Per-example records of N completions, for :func:`summarize`.

    Args:
        rewards: (N,) implicit rewards (the loss's :attr:`~otalign.losses.LossOutput.rewards`), detached.
        logps: (N,) unweighted sequence log-probs under the policy, detached.
        labels: (N,) bool, True = chosen / desirable.
        logit_sums: (N,) as :func:`~otalign.trainers.preference_batch.completion_logps`.
        tokens: (N,) completion token counts.
        pairs: n > 0 when the N = 2 n completions are n pairs (chosen, then rejected): adds ``correct``, (n,) 1.0
            where the chosen completion's reward beats the rejected one's; 0 for labelled completions.
    """
    record = {"rewards": rewards, "logps": logps, "labels": labels.float(), "logit_sums": logit_sums}
    record["tokens"] = tokens.float()
    if pairs:
        record["correct"] = (rewards[:pairs] > rewards[pairs:]).float()
    return record


def otpo_records(
    chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-pair (n,) OTPO weight statistics, for :func:`summarize`: sums, token counts, extremes, and the
    weight on the shorter response (``otpo_unequal`` marks pairs whose lengths differ)."""
    weights = torch.cat([chosen_weights, rejected_weights], dim=1)
    mask = torch.cat([chosen_mask, rejected_mask], dim=1)
    chosen_sum, rejected_sum = chosen_weights.sum(1), rejected_weights.sum(1)
    chosen_len, rejected_len = chosen_mask.sum(1), rejected_mask.sum(1)
    return {
        "otpo_sum": chosen_sum + rejected_sum,
        "otpo_count": mask.sum(1).float(),
        "otpo_min": weights.masked_fill(~mask, float("inf")).amin(1),
        "otpo_max": weights.masked_fill(~mask, float("-inf")).amax(1),
        "otpo_shorter": torch.where(chosen_len < rejected_len, chosen_sum, rejected_sum),
        "otpo_unequal": (chosen_len != rejected_len).float(),
    }


def summarize(records: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics with TRL's names from per-example records gathered over the batch.

    ``rewards``/``logps``/``labels``/``logit_sums``/``tokens``: (N,) per completion (label 1.0 = chosen /
    desirable; ``logit_sums`` and ``tokens`` as :func:`~otalign.trainers.preference_batch.completion_logps` and the
    completion's token count); ``correct``: (n,) per pair; ``otpo_*``: (n,) per pair (:func:`otpo_records`).
    Returns ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (difference of the means, = mean pair
    margin), ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (mean logit over the
    vocabulary and the completion tokens of the side, token-weighted over the batch), and when present
    ``rewards/accuracies`` and ``otpo/weight_mean``, ``otpo/weight_min``, ``otpo/weight_max``,
    ``otpo/shorter_share`` (share of the total weight of unequal-length pairs that is on the shorter response; 0.5
    when both sides are normalized to tau).
    """
    labels, rewards, logps = records["labels"] > 0.5, records["rewards"].float(), records["logps"].float()
    chosen, rejected = rewards[labels].mean(), rewards[~labels].mean()
    metrics = {
        "rewards/chosen": float(chosen),
        "rewards/rejected": float(rejected),
        "rewards/margins": float(chosen - rejected),
        "logps/chosen": float(logps[labels].mean()),
        "logps/rejected": float(logps[~labels].mean()),
        "logits/chosen": float(records["logit_sums"][labels].sum() / records["tokens"][labels].sum()),
        "logits/rejected": float(records["logit_sums"][~labels].sum() / records["tokens"][~labels].sum()),
    }
    if "correct" in records:
        metrics["rewards/accuracies"] = float(records["correct"].mean())
    if "otpo_sum" in records:
        unequal = records["otpo_unequal"] > 0
        metrics["otpo/weight_mean"] = float(records["otpo_sum"].sum() / records["otpo_count"].sum())
        metrics["otpo/weight_min"] = float(records["otpo_min"].min())
        metrics["otpo/weight_max"] = float(records["otpo_max"].max())
        if unequal.any():
            share = records["otpo_shorter"][unequal].sum() / records["otpo_sum"][unequal].sum()
            metrics["otpo/shorter_share"] = float(share)
    return metrics
