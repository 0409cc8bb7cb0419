r"""Loss objects of the preference trainer: thin wrappers binding :mod:`otalign.losses` to config values.

Two kinds, told apart by the attribute ``paired``:

- pairwise (``paired = True``): ``loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``,
  (n,) sequence log-probs of n preference pairs (token-weighted for OTPO) -> ``(loss, stats)``;
- unpaired (``paired = False``): ``loss(policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps)``
  over n labelled completions (labels (n,) bool, True = desirable / chosen); the KL arguments are the
  log-probs of mismatched prompt/completion pairs when ``needs_kl`` is set, else None.

``stats`` is a dict of extra scalar metrics. Any object with these attributes can be handed to
:class:`otalign.trainers.PreferenceTrainer` instead of a built-in loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from otalign.losses import aot_loss, dpo_loss, kto_loss
from otalign.registry import Registry


@dataclass
class DPOFamilyLoss:
    """DPO (``sigmoid``), IPO or hinge: :func:`otalign.losses.dpo_loss`.

    ``average_logps``: the trainer divides each sequence log-prob (policy and reference) by the completion's token
    count before calling the loss (TRL's IPO); the reward metrics keep the summed log-probs.
    """

    kind: str
    beta: float
    label_smoothing: float = 0.0
    average_logps: bool = False
    paired = True
    needs_kl = False

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> tuple[torch.Tensor, dict]:
        loss, _, _ = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            kind=self.kind,
            label_smoothing=self.label_smoothing,
        )
        return loss, {}


@dataclass
class RobustDPOLoss:
    r"""Robust DPO (Chowdhury et al. 2024; TRL's ``robust``): unbiased under label flips of probability s,
    :math:`\big(-(1-s)\log\sigma(\beta m) + s\log\sigma(-\beta m)\big)/(1-2s)`, averaged over the pairs."""

    beta: float
    label_smoothing: float = 0.0
    paired = True
    needs_kl = False

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> tuple[torch.Tensor, dict]:
        s = self.label_smoothing
        margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
        clean = -(1.0 - s) * F.logsigmoid(self.beta * margin)
        flipped = -s * F.logsigmoid(-self.beta * margin)
        return ((clean - flipped) / (1.0 - 2.0 * s)).mean(), {}


@dataclass
class AOTLoss:
    """Paired or unpaired AOT (:func:`otalign.losses.aot_loss`), sorted over the whole data-parallel batch.

    Unpaired: u = the chosen completions' log-ratios, v = the rejected ones' (any sizes >= 1).
    """

    paired: bool
    beta: float
    h: str = "logistic"
    label_smoothing: float = 0.0
    needs_kl = False

    def __call__(self, *logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.paired:
            policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
        else:
            policy, ref, labels = logps[:3]
            policy_chosen, policy_rejected = policy[labels], policy[~labels]
            ref_chosen, ref_rejected = ref[labels], ref[~labels]
        loss = aot_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            paired=self.paired,
            h=self.h,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        return loss, {}


@dataclass
class KTOLoss:
    """KTO on labelled completions (:func:`otalign.losses.kto_loss`); logs the reference point as ``kto/z0``."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    paired = False
    needs_kl = True

    def __call__(self, policy_logps, ref_logps, labels, policy_kl_logps, ref_kl_logps) -> tuple[torch.Tensor, dict]:
        loss, _, z0 = kto_loss(
            policy_logps,
            ref_logps,
            labels,
            policy_kl_logps,
            ref_kl_logps,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        return loss, {"kto/z0": float(z0)}


PREFERENCE_LOSSES = Registry("loss_type")
"""Every ``loss_type``: class, constructor constants, whether it is pairwise, the config options it reads (config
name -> constructor argument), one-line help. Names as TRL 1.16's ``DPOConfig.loss_type``."""
PREFERENCE_LOSSES.add(
    "sigmoid",
    DPOFamilyLoss,
    help="DPO: -log sigmoid(beta m)",
    defaults={"kind": "sigmoid"},
    paired=True,
    options={"beta": "beta"},
)
PREFERENCE_LOSSES.add(
    "ipo",
    DPOFamilyLoss,
    help="IPO: (m - 1/(2 beta))^2 on per-token mean log-probs (as TRL)",
    defaults={"kind": "ipo", "average_logps": True},
    paired=True,
    options={"beta": "beta"},
)
PREFERENCE_LOSSES.add(
    "hinge",
    DPOFamilyLoss,
    help="SLiC hinge: max(0, 1 - beta m)",
    defaults={"kind": "hinge"},
    paired=True,
    options={"beta": "beta"},
)
PREFERENCE_LOSSES.add(
    "robust",
    RobustDPOLoss,
    help="robust DPO, unbiased under label flips of probability label_smoothing",
    paired=True,
    options={"beta": "beta", "label_smoothing": "label_smoothing"},
)
PREFERENCE_LOSSES.add(
    "aot",
    AOTLoss,
    help="AOT paired: sorted margins of the batch (stochastic dominance), h = aot_h, label_smoothing (logistic)",
    defaults={"paired": True},
    paired=True,
    options={"beta": "beta", "aot_h": "h", "label_smoothing": "label_smoothing"},
)
PREFERENCE_LOSSES.add(
    "aot_unpaired",
    AOTLoss,
    help="AOT unpaired: sorted chosen vs sorted rejected log-ratios, h = aot_h, label_smoothing (logistic)",
    defaults={"paired": False},
    paired=False,
    options={"beta": "beta", "aot_h": "h", "label_smoothing": "label_smoothing"},
)
PREFERENCE_LOSSES.add(
    "kto",
    KTOLoss,
    help="KTO on labelled completions, reference point from mismatched pairs",
    paired=False,
    options={"beta": "beta", "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight"},
)
PREFERENCE_LOSSES.alias("aot_paired", "aot")
PAIRWISE_LOSSES = tuple(name for name, entry in PREFERENCE_LOSSES.entries.items() if entry.info["paired"])


def loss_options(name: str) -> dict[str, str]:
    """The config options the loss ``name`` reads (config name -> constructor argument)."""
    return PREFERENCE_LOSSES.entry(name).info["options"]


def loss_inputs(loss, policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
    """``(policy, ref)`` sequence log-probs as ``loss`` takes them: divided by the (n,) completion token counts
    ``lengths`` when the loss averages per token (``average_logps``, TRL's IPO), else unchanged."""
    if getattr(loss, "average_logps", False):
        lengths = lengths.to(policy.dtype).clamp_min(1.0)
        return policy / lengths, ref / lengths
    return policy, ref


def build_preference_loss(name: str, **options):
    """The loss object called ``name`` (a :data:`PREFERENCE_LOSSES` name) from config ``options`` (``beta``,
    ``label_smoothing``, ``aot_h``, ``desirable_weight``, ``undesirable_weight``); the options it does not read are
    ignored (:class:`~otalign.trainers.PreferenceConfig` rejects the ones set away from their defaults)."""
    kwargs = {arg: options[opt] for opt, arg in loss_options(name).items() if opt in options}
    return PREFERENCE_LOSSES.build(name, **kwargs)
