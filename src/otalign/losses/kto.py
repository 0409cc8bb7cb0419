r"""KTO: Kahneman-Tversky optimization (Ethayarajh et al. 2024) for unpaired prompt/completion/label data.

With the implied reward :math:`r_i = \log\pi_\theta(y_i|x_i) - \log\pi_{\mathrm{ref}}(y_i|x_i)`
(nats) and the reference point

.. math::
    z_0 = \max\Big(0,\ \tfrac1K\textstyle\sum_k \log\pi_\theta(y'_k|x_k) - \log\pi_{\mathrm{ref}}(y'_k|x_k)\Big),

a detached batch estimate of :math:`\mathrm{KL}(\pi_\theta\|\pi_{\mathrm{ref}})` from mismatched
pairs (prompt :math:`x_k` with the completion :math:`y'_k` of another example), the per-example loss is

.. math::
    \ell_i = \lambda_D\,\big(1 - \sigma(\beta(r_i - z_0))\big) \text{ if } y_i \text{ is desirable},\qquad
    \ell_i = \lambda_U\,\big(1 - \sigma(\beta(z_0 - r_i))\big) \text{ otherwise},

as in TRL's ``KTOTrainer`` (``loss_type="kto"``), whose loss is the mean of :math:`\ell_i` over
the batch. :math:`z_0` is averaged over every process's estimates under ``torch.distributed``.

:class:`KTOLoss` binds :func:`kto_loss` to config values as a loss object (:mod:`otalign.losses.interface`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._distributed import global_mean, is_distributed
from ._validation import check_positive, check_vectors, reduce
from .interface import LossOutput, implicit_rewards


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
    distributed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO loss of a batch of labelled completions (equations in the module docstring).

    Args:
        policy_logps: (n,) :math:`\\log\\pi_\\theta(y|x)` of each completion, nats.
        ref_logps: (n,) the same under the reference model.
        labels: (n,) bool, True for desirable completions.
        policy_kl_logps: (k,) :math:`\\log\\pi_\\theta(y'|x)` of mismatched prompt/completion pairs,
            for the reference point; ``None`` (with ``ref_kl_logps``) uses z0 = 0.
        ref_kl_logps: (k,) the same under the reference model.
        beta: scale of the reward (> 0).
        desirable_weight: lambda_D (> 0), weight of desirable examples.
        undesirable_weight: lambda_U (> 0), weight of undesirable examples.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` for the per-example losses (n,).
        distributed: average z0 over all processes when ``torch.distributed`` is running.

    Returns:
        ``(loss, rewards, z0)``: the reduced loss, the detached rewards ``beta * r`` (n,), and the
        reference point z0 (scalar, detached, in nats).
    """
    empty = is_distributed(distributed)  # a process's share of the gathered batch may be empty
    check_vectors(empty, policy_logps=policy_logps, ref_logps=ref_logps)
    if labels.dtype != torch.bool or labels.shape != policy_logps.shape:
        raise ValueError(
            f"labels must be a bool tensor of shape {tuple(policy_logps.shape)}, got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    beta = check_positive("beta", beta)
    desirable_weight = check_positive("desirable_weight", desirable_weight)
    undesirable_weight = check_positive("undesirable_weight", undesirable_weight)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("give both policy_kl_logps and ref_kl_logps, or neither")

    if policy_kl_logps is None:
        z0 = policy_logps.new_zeros(())
    else:
        check_vectors(empty, policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
        z0 = global_mean(policy_kl_logps - ref_kl_logps, enabled=distributed).clamp(min=0)
    logratio = policy_logps - ref_logps
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))),
    )
    return reduce(losses, reduction), implicit_rewards(policy_logps, ref_logps, beta), z0


@dataclass
class KTOLoss:
    """KTO loss object on labelled completions (:func:`kto_loss`); logs the reference point as ``kto/z0``."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    paired = False
    needs_kl = True

    def __call__(self, policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps) -> LossOutput:
        loss, rewards, z0 = kto_loss(
            policy_logps,
            ref_logps,
            labels,
            policy_kl_logps,
            ref_kl_logps,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        return LossOutput(loss, rewards, {"kto/z0": float(z0)})
