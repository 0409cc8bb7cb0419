"""Per-token policy penalties for RLHF: the f-divergence family and the Wasserstein (WPR) penalty.

Every regularizer has ``penalty(policy_logits, ref_logits, actions, mask=None) -> PenaltyOutput``;
:func:`build_regularizer` makes one from a name, as a PPO trainer's config names it.
"""

from __future__ import annotations

from .base import LOG_PROB_FLOOR, PenaltyOutput, Regularizer
from .embeddings import check_vocab_size, embedding_matrix, load_embedding_matrix
from .f_divergence import F_DIVERGENCES, KL_ESTIMATORS, FDivergenceRegularizer, exact_f_divergence, f_over_x
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

REGULARIZER_NAMES = ("kl", "rkl", "fkl", "js", "alpha", "tv", "chi2", "wasserstein")


def build_regularizer(name: str, **kwargs) -> Regularizer:
    """The regularizer called ``name`` (one of :data:`REGULARIZER_NAMES`; ``kl`` is ``rkl``).

    ``kwargs`` go to :class:`WassersteinRegularizer` for ``wasserstein`` (``embeddings`` is required)
    and to :class:`FDivergenceRegularizer` otherwise (``alpha``, ``estimator``, ``max_chunk_elements``).
    """
    if name == "wasserstein":
        if "embeddings" not in kwargs:
            raise ValueError("the wasserstein regularizer needs embeddings=<(V, d) tensor> (see embedding_matrix)")
        return WassersteinRegularizer(**kwargs)
    if name not in REGULARIZER_NAMES:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {REGULARIZER_NAMES}")
    return FDivergenceRegularizer(name, **kwargs)


__all__ = [
    "F_DIVERGENCES",
    "KL_ESTIMATORS",
    "LOG_PROB_FLOOR",
    "REGULARIZER_NAMES",
    "FDivergenceRegularizer",
    "PenaltyOutput",
    "Regularizer",
    "Support",
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
    "load_embedding_matrix",
    "smooth_distance",
    "solve_problem",
]
