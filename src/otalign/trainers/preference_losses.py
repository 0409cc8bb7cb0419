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

from otalign.losses import aot_loss, dpo_loss, kto_loss

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "aot_paired", "aot_unpaired", "kto")
PAIRWISE_LOSSES = ("sigmoid", "ipo", "hinge", "aot_paired")


@dataclass
class DPOFamilyLoss:
    """DPO (``sigmoid``, with ``label_smoothing``), IPO or hinge: :func:`otalign.losses.dpo_loss`."""

    kind: str
    beta: float
    label_smoothing: float = 0.0
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
class AOTLoss:
    """Paired or unpaired AOT (:func:`otalign.losses.aot_loss`), sorted over the whole data-parallel batch.

    Unpaired: u = the chosen completions' log-ratios, v = the rejected ones' (any sizes >= 1).
    """

    paired: bool
    beta: float
    h: str = "logistic"
    needs_kl = False

    def __call__(self, *logps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.paired:
            policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
        else:
            policy, ref, labels = logps[:3]
            policy_chosen, policy_rejected = policy[labels], policy[~labels]
            ref_chosen, ref_rejected = ref[labels], ref[~labels]
        loss = aot_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, paired=self.paired, h=self.h, beta=self.beta
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


def build_preference_loss(
    name: str,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    aot_h: str = "logistic",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """The loss object called ``name`` (one of :data:`PREFERENCE_LOSSES`)."""
    if name in ("sigmoid", "ipo", "hinge"):
        return DPOFamilyLoss(name, beta, label_smoothing)
    if name in ("aot_paired", "aot_unpaired"):
        return AOTLoss(name == "aot_paired", beta, aot_h)
    if name == "kto":
        return KTOLoss(beta, desirable_weight, undesirable_weight)
    raise ValueError(f"unknown loss_type {name!r}; choose one of {list(PREFERENCE_LOSSES)}")
