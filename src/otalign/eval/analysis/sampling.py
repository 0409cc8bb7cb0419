"""Sampling the analyses share: a seeded prompt subsample, and responses of a model with its log-probabilities."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from otalign.paths import written_atomically

from ..config import SamplingFields


def prompt_subsample(config: SamplingFields) -> list:
    """``config.num_prompts`` prompts of the configured set, drawn with ``config.seed``."""
    from otalign.data import load_prompts

    from ..winrate import subsample

    prompts = load_prompts(config.prompts, config.prompt_split)
    return [prompts[i] for i in subsample(len(prompts), config.num_prompts, np.random.default_rng(config.seed))]


def load_model(name_or_path: str, dtype: str):
    """``(model, tokenizer)`` in eval mode."""
    from otalign.models import load_causal_lm, load_tokenizer

    return load_causal_lm(name_or_path, dtype=dtype).eval(), load_tokenizer(name_or_path)


@torch.no_grad()
def sampled_positions(model, tokenizer, config: SamplingFields, prompts: list, ref_model=None) -> Iterator[tuple]:
    """Per generation batch: the :class:`~otalign.generation.Rollout` sampled from ``model`` and an iterator of
    its generated positions (:class:`otalign.scoring.Positions`) holding the tempered log-probabilities of
    ``model`` and, when given, ``ref_model`` on the same tokens, ``config.scoring_batch_size`` responses per
    forward (never (B, T, V) for a whole batch)."""
    from otalign.generation import sample_batches, sample_seeds
    from otalign.scoring import generated_positions

    from ..generations import encode_for_sampling

    params = config.params()
    texts, ids = encode_for_sampling(tokenizer, prompts, config.max_prompt_length)
    seeds = sample_seeds(config.seed, list(range(len(ids))))
    models = (model,) if ref_model is None else (model, ref_model)
    for rollout in sample_batches(model, tokenizer, texts, ids, seeds, params, config.batch_size):
        yield (
            rollout,
            generated_positions(models, rollout, temperature=params.temperature, chunk_size=config.scoring_batch_size),
        )


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG (whole or not at all: :func:`otalign.paths.written_atomically`) and close
    it."""
    fig.tight_layout()
    with written_atomically(path) as tmp:
        fig.savefig(tmp, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
