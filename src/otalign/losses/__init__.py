"""Preference losses: DPO/IPO/hinge/robust DPO, AOT (paired and unpaired), KTO, and OTPO token weights.

Plain functions of log-probabilities (and hidden states for OTPO), usable from any training loop; the loss objects
that bind them to config values (:mod:`otalign.losses.interface`) and their ``loss_type`` registry
(:mod:`otalign.losses.registry`).
"""

from .aot import AOT_LOSSES, AOTLoss, aot_loss, quantile_coupling, sorted_ot_loss
from .dpo import DPO_KINDS, DPOFamilyLoss, dpo_loss
from .interface import LossOutput, call_loss, implicit_rewards
from .kto import KTOLoss, kto_loss
from .logps import sequence_logps
from .otpo import otpo_weights
from .registry import PAIRWISE_LOSSES, PREFERENCE_LOSSES, build_preference_loss, loss_options

__all__ = [
    "AOT_LOSSES",
    "DPO_KINDS",
    "PAIRWISE_LOSSES",
    "PREFERENCE_LOSSES",
    "AOTLoss",
    "DPOFamilyLoss",
    "KTOLoss",
    "LossOutput",
    "aot_loss",
    "build_preference_loss",
    "call_loss",
    "dpo_loss",
    "implicit_rewards",
    "kto_loss",
    "loss_options",
    "otpo_weights",
    "quantile_coupling",
    "sequence_logps",
    "sorted_ot_loss",
]
