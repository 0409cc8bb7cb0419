"""The WPR paper's analyses (``otalign analyze <kind>``): each writes a JSON file and a PNG plot.

- ``penalty-correlation`` (:mod:`.penalty_correlation`): KL vs Wasserstein penalties, jointly min-max
  normalised, with Pearson r and the fitted slope (the paper's Figure 5);
- ``coherence`` (:mod:`.coherence`): mean pairwise embedding distance among each position's top-10
  next-token candidates, per model (the paper's Table 8).
"""

from __future__ import annotations

from .coherence import CoherenceConfig, candidate_spread, run_coherence
from .penalty_correlation import PenaltyCorrelationConfig, correlate, run_penalty_correlation

ANALYSES = {
    "penalty-correlation": (PenaltyCorrelationConfig, run_penalty_correlation),
    "coherence": (CoherenceConfig, run_coherence),
}
"""``kind -> (config dataclass, run function)`` of every analysis."""

__all__ = [
    "ANALYSES",
    "CoherenceConfig",
    "PenaltyCorrelationConfig",
    "candidate_spread",
    "correlate",
    "run_coherence",
    "run_penalty_correlation",
]
