"""Per-token policy penalties for RLHF: the f-divergence family and the Wasserstein (WPR) penalty.

Every regularizer has ``penalty(policy_logits, ref_logits, actions, mask=None) -> PenaltyOutput`` and
``evaluate(..., support_gradient=False) -> Evaluation`` (penalty and support gradient from one pass); the
Wasserstein penalty and the f-divergences' sampled-token penalties also take a top-k record
(:class:`TopKLogProbs`, ``evaluate_topk``) instead of full logits. :func:`build_regularizer` makes one from a name,
as a trainer's config names it.
"""

from __future__ import annotations

from otalign.registry import Registry

from .base import Evaluation, PenaltyOutput, Regularizer, SupportGradient
from .common import LOG_PROB_FLOOR
from .embeddings import check_vocab_size, embedding_matrix, load_embedding_matrix
from .f_divergence import (
    F_DIVERGENCES,
    KL_ESTIMATORS,
    FDivergenceRegularizer,
    exact_f_divergence,
    f_over_x,
    f_prime,
    k3,
)
from .topk import TopKLogProbs
from .wasserstein import (
    Support,
    TruncatedProblem,
    WassersteinRegularizer,
    WassersteinSolution,
    build_problem,
    default_smooth_tau,
    smooth_distance,
    solve_problem,
)

REGULARIZERS = Registry("regularizer")
"""Every regularizer: name, class, default ``beta`` (WPR paper Table 10, TL;DR column), one-line help."""
_F = "otalign.regularizers.f_divergence:FDivergenceRegularizer"
REGULARIZERS.add("kl", _F, help="reverse KL at the sampled token (alias of rkl)", defaults={"kind": "rkl"}, beta=0.005)
REGULARIZERS.add("rkl", _F, help="reverse KL(pi ‖ pi_ref) at the sampled token", defaults={"kind": "rkl"}, beta=0.005)
REGULARIZERS.add("fkl", _F, help="forward KL(pi_ref ‖ pi)", defaults={"kind": "fkl"}, beta=0.05)
REGULARIZERS.add("js", _F, help="Jensen-Shannon divergence", defaults={"kind": "js"}, beta=0.05)
REGULARIZERS.add("alpha", _F, help="alpha-divergence (f_alpha)", defaults={"kind": "alpha"}, beta=0.01)
REGULARIZERS.add("tv", _F, help="total variation", defaults={"kind": "tv"}, beta=0.01)
REGULARIZERS.add("chi2", _F, help="chi-squared divergence", defaults={"kind": "chi2"}, beta=0.001)
REGULARIZERS.add(
    "wasserstein",
    "otalign.regularizers.wasserstein:WassersteinRegularizer",
    help="entropic Wasserstein distance over token embeddings (WPR); needs embeddings=",
    beta=0.05,
)
REGULARIZER_NAMES = REGULARIZERS.names()


def build_regularizer(name: str, **kwargs) -> Regularizer:
    """The regularizer called ``name`` in :data:`REGULARIZERS` (``kl`` is ``rkl``).

    ``kwargs`` go to its class: :class:`WassersteinRegularizer` for ``wasserstein`` (``embeddings`` is required),
    :class:`FDivergenceRegularizer` for the others (``alpha``, ``estimator``, ``max_chunk_elements``).
    """
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {REGULARIZER_NAMES}")
    if name == "wasserstein" and "embeddings" not in kwargs:
        raise ValueError("the wasserstein regularizer needs embeddings=<(V, d) tensor> (see embedding_matrix)")
    return REGULARIZERS.build(name, **kwargs)


def regularizer_from_config(config, reference_model) -> Regularizer:
    """The regularizer ``config.regularizer`` names, built by its registry entry: the class's
    :meth:`~Regularizer.from_config` maps the config fields it reads (a factory registered instead of a class is
    called with the entry's defaults). ``reference_model``: the frozen reference (Wasserstein's embeddings)."""
    entry = REGULARIZERS.entry(config.regularizer)
    target = entry.resolve()
    if hasattr(target, "from_config"):
        return target.from_config(config, reference_model, **entry.defaults)
    return target(**entry.defaults)


__all__ = [
    "Evaluation",
    "F_DIVERGENCES",
    "KL_ESTIMATORS",
    "LOG_PROB_FLOOR",
    "REGULARIZERS",
    "REGULARIZER_NAMES",
    "FDivergenceRegularizer",
    "PenaltyOutput",
    "Regularizer",
    "Support",
    "SupportGradient",
    "TopKLogProbs",
    "TruncatedProblem",
    "WassersteinRegularizer",
    "WassersteinSolution",
    "build_problem",
    "build_regularizer",
    "default_smooth_tau",
    "check_vocab_size",
    "embedding_matrix",
    "exact_f_divergence",
    "f_over_x",
    "f_prime",
    "k3",
    "load_embedding_matrix",
    "regularizer_from_config",
    "smooth_distance",
    "solve_problem",
]
