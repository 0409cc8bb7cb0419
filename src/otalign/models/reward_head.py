"""Reward models: a causal LM's backbone with a scalar head, as a standard ``AutoModelForSequenceClassification``.

The score is the head's logit at the rightmost non-pad token (Hugging Face's pooling), so a saved
checkpoint loads with ``AutoModelForSequenceClassification.from_pretrained`` and scores in any tool,
including :class:`otalign.rewards.ModelReward`. The head is freshly initialised; the backbone keeps the
causal LM's weights (its LM head is dropped).
"""

from __future__ import annotations

import copy
import os

from .loading import resolve_model_path, torch_dtype


def load_reward_model(name_or_path: str | os.PathLike, pad_token_id: int, *, dtype: str = "float32", **kwargs):
    """``AutoModelForSequenceClassification`` with one output from a causal LM or reward-model checkpoint (``kwargs``:
    further ``from_pretrained`` arguments)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name_or_path), num_labels=1, dtype=torch_dtype(dtype), **kwargs
    )
    model.config.pad_token_id = pad_token_id
    return model


def reward_model_from_causal_lm(model, pad_token_id: int):
    """A sequence-classification model (one output) whose backbone is a copy of the in-memory causal LM's."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    reward = AutoModelForSequenceClassification.from_config(config).to(model.dtype)
    reward.base_model.load_state_dict(model.base_model.state_dict())
    return reward
