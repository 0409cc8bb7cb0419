"""The WPR paper's analyses (``otalign analyze <kind>``): each writes a JSON file and a PNG plot.

- ``penalty-correlation`` (:mod:`.penalty_correlation`): KL vs Wasserstein penalties, jointly min-max
  normalised, with Pearson r and the fitted slope (the paper's Figure 5);
- ``coherence`` (:mod:`.coherence`): mean pairwise embedding distance among each position's top-10
  next-token candidates, per model (the paper's Table 8);
- ``semantic-similarity`` (:mod:`.semantic_similarity`): correlation of each negative penalty with the semantic
  similarity of the policy's and the reference's answers (the paper's Table 7, MiniLM instead of BERTScore);
- ``beta-sweep`` (:mod:`.beta_sweep`): PPO over a grid of beta per regularizer, win rate and reward vs beta
  (the paper's Figure 4);
- ``apps`` (:mod:`.code_execution`): programs run against their tests in the sandbox, pass@k and reward per
  difficulty (the paper's Table 5).
"""

from __future__ import annotations

from .beta_sweep import BetaSweepConfig, run_beta_sweep
from .code_execution import CodeEvalConfig, run_code_eval
from .coherence import CoherenceConfig, candidate_spread, run_coherence
from .penalty_correlation import PenaltyCorrelationConfig, correlate, run_penalty_correlation
from .semantic_similarity import SemanticSimilarityConfig, run_semantic_similarity

ANALYSES = {
    "penalty-correlation": (PenaltyCorrelationConfig, run_penalty_correlation),
    "coherence": (CoherenceConfig, run_coherence),
    "semantic-similarity": (SemanticSimilarityConfig, run_semantic_similarity),
    "beta-sweep": (BetaSweepConfig, run_beta_sweep),
    "apps": (CodeEvalConfig, run_code_eval),
}
"""``kind -> (config dataclass, run function)`` of every analysis."""

__all__ = [
    "ANALYSES",
    "BetaSweepConfig",
    "CodeEvalConfig",
    "CoherenceConfig",
    "PenaltyCorrelationConfig",
    "SemanticSimilarityConfig",
    "candidate_spread",
    "correlate",
    "run_beta_sweep",
    "run_code_eval",
    "run_coherence",
    "run_penalty_correlation",
    "run_semantic_similarity",
]
