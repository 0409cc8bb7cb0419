r"""DPO-family pairwise losses: DPO (sigmoid), IPO, hinge and robust DPO.

All inputs are sequence log-probabilities :math:`\log\pi(y|x)` in nats, shape (batch,), float32
(or float64). With the margin

.. math::
    m_i = \big(\log\pi_\theta(y^+_i|x_i) - \log\pi_\theta(y^-_i|x_i)\big)
        - \big(\log\pi_{\mathrm{ref}}(y^+_i|x_i) - \log\pi_{\mathrm{ref}}(y^-_i|x_i)\big)

the per-example losses follow TRL's ``DPOTrainer`` conventions:

- ``sigmoid`` (Rafailov et al. 2023): :math:`-\log\sigma(\beta m)` (no label smoothing: as ``otalign dpo``, which
  refuses ``--label_smoothing`` for it; ``robust`` is the loss for flipped labels);
- ``ipo`` (Azar et al. 2024): :math:`(m - 1/(2\beta))^2`. The IPO paper and TRL use
  length-averaged log-probabilities here; pass those if you want that variant;
- ``hinge`` (SLiC, Zhao et al. 2023): :math:`\max(0, 1 - \beta m)`;
- ``robust`` (Chowdhury et al. 2024; TRL's ``robust``), unbiased under label flips of probability s:
  :math:`\big(-(1-s)\log\sigma(\beta m) + s\log\sigma(-\beta m)\big)/(1-2s)`.

:class:`DPOFamilyLoss` binds :func:`dpo_loss` to config values as a loss object
(:mod:`otalign.losses.interface`).

Token-weighted log-probabilities (OTPO, :func:`otalign.losses.sequence_logps`) plug in unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._validation import check_choice, check_positive, check_vectors, reduce
from .interface import LossOutput, implicit_rewards, per_token

DPO_KINDS = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO, IPO, hinge or robust DPO loss of a batch of preference pairs (equations in the module docstring).

    Args:
        policy_chosen_logps: (batch,) :math:`\\log\\pi_\\theta(y^+|x)`, nats.
        policy_rejected_logps: (batch,) :math:`\\log\\pi_\\theta(y^-|x)`.
        ref_chosen_logps: (batch,) :math:`\\log\\pi_{ref}(y^+|x)`.
        ref_rejected_logps: (batch,) :math:`\\log\\pi_{ref}(y^-|x)`.
        beta: inverse temperature (> 0); for IPO the regularization strength (target margin 1/(2 beta)).
        kind: ``"sigmoid"``, ``"ipo"``, ``"hinge"`` or ``"robust"``.
        label_smoothing: probability s in [0, 0.5) that a label is flipped (the unbiased estimate of ``robust``);
            ``robust`` only, as ``otalign dpo --label_smoothing``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` for the per-example losses (batch,).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the reduced loss, and the detached implicit
        rewards ``beta * (policy - ref)`` of the chosen and rejected responses, each (batch,).
    """
    check_vectors(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    beta = check_positive("beta", beta)
    check_choice("kind", kind, DPO_KINDS)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and kind != "robust":
        raise ValueError(f"label_smoothing applies to kind 'robust' only (as the CLI's), got kind={kind!r}")

    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif kind == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        losses = F.relu(1.0 - beta * margin)
    else:
        clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin)
        flipped = -label_smoothing * F.logsigmoid(-beta * margin)
        losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    return (
        reduce(losses, reduction),
        implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
        implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta),
    )


@dataclass
class DPOFamilyLoss:
    """Loss object (:mod:`otalign.losses.interface`) of the pairwise ``kind``: :func:`dpo_loss` at ``beta``.

    ``average_logps``: given ``chosen_lengths``/``rejected_lengths`` (the completions' token counts), the loss sees
    each sequence log-prob (policy and reference) divided by its token count (TRL's IPO); the rewards stay those of
    the summed log-probs, as TRL's metrics. Without the lengths the inputs are used as given.
    """

    kind: str
    beta: float
    label_smoothing: float = 0.0
    average_logps: bool = False
    paired = True
    needs_kl = False

    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        *,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> LossOutput:
        logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        averaged = self.average_logps and chosen_lengths is not None
        if averaged:
            sides = (chosen_lengths, rejected_lengths, chosen_lengths, rejected_lengths)
            logps = tuple(per_token(x, n) for x, n in zip(logps, sides, strict=True))
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            *logps, beta=self.beta, kind=self.kind, label_smoothing=self.label_smoothing
        )
        if averaged:
            chosen_rewards = implicit_rewards(policy_chosen, ref_chosen, self.beta)
            rejected_rewards = implicit_rewards(policy_rejected, ref_rejected, self.beta)
        return LossOutput(loss, torch.cat([chosen_rewards, rejected_rewards]))
