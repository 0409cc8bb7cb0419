"""Settings and sampling the analyses share: responses of a model on a prompt subsample, with its logits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from otalign.trainers.config import ConfigError


@dataclass
class SamplingFields:
    """Prompts and sampling of an analysis run on generations.

    Attributes:
        output_dir: where the JSON and PNG go.
        prompts, prompt_split: ``builtin`` (train/test split) or a .jsonl/.json/.txt prompt file.
        num_prompts: prompts drawn without replacement (seeded).
        max_new_tokens, temperature, top_k, top_p: sampling; distributions are ``softmax(logits / temperature)``.
        batch_size, max_prompt_length, model_dtype: batching, prompt limit (tokens), weights dtype.
        seed: prompt subsample and sampling noise.
    """

    output_dir: str = "reports/analysis"
    prompts: str = "builtin"
    prompt_split: str = "test"
    num_prompts: int = 20
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    batch_size: int = 8
    max_prompt_length: int = 512
    model_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def params(self):
        from otalign.trainers.rollout import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def prompt_subsample(self) -> list:
        """``num_prompts`` prompts of the configured set, drawn with ``seed``."""
        from otalign.data import load_prompts

        from ..winrate import subsample

        prompts = load_prompts(self.prompts, self.prompt_split)
        return [prompts[i] for i in subsample(len(prompts), self.num_prompts, np.random.default_rng(self.seed))]


def load_model(name_or_path: str, dtype: str):
    """``(model, tokenizer)`` in eval mode."""
    from otalign.models import load_causal_lm, load_tokenizer

    return load_causal_lm(name_or_path, dtype=dtype).eval(), load_tokenizer(name_or_path)


@torch.no_grad()
def sampled_logits(
    model, tokenizer, config: SamplingFields, prompts: list, ref_model=None
) -> Iterator[tuple[object, torch.Tensor, torch.Tensor | None]]:
    """Per batch: the :class:`~otalign.trainers.rollout.Rollout` sampled from ``model``, its (B, T, V) tempered
    logits at the response positions, and ``ref_model``'s on the same tokens (None without a reference)."""
    from otalign.trainers.evaluation import sample_batches
    from otalign.trainers.rollout import response_logits, sample_seeds

    from ..generations import encode_for_sampling

    params = config.params()
    texts, ids = encode_for_sampling(tokenizer, prompts, config.max_prompt_length)
    seeds = sample_seeds(config.seed, list(range(len(ids))))
    for rollout in sample_batches(model, tokenizer, texts, ids, seeds, params, config.batch_size):
        logits = response_logits(model, rollout) / params.temperature
        ref = response_logits(ref_model, rollout) / params.temperature if ref_model is not None else None
        yield rollout, logits, ref


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
