"""``PreferenceConfig``: the settings of :class:`~otalign.trainers.PreferenceTrainer` (``otalign dpo``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from otalign.losses import PAIRWISE_LOSSES, PREFERENCE_LOSSES, build_preference_loss, loss_options
from otalign.losses.aot import AOT_LOSSES

from .config import ConfigError, redefault
from .dataset import DatasetConfig

TOKEN_WEIGHTINGS = ("none", "otpo")


@dataclass
class PreferenceConfig(DatasetConfig):
    """Preference-optimization settings (TRL ``DPOConfig``/``KTOConfig`` names) on top of :class:`DatasetConfig`.

    Each step every process takes ``per_device_train_batch_size`` pairs (or labelled completions) per micro-batch,
    ``gradient_accumulation_steps`` micro-batches per step.
    The dataset's ``ref_chosen_logps``/``ref_rejected_logps`` (or ``ref_logps``) columns, when present, replace the
    reference model (not with OTPO or KTO, which need per-token or mismatched-pair values).
    """

    output_dir: str = redefault(DatasetConfig, "output_dir", "runs/dpo")
    learning_rate: float = redefault(DatasetConfig, "learning_rate", 1e-6)
    truncation_mode: str = redefault(DatasetConfig, "truncation_mode", "keep_end")
    loss_type: str = field(default="sigmoid", metadata={"help": "the loss", "choices": PREFERENCE_LOSSES.names})
    beta: float = field(
        default=0.1,
        metadata={"help": "inverse temperature (DPO, hinge, KTO), IPO's regularization, AOT's scale", "check": "> 0"},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "label-flip probability (robust, aot, aot_unpaired)", "check": "[0, 0.5)"}
    )
    aot_h: str = field(default="logistic", metadata={"help": "AOT's convex surrogate h", "choices": tuple(AOT_LOSSES)})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO's lambda_D", "check": "> 0"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO's lambda_U", "check": "> 0"})
    token_weighting: str = field(
        default="none", metadata={"help": "OTPO token weights (pairwise losses)", "choices": TOKEN_WEIGHTINGS}
    )
    otpo_eps1: float = field(default=1.0, metadata={"help": "OTPO entropic regularization", "check": "> 0"})
    otpo_eps2: float = field(default=0.2, metadata={"help": "OTPO marginal relaxation", "check": "> 0"})
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"path": "model", "help": "the frozen reference (none: a copy of the policy before training)"},
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "compute all reference log-probs once up front, then free the model"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.loss_type = PREFERENCE_LOSSES.canonical(self.loss_type)
        if self.token_weighting == "otpo" and self.loss_type not in PAIRWISE_LOSSES:
            raise ConfigError(f"token_weighting otpo needs a pairwise loss_type {PAIRWISE_LOSSES}", "token_weighting")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        used = loss_options(self.loss_type)
        for name in ("label_smoothing", "aot_h", "desirable_weight", "undesirable_weight"):
            if name not in used and getattr(self, name) != defaults[name]:
                raise ConfigError(f"{name} does not apply to loss_type {self.loss_type!r}", name)
        if self.token_weighting != "otpo":
            for name in ("otpo_eps1", "otpo_eps2"):
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(f"{name} applies with token_weighting otpo only", name)
        if self.label_smoothing and "aot_h" in used and self.aot_h != "logistic":
            raise ConfigError(f"label_smoothing needs aot_h logistic, got {self.aot_h!r}", "label_smoothing")

    def build_loss(self):
        """The loss object of ``loss_type`` (:data:`otalign.losses.PREFERENCE_LOSSES`), given the options it reads."""
        return build_preference_loss(
            self.loss_type, **{name: getattr(self, name) for name in loss_options(self.loss_type)}
        )
