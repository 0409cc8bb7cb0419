"""The WPR paper's analyses (``otalign analyze <kind>``): each writes a JSON file and a PNG plot.

- ``penalty-correlation`` (:mod:`.penalty_correlation`): KL vs Wasserstein penalties, jointly min-max
  normalised, with Pearson r and the fitted slope (the paper's Figure 5);
- ``coherence`` (:mod:`.coherence`): mean pairwise embedding distance among each position's top-10
  next-token candidates, per model (the paper's Table 8);
- ``semantic-similarity`` (:mod:`.semantic_similarity`): correlation of each negative penalty with the semantic
  similarity of the policy's and the reference's answers (the paper's Table 7, MiniLM instead of BERTScore);
- ``apps`` (:mod:`.code_execution`): programs run against their tests in the sandbox, pass@k and reward per
  difficulty (the paper's Table 5);
- ``beta-sweep``: PPO over a grid of beta per regularizer, win rate and reward vs beta (the paper's Figure 4); a
  sweep, so it lives in :mod:`otalign.sweep.beta` (a layer above eval) and adds itself to :data:`ANALYSES` when
  :mod:`otalign.sweep` is imported.
"""

from __future__ import annotations

from otalign.registry import Registry

from .code_execution import CodeEvalConfig, run_code_eval
from .coherence import CoherenceConfig, candidate_spread, run_coherence
from .penalty_correlation import PenaltyCorrelationConfig, correlate, run_penalty_correlation
from .semantic_similarity import SemanticSimilarityConfig, run_semantic_similarity

ANALYSES = Registry("analysis")
"""Every ``otalign analyze <kind>``: run function, its config dataclass (``config``), one-line help."""
ANALYSES.add(
    "penalty-correlation",
    run_penalty_correlation,
    help="KL vs Wasserstein penalties of a policy's generations, Pearson r and slope (Figure 5)",
    config=PenaltyCorrelationConfig,
)
ANALYSES.add(
    "coherence",
    run_coherence,
    help="mean embedding distance among each position's top-10 candidates, per model (Table 8)",
    config=CoherenceConfig,
)
ANALYSES.add(
    "semantic-similarity",
    run_semantic_similarity,
    help="correlation of each negative penalty with answer similarity (Table 7, MiniLM)",
    config=SemanticSimilarityConfig,
)
ANALYSES.add(
    "apps",
    run_code_eval,
    help="pass@k, reward and status shares per difficulty of code generations run in the sandbox (APPS)",
    config=CodeEvalConfig,
)

__all__ = [
    "ANALYSES",
    "CodeEvalConfig",
    "CoherenceConfig",
    "PenaltyCorrelationConfig",
    "SemanticSimilarityConfig",
    "candidate_spread",
    "correlate",
    "run_code_eval",
    "run_coherence",
    "run_penalty_correlation",
    "run_semantic_similarity",
]
