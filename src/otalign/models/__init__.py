"""Model loading: any Hugging Face id or local folder, the embedded default model, the frozen reference,
the critic with a value head, and optional LoRA adapters."""

from __future__ import annotations

from .default import DEFAULT_MODEL, cache_root, default_model_path, gguf_path
from .loading import (
    AdapterDisabled,
    apply_lora,
    check_fits_context,
    context_window,
    frozen_copy,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from .value_head import ValueModel

__all__ = [
    "DEFAULT_MODEL",
    "AdapterDisabled",
    "ValueModel",
    "apply_lora",
    "cache_root",
    "check_fits_context",
    "context_window",
    "default_model_path",
    "frozen_copy",
    "gguf_path",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model_path",
    "torch_dtype",
]
