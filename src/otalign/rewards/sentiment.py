"""The built-in sentiment reward: VADER's compound polarity of the response, in [-1, 1].

VADER (``vaderSentiment``) is a lexicon and rule-based sentiment scorer: no model, no download, fast on
CPU. The demo uses it as a stand-in for a learned reward model: "be positive" is an easy, visible
objective, and deviating from the reference to reach it is what the regularizer prices.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound score of each response (the prompt is ignored): -1 most negative, +1 most positive."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in responses]
