"""KL and Wasserstein penalties of a policy's own generations against a reference, token by token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from otalign.regularizers.wasserstein import METRICS

from ..config import SamplingFields
from .sampling import load_model, prompt_subsample, sampled_positions


@dataclass
class PenaltyFields(SamplingFields):
    """A policy, its reference (same tokenizer; the reference's input embeddings define the cost), and the WPR
    penalty's settings (top-k capped at the vocabulary); sampling fields: :class:`SamplingFields`."""

    policy: str | None = field(default=None, metadata={"path": "model", "help": "the policy model id or folder"})
    reference: str | None = field(default=None, metadata={"path": "model", "help": "the reference model id or folder"})
    lam: float = field(
        default=100.0,
        metadata={
            "help": "WPR entropic scale lambda (1/epsilon; lambda x cost past ~1e7 is below float32's resolution)",
            "check": "(0, 1e6]",
        },
    )
    wasserstein_top_k: int = field(
        default=128, metadata={"help": "tokens of each distribution in the WPR support", "check": ">= 1"}
    )
    metric: str = field(default="euclidean", metadata={"help": "WPR token cost", "choices": METRICS})
    max_iter: int = field(default=1000, metadata={"help": "Sinkhorn iterations at most", "check": ">= 1"})


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
    for rollout, batch in sampled_positions(policy, tokenizer, config, prompts, reference):
        mask = rollout.response_mask
        kl, w = torch.zeros(mask.shape, device=mask.device), torch.zeros(mask.shape, device=mask.device)
        for positions in batch:
            logp, ref_logp = (x[None] for x in positions.log_probs)
            at = (positions.rows, positions.cols)
            kl[at] = kl_reg.penalty(logp, ref_logp, positions.tokens[None]).per_token[0]
            w[at] = w_reg.penalty(logp, ref_logp, positions.tokens[None]).per_token[0]
        out.responses += rollout.response_texts
        out.kl += [row[m] for row, m in zip(kl, mask, strict=True)]
        out.wasserstein += [row[m] for row, m in zip(w, mask, strict=True)]
    return out
