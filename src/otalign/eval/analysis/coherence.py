"""Semantic coherence of next-token candidates (the WPR paper's Table 8), per model.

At every generated position, the model's top-``k`` (10) next-token candidates are looked up in one fixed token
embedding space (a reference model's input embeddings, the space the WPR cost uses) and their mean pairwise
distance is taken; smaller means a more coherent candidate set. Reported per model as mean, std and 95%
confidence half-width over positions, with a bar chart.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from otalign.config import ConfigError, redefault
from otalign.paths import write_text_atomically
from otalign.regularizers.wasserstein import METRICS

from ..config import SamplingFields
from .sampling import load_model, prompt_subsample, sampled_positions, save_figure


@dataclass
class CoherenceConfig(SamplingFields):
    """Settings of ``otalign analyze coherence`` (sampling fields: :class:`SamplingFields`)."""

    output_dir: str = redefault(SamplingFields, "output_dir", "reports/coherence")
    models: list[str] = field(
        default_factory=list, metadata={"path": "model", "help": "model ids or folders to compare (same tokenizer)"}
    )
    embeddings_from: str | None = field(
        default=None, metadata={"help": "model whose input embeddings define the distances (none: the first)"}
    )
    top_candidates: int = field(default=10, metadata={"help": "candidates per position (paper: 10)", "check": ">= 2"})
    metric: str = field(
        default="euclidean", metadata={"help": "distance (cosine: 1 - cosine similarity)", "choices": METRICS}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ConfigError("give one or more models")


def candidate_spread(logits: torch.Tensor, embeddings: torch.Tensor, k: int, metric: str = "euclidean") -> torch.Tensor:
    """(N,) mean pairwise distance among the top-``k`` tokens of each row of the (N, V) ``logits``."""
    vectors = embeddings[torch.topk(logits, k, dim=-1).indices].double()  # (N, k, d)
    if metric == "cosine":
        unit = torch.nn.functional.normalize(vectors, dim=-1)
        distances = 1.0 - unit @ unit.transpose(1, 2)
    else:
        distances = torch.cdist(vectors, vectors)
    return distances.sum((1, 2)) / (k * (k - 1))  # the diagonal is zero


def run_coherence(config: CoherenceConfig) -> dict:
    """Compute every model's candidate spread on its own generations; write ``coherence.json`` and ``coherence.png``."""
    from otalign.regularizers import check_vocab_size, embedding_matrix

    source, _ = load_model(config.embeddings_from or config.models[0], config.model_dtype)
    embeddings = embedding_matrix(source, dtype=torch.float32)
    del source
    prompts = prompt_subsample(config)
    k = min(config.top_candidates, embeddings.shape[0])
    results = {}
    for path in config.models:
        model, tokenizer = load_model(path, config.model_dtype)
        check_vocab_size(embeddings, model.config.vocab_size, what=f"the logits of {path}")
        spreads = [
            candidate_spread(positions.log_probs[0], embeddings, k, config.metric)
            for _, batch in sampled_positions(model, tokenizer, config, prompts)
            for positions in batch
        ]
        values = torch.cat(spreads).numpy()
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        results[path] = {
            "mean": float(values.mean()),
            "std": std,
            "ci95": 1.96 * std / math.sqrt(values.size),
            "positions": int(values.size),
        }
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        out / "coherence.json", json.dumps({"config": asdict(config), "models": results}, indent=2) + "\n"
    )
    _plot(results, config, out / "coherence.png")
    for path, r in results.items():
        print(f"{path}: top-{k} spread {r['mean']:.4f} ± {r['ci95']:.4f} (95% CI, {r['positions']} positions)")
    return results


def _plot(results: dict, config: CoherenceConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(p).name or p for p in results]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 3.5))
    ax.bar(names, [r["mean"] for r in results.values()], yerr=[r["ci95"] for r in results.values()], capsize=4)
    ax.set_ylabel(f"mean pairwise {config.metric} distance\nof top-{config.top_candidates} candidates")
    ax.set_title("candidate coherence (lower is more coherent)")
    save_figure(fig, path)
