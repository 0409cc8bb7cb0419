"""otalign's methods inside TRL's trainers (extra ``otalign[trl]``; the supported TRL range is checked on import).

- :class:`OTPODPOTrainer`: TRL's ``DPOTrainer`` with OTPO token weights on the per-token log-ratios.
- :class:`WPRGRPOTrainer`: TRL's ``GRPOTrainer`` with any otalign regularizer in the loss (in place of its k3 term)
  or in the reward.
- :class:`WPRRLOOTrainer`: TRL's ``RLOOTrainer`` with any otalign regularizer's penalty in the reward (in place of
  its log-ratio).
"""

from __future__ import annotations

from ._version import SUPPORTED_RANGE, check_trl

check_trl()

from .dpo import OTPODPOTrainer  # noqa: E402
from .grpo import WPRGRPOTrainer  # noqa: E402
from .rloo import WPRRLOOTrainer  # noqa: E402

__all__ = ["SUPPORTED_RANGE", "OTPODPOTrainer", "WPRGRPOTrainer", "WPRRLOOTrainer", "check_trl"]
