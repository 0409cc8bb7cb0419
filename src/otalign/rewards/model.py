"""A Hugging Face sequence-classification reward model (e.g. the output of ``otalign reward``) as a reward.

With the policy's tokenizer (same vocabulary and special tokens) the policy's token ids go straight in.
A reward model with another tokenizer would silently read garbage from those ids, so it is rejected
unless ``retokenize=True``, which decodes prompt and response to text and tokenizes them again with the
reward model's own tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from otalign.models.loading import resolve_model_path, torch_dtype

from .base import Reward


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every token string to the same id and share their special tokens."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


class ModelReward(Reward):
    """Score = the reward model's scalar logit at the sequence's last token (HF's pooling: rightmost non-pad).

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels == 1``.
        tokenizer: the reward model's tokenizer.
        policy_tokenizer: the policy's tokenizer, checked against ``tokenizer``.
        retokenize: score decoded text re-tokenized by ``tokenizer`` instead of the policy's ids.

    Raises:
        ValueError: the model has more than one output, or the tokenizers differ and ``retokenize`` is off.
    """

    name = "reward_model"

    def __init__(self, model, tokenizer, policy_tokenizer, *, retokenize: bool = False) -> None:
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model must have one output (num_labels=1), got {model.config.num_labels}")
        if not retokenize and not same_tokenizer(tokenizer, policy_tokenizer):
            raise ValueError(
                f"the reward model's tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) differs from "
                f"the policy's ({type(policy_tokenizer).__name__}, {len(policy_tokenizer)} tokens): token ids would "
                "mean different things. Use a reward model trained with the policy's tokenizer, or set "
                "reward_retokenize=true to score the decoded text with the reward model's own tokenizer."
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.retokenize = retokenize

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, policy_tokenizer, *, retokenize: bool = False, dtype: str = "float32"
    ) -> ModelReward:
        """Load model and tokenizer with the ``Auto*`` classes from an id or folder."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype))
        return cls(model, AutoTokenizer.from_pretrained(path), policy_tokenizer, retokenize=retokenize)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        responses: list[str],
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        columns: Mapping[str, Sequence] | None = None,
    ) -> torch.Tensor:
        """(B,) scores; ``columns`` are ignored (the model sees only the text)."""
        device = next(self.model.parameters()).device
        if self.retokenize:
            self.tokenizer.padding_side = "left"
            batch = self.tokenizer(
                [p + r for p, r in zip(prompts, responses, strict=True)], return_tensors="pt", padding=True
            ).to(device)
            logits = self.model(**batch).logits
        else:
            logits = self.model(input_ids=sequences.to(device), attention_mask=attention_mask.long().to(device)).logits
        return logits[:, 0].float().to(sequences.device)
