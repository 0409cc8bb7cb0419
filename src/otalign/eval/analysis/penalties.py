"""KL and Wasserstein penalties of a policy's own generations against a reference, token by token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SamplingFields
from .sampling import load_model, prompt_subsample, sampled_logits


@dataclass
class PenaltyFields(SamplingFields):
    """A policy, its reference, and the penalties' settings (sampling fields: :class:`SamplingFields`).

    Attributes:
        policy, reference: model ids or folders (same tokenizer); the reference's input embeddings define the cost.
        lam, wasserstein_top_k, metric, max_iter: the WPR penalty's settings (top-k capped at the vocabulary).
    """

    policy: str | None = None
    reference: str | None = None
    lam: float = 100.0
    wasserstein_top_k: int = 128
    metric: str = "euclidean"
    max_iter: int = 1000


@dataclass
class ResponsePenalties:
    """Per response of the policy: prompt, text, and the per-token reverse-KL (log pi/pi_ref of the sampled
    token) and WPR penalties, each a 1-D float tensor over the response's tokens."""

    prompts: list
    responses: list[str]
    kl: list[torch.Tensor]
    wasserstein: list[torch.Tensor]


def response_penalties(config: PenaltyFields, prompts: list | None = None) -> ResponsePenalties:
    """Sample the policy on ``prompts`` (default: the config's subsample) and price every token both ways."""
    from otalign.regularizers import build_regularizer, embedding_matrix

    prompts = prompt_subsample(config) if prompts is None else prompts
    policy, tokenizer = load_model(config.policy, config.model_dtype)
    reference, _ = load_model(config.reference, config.model_dtype)
    embeddings = embedding_matrix(reference, dtype=torch.float32)
    kl_reg = build_regularizer("rkl")
    w_reg = build_regularizer(
        "wasserstein",
        embeddings=embeddings,
        lam=config.lam,
        top_k=min(config.wasserstein_top_k, embeddings.shape[0]),
        metric=config.metric,
        max_iter=config.max_iter,
    )
    out = ResponsePenalties(list(prompts), [], [], [])
    for rollout, logits, ref in sampled_logits(policy, tokenizer, config, prompts, reference):
        mask = rollout.response_mask
        kl = kl_reg.penalty(logits, ref, rollout.responses, mask).per_token
        w = w_reg.penalty(logits, ref, rollout.responses, mask).per_token
        out.responses += rollout.response_texts
        out.kl += [row[m] for row, m in zip(kl, mask, strict=True)]
        out.wasserstein += [row[m] for row, m in zip(w, mask, strict=True)]
    return out
