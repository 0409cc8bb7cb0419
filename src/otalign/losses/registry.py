"""The ``loss_type`` registry: every preference loss object by name, and building one from config values.

Each entry: the loss object's class (:mod:`otalign.losses.interface`), its constructor constants, whether it is
pairwise (``paired``), the config options it reads (config name -> constructor argument) and a one-line help. Names
as TRL 1.16's ``DPOConfig.loss_type``. A new loss is its own module plus one :meth:`PREFERENCE_LOSSES.add` line.
"""

from __future__ import annotations

from otalign.registry import Registry

from .aot import AOTLoss
from .dpo import DPOFamilyLoss
from .kto import KTOLoss

PREFERENCE_LOSSES = Registry("loss_type")
"""Every ``loss_type`` (module docstring)."""
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
    DPOFamilyLoss,
    help="robust DPO, unbiased under label flips of probability label_smoothing",
    defaults={"kind": "robust"},
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
"""The built-in pairwise ``loss_type`` names."""


def loss_options(name: str) -> dict[str, str]:
    """The config options the loss ``name`` reads (config name -> constructor argument)."""
    return PREFERENCE_LOSSES.entry(name).info["options"]


def build_preference_loss(name: str, **options):
    """The loss object called ``name`` (a :data:`PREFERENCE_LOSSES` name) from config ``options`` (``beta``,
    ``label_smoothing``, ``aot_h``, ``desirable_weight``, ``undesirable_weight``); the options it does not read are
    ignored (:class:`~otalign.trainers.PreferenceConfig` rejects the ones set away from their defaults)."""
    kwargs = {arg: options[opt] for opt, arg in loss_options(name).items() if opt in options}
    return PREFERENCE_LOSSES.build(name, **kwargs)
