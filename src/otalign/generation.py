"""Sampling shared by the trainers, eval and demos: tokenize prompts, sample responses, run a model on them
(logits, critic values, the exact KL to the reference at each response position).

Sampling is an exact draw from ``softmax(top_p(top_k(logits)) / temperature)`` done with the Gumbel-max
trick inside Hugging Face ``generate`` (greedy decoding of logits plus Gumbel noise). The noise of each
rollout comes from its own generator seeded by ``(seed, sample index)``, so a response depends only on
the model, the prompt and that index: not on batch composition, the number of processes, or resuming.

Layout of a batch: prompts left-padded to ``P`` tokens, responses right-padded to ``T``; the logits that
predict response token ``t`` sit at sequence position ``P - 1 + t``.

Logits with a NaN, a ``+inf`` or a row of ``-inf`` cannot be sampled from: :func:`generate` raises
:class:`~otalign.guard.NonFiniteError` after such a batch instead of returning meaningless tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from otalign.guard import KINDS, NonFiniteError, nonfinite_code
from otalign.regularizers import exact_f_divergence

SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings (WPR paper Table 9 defaults: temperature 0.8, top-k 50, top-p 1.0)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0


@dataclass
class Rollout:
    """A batch of sampled responses.

    Attributes:
        sequences: (B, P + T) int64 prompt + response ids (pad after EOS).
        attention_mask: (B, P + T) bool, True on prompt and generated tokens.
        position_ids: (B, P + T) int64 positions counted over real tokens.
        prompt_length: P.
        responses: (B, T) int64 generated ids.
        response_mask: (B, T) bool, True up to and including the first EOS.
        prompt_texts: the prompts as the model saw them (chat template applied).
        response_texts: decoded responses without special tokens.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_length: int
    responses: torch.Tensor
    response_mask: torch.Tensor
    prompt_texts: list[str]
    response_texts: list[str]

    def right_aligned(self, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` with every sequence's real tokens moved to the end (left padding only), for scoring."""
        mask = self.attention_mask
        order = torch.argsort(mask.long(), dim=1, stable=True)
        ids = torch.gather(self.sequences, 1, order).masked_fill(~torch.gather(mask, 1, order), pad_token_id)
        return ids, torch.gather(mask, 1, order)


def sample_seeds(seed: int, indices: list[int]) -> list[int]:
    """Per-rollout generator seeds for global sample ``indices`` of a run seeded with ``seed``."""
    return [(seed * SEED_STRIDE + i) % (2**63 - 1) for i in indices]


class GumbelSampler:
    """``generate`` logits processor: temperature, top-k and top-p filtering, then per-row Gumbel noise.

    With greedy decoding, ``argmax(filtered_logits / temperature + G)``, ``G ~ Gumbel(0, 1)`` i.i.d., is an
    exact sample from the filtered, tempered softmax.

    Args:
        seeds: one generator seed per batch row.
        params: temperature, top-k (0: off) and top-p (1.0: off).

    Attributes:
        nonfinite: 0-dim int64, the worst :func:`~otalign.guard.nonfinite_code` of the logits seen so far (kept on
            the device: no synchronisation per token).
    """

    def __init__(self, seeds: list[int], params: SamplingParams) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.params = params
        self.nonfinite = torch.zeros((), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = self.params
        self.nonfinite = torch.maximum(self.nonfinite.to(scores.device), nonfinite_code(scores, logits=True))
        scores = scores.float() / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_scores.softmax(-1) > p.top_p  # keep the token crossing top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(scores.device)
        return scores - torch.log(-torch.log(uniform))


def encode_prompts(
    tokenizer, texts: list[str], *, max_prompt_length: int, source: str = "prompts", numbers: list[int] | None = None
) -> list[list[int]]:
    """Token ids of each rendered prompt (no special tokens added: the chat template has them).

    Args:
        source: the prompt file or set, named in messages.
        numbers: each prompt's 1-based row in ``source`` (default 1, 2, ...; see :class:`otalign.data.reading.Rows`).

    Raises:
        ValueError: a prompt with more than ``max_prompt_length`` tokens or none, naming ``source`` and its row.
    """
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    numbers = list(range(1, len(texts) + 1)) if numbers is None else numbers
    for i, ids in enumerate(encoded):
        where = f"{source}, row {numbers[i]}"
        if not ids:
            raise ValueError(f"{where}: the prompt encodes to no tokens: {texts[i]!r:.80}")
        if len(ids) > max_prompt_length:
            raise ValueError(
                f"{where}: the prompt has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}: "
                f"{texts[i]!r:.80}"
            )
    return encoded


def left_pad(batch: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (B, max_len) with each row right-aligned."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = True
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def generate(
    model, tokenizer, prompt_ids: list[list[int]], prompt_texts: list[str], seeds: list[int], params: SamplingParams
) -> Rollout:
    """Sample one response per prompt with :class:`GumbelSampler` (``model`` is an unwrapped HF causal LM).

    Raises:
        NonFiniteError: the model's next-token logits held a NaN, a ``+inf`` or a row of ``-inf``.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    query, query_mask = left_pad(prompt_ids, pad, device)
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True
    )
    sampler = GumbelSampler(seeds, params)
    out = model.generate(
        input_ids=query,
        attention_mask=query_mask.long(),
        generation_config=config,
        logits_processor=LogitsProcessorList([sampler]),
    )
    if code := int(sampler.nonfinite):
        raise NonFiniteError(
            f"the policy's next-token logits at sampling are {KINDS[code]} (its weights are not finite or overflow "
            "in their dtype)"
        )
    width = query.shape[1]
    responses = out[:, width:]
    is_eos = responses == eos
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = ~after_eos
    responses = responses.masked_fill(after_eos, pad)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    texts = tokenizer.batch_decode(
        [r[m] for r, m in zip(responses, response_mask, strict=True)], skip_special_tokens=True
    )
    return Rollout(
        sequences=torch.cat([query, responses], dim=1),
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        prompt_length=width,
        responses=responses,
        response_mask=response_mask,
        prompt_texts=list(prompt_texts),
        response_texts=texts,
    )


def _accepts_logits_to_keep(model) -> bool:
    base = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_logits(model, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """(b, T, V) logits predicting each response token of ``rollout[rows]`` (gradients flow if enabled).

    Only the last ``T + 1`` positions go through the LM head when the model supports ``logits_to_keep``.
    """
    steps = rollout.responses.shape[1]
    kwargs = {"logits_to_keep": steps + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=rollout.sequences[rows],
        attention_mask=rollout.attention_mask[rows].long(),
        position_ids=rollout.position_ids[rows],
        use_cache=False,
        **kwargs,
    ).logits
    return logits[:, -(steps + 1) : -1]


def response_values(critic, rollout: Rollout, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
    """(b, T) critic values of the states before each response token of ``rollout[rows]`` (a
    :class:`~otalign.models.ValueModel` returns one value per position)."""
    steps = rollout.responses.shape[1]
    values = critic(
        input_ids=rollout.sequences[rows],
        attention_mask=rollout.attention_mask[rows].long(),
        position_ids=rollout.position_ids[rows],
    )
    return values[:, -(steps + 1) : -1]


def kl_and_entropy(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, *, chunk_positions: int = 256, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact full-vocabulary :math:`\mathrm{KL}(\pi\|\pi_{ref})` and entropy :math:`H(\pi)` per position (nats).

    Args:
        policy_logits, ref_logits: (..., V) logits (already divided by the sampling temperature), or normalised
            log-probabilities with ``normalized`` (no log-softmax is taken then).
        chunk_positions: positions per chunk (memory ~ ``chunk_positions * V`` floats).

    Returns:
        kl, entropy: (...) float32.
    """
    shape = policy_logits.shape[:-1]
    policy = policy_logits.reshape(-1, policy_logits.shape[-1])
    ref = ref_logits.reshape(-1, ref_logits.shape[-1])
    kl = torch.empty(policy.shape[0], device=policy.device)
    entropy = torch.empty_like(kl)
    for start in range(0, policy.shape[0], chunk_positions):
        p, q = policy[start : start + chunk_positions].float(), ref[start : start + chunk_positions].float()
        if not normalized:
            p, q = torch.log_softmax(p, dim=-1), torch.log_softmax(q, dim=-1)
        kl[start : start + chunk_positions] = exact_f_divergence(p, q, "rkl")
        entropy[start : start + chunk_positions] = -(p.exp() * p).sum(-1)
    return kl.reshape(shape), entropy.reshape(shape)


def sample_batches(
    policy, tokenizer, prompt_texts: list[str], prompt_ids: list[list[int]], seeds: list[int], params, batch_size: int
) -> Iterator[Rollout]:
    """One :class:`Rollout` per ``batch_size`` prompts, prompt ``i`` sampled with generator seed ``seeds[i]``
    (:func:`sample_seeds`), so a response does not depend on the batching."""
    for start in range(0, len(prompt_ids), batch_size):
        stop = min(start + batch_size, len(prompt_ids))
        yield generate(policy, tokenizer, prompt_ids[start:stop], prompt_texts[start:stop], seeds[start:stop], params)
