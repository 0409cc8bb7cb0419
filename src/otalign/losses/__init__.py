"""Preference losses on tensors: DPO/IPO/hinge, AOT (paired and unpaired), KTO, and OTPO token weights.

Plain functions of log-probabilities (and hidden states for OTPO); usable from any training loop.
"""

from .aot import AOT_LOSSES, aot_loss, quantile_coupling, sorted_ot_loss
from .dpo import DPO_KINDS, dpo_loss, implicit_rewards
from .kto import kto_loss
from .logps import sequence_logps
from .otpo import otpo_weights

__all__ = [
    "AOT_LOSSES",
    "DPO_KINDS",
    "aot_loss",
    "dpo_loss",
    "implicit_rewards",
    "kto_loss",
    "otpo_weights",
    "quantile_coupling",
    "sequence_logps",
    "sorted_ot_loss",
]
