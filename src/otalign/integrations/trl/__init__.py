"""otalign's methods inside TRL's trainers (extra ``otalign[trl]``; the supported TRL range is checked on import).

- :class:`OTPODPOTrainer`: TRL's ``DPOTrainer`` with OTPO token weights on the per-token log-ratios.
- :class:`WPRGRPOTrainer`: TRL's ``GRPOTrainer`` with any otalign regularizer in the loss in place of its k3 term.
"""

from __future__ import annotations

from ._version import SUPPORTED_RANGE, check_trl

check_trl()

from .dpo import OTPODPOTrainer  # noqa: E402
from .grpo import WPRGRPOTrainer  # noqa: E402

__all__ = ["SUPPORTED_RANGE", "OTPODPOTrainer", "WPRGRPOTrainer", "check_trl"]
