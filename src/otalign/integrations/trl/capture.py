"""The final hidden states of a TRL forward pass, kept from the backbone that TRL's fused LM head runs.

TRL's fused head (``model(..., labels=..., fused_lm_head=True)``) runs the backbone, then projects its
``last_hidden_state`` through the LM head in tiles and returns only per-token log-probabilities. A forward hook on
that backbone keeps ``last_hidden_state``: (B, L, d) per call, O(d) per position, never O(V); with gradient when
the pass has one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside ``model``: past DDP/DeepSpeed's ``.module`` and PEFT's ``get_base_model``
    (the module TRL patched with its fused head)."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    if callable(getattr(inner, "get_base_model", None)):
        inner = inner.get_base_model()
    return inner


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output's ``last_hidden_state`` the LM head of ``model`` projects (``base_model`` of its
    causal LM, as TRL's fused head calls it)."""
    lm = causal_lm(model)
    body = getattr(lm, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is lm:
        raise ValueError(f"{type(lm).__name__} exposes no backbone (base_model) for its LM head")
    return body


@contextmanager
def hidden_states(model: torch.nn.Module, *, detach: bool) -> Iterator[list[torch.Tensor]]:
    """While open, every forward of ``model``'s backbone appends its (B, L, d) ``last_hidden_state`` (detached when
    ``detach``) to the yielded list."""
    kept: list[torch.Tensor] = []

    def keep(module, args, output) -> None:
        state = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        kept.append(state.detach() if detach else state)

    handle = backbone(model).register_forward_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()
