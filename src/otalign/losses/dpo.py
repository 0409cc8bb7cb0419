r"""DPO-family pairwise losses: DPO (sigmoid, with conservative label smoothing), IPO and hinge.

All inputs are sequence log-probabilities :math:`\log\pi(y|x)` in nats, shape (batch,), float32
(or float64). With the margin

.. math::
    m_i = \big(\log\pi_\theta(y^+_i|x_i) - \log\pi_\theta(y^-_i|x_i)\big)
        - \big(\log\pi_{\mathrm{ref}}(y^+_i|x_i) - \log\pi_{\mathrm{ref}}(y^-_i|x_i)\big)

the per-example losses follow TRL's ``DPOTrainer`` conventions:

- ``sigmoid`` (Rafailov et al. 2023; conservative DPO when ``label_smoothing`` = s > 0):
  :math:`-(1-s)\log\sigma(\beta m) - s\log\sigma(-\beta m)`;
- ``ipo`` (Azar et al. 2024): :math:`(m - 1/(2\beta))^2`. The IPO paper and TRL use
  length-averaged log-probabilities here; pass those if you want that variant;
- ``hinge`` (SLiC, Zhao et al. 2023): :math:`\max(0, 1 - \beta m)`.

Token-weighted log-probabilities (OTPO, :func:`otalign.losses.sequence_logps`) plug in unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import check_choice, check_positive, check_vectors, reduce

DPO_KINDS = ("sigmoid", "ipo", "hinge")


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
    """DPO, IPO or hinge loss of a batch of preference pairs (equations in the module docstring).

    Args:
        policy_chosen_logps: (batch,) :math:`\\log\\pi_\\theta(y^+|x)`, nats.
        policy_rejected_logps: (batch,) :math:`\\log\\pi_\\theta(y^-|x)`.
        ref_chosen_logps: (batch,) :math:`\\log\\pi_{ref}(y^+|x)`.
        ref_rejected_logps: (batch,) :math:`\\log\\pi_{ref}(y^-|x)`.
        beta: inverse temperature (> 0); for IPO the regularization strength (target margin 1/(2 beta)).
        kind: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
        label_smoothing: probability s in [0, 0.5) that a label is flipped (conservative DPO);
            ``sigmoid`` only.
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
    if label_smoothing and kind != "sigmoid":
        raise ValueError(f"label_smoothing applies to kind='sigmoid' only, got kind={kind!r}")

    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if kind == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif kind == "ipo":
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = F.relu(1.0 - beta * margin)
    return (
        reduce(losses, reduction),
        implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta),
        implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta),
    )
