"""The PPO critic: a transformer backbone with a scalar value head on every position."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .loading import resolve_model_path, torch_dtype


def hidden_size(config) -> int:
    """Width of a Hugging Face model's last hidden state."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


class ValueModel(nn.Module):
    r"""Critic :math:`V_\psi(x, y_{<t})`: backbone hidden state :math:`h_t` -> ``Linear(d, 1)`` -> value.

    Args:
        backbone: a Hugging Face base model (``AutoModel``) returning ``last_hidden_state`` (B, T, d).
        hidden: d, the width of the hidden state.

    The head starts at zero (every value 0), so the first critic update does not inherit noise. With
    ``freeze_backbone`` only the head trains and the backbone runs without autograd (a cheap critic).
    """

    def __init__(self, backbone: nn.Module, hidden: int, *, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(not freeze_backbone)
        self.freeze_backbone = freeze_backbone
        self.v_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: str = "float32", freeze_backbone: bool = False
    ) -> ValueModel:
        """Backbone from ``AutoModel.from_pretrained`` (a causal LM, a reward model, or ``"default"``)."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype))
        return cls(backbone, hidden_size(backbone.config), freeze_backbone=freeze_backbone)

    @classmethod
    def from_causal_lm(cls, model: nn.Module, *, freeze_backbone: bool = False) -> ValueModel:
        """Critic whose backbone is a copy of a causal LM's base model (its weights, not shared)."""
        base = copy.deepcopy(getattr(model, model.base_model_prefix))
        return cls(base, hidden_size(model.config), freeze_backbone=freeze_backbone)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Values (B, T) float32 of every position of ``input_ids`` (B, T)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            hidden = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
