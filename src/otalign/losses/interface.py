r"""The preference loss-object interface: what a loss object takes and returns (:class:`LossOutput`, DPO's
:func:`implicit_rewards`), and how a trainer calls one (:func:`call_loss`).

A loss object (built-ins: :data:`otalign.losses.PREFERENCE_LOSSES`) is a callable with the attributes ``paired`` and
``needs_kl``, called as:

- ``paired = True``: ``loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``, the (n,) sequence
  log-probs (nats; token-weighted for OTPO) of n preference pairs;
- ``paired = False``: ``loss(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps)`` over n labelled
  completions (labels (n,) bool, True = desirable / chosen); the KL arguments are the log-probs of mismatched
  prompt/completion pairs when ``needs_kl`` is set, else None.

A loss that sets ``average_logps`` also takes ``chosen_lengths=``/``rejected_lengths=`` (pairwise; ``lengths=``
unpaired), the completions' (n,) token counts, to average the log-probs per token itself (TRL's IPO).

It returns a :class:`LossOutput`, or, as before it existed, a ``(loss, stats)`` tuple: :func:`call_loss` then
gives it DPO's implicit rewards :math:`\beta(\log\pi_\theta - \log\pi_{\mathrm{ref}})` of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    r"""DPO's implicit reward :math:`\beta(\log\pi_\theta(y|x) - \log\pi_{\mathrm{ref}}(y|x))`, detached.

    Args:
        policy_logps: (batch,) sequence log-probabilities under the policy, nats.
        ref_logps: (batch,) the same under the reference model.
        beta: scale of the reward (> 0).

    Returns:
        (batch,) rewards, no gradient (for metrics such as ``rewards/chosen``).
    """
    return beta * (policy_logps - ref_logps).detach()


@dataclass
class LossOutput:
    """One preference-loss evaluation.

    Attributes:
        loss: 0-dim tensor, with gradient.
        rewards: (N,) detached implicit rewards, one per completion in the order of the inputs (pairwise: the n
            chosen then the n rejected completions), from the summed (not per-token averaged) log-probs, nats
            scaled by beta; the trainer's ``rewards/*`` metrics.
        stats: extra scalar metrics (e.g. KTO's ``kto/z0``).
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def call_loss(
    loss,
    policy: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    *,
    pairs: int,
    lengths: torch.Tensor,
    beta: float,
    kl: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> LossOutput:
    """The loss object ``loss`` on N completions, called as its kind takes them (module docstring).

    Args:
        loss: a loss object.
        policy: (N,) sequence log-probs under the policy; paired data: the ``pairs`` chosen completions, then
            their rejected ones.
        ref: (N,) the same under the reference.
        labels: (N,) bool, True = chosen / desirable (what unpaired losses see).
        pairs: n, the number of pairs (pairwise losses need ``N = 2 n``).
        lengths: (N,) token counts of the completions (for losses that set ``average_logps``).
        beta: the implicit rewards' scale for a loss that returns only ``(loss, stats)``.
        kl: ``(policy_kl_logps, ref_kl_logps)`` for losses that set ``needs_kl``.
    """
    average = getattr(loss, "average_logps", False)
    if loss.paired:
        sizes = {"chosen_lengths": lengths[:pairs], "rejected_lengths": lengths[pairs:]} if average else {}
        result = loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], **sizes)
    else:
        result = loss(policy, ref, labels, *kl, **({"lengths": lengths} if average else {}))
    if isinstance(result, LossOutput):
        return result
    value, stats = result
    return LossOutput(value, implicit_rewards(policy, ref, beta), stats)


def per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(n,) sequence log-probs divided by the (n,) completion token counts ``lengths`` (at least 1)."""
    return logps / lengths.to(logps.dtype).clamp_min(1.0)
