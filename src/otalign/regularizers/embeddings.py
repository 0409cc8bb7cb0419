"""The token-embedding matrix that defines WPR's ground cost, taken from a Hugging Face model.

WPR's default cost is the Euclidean distance between the reference model's *input* embeddings; the
output embeddings (the LM head) or the embeddings of another model with the same tokenizer are options.
The matrix must have exactly one row per logit: :func:`check_vocab_size` rejects anything else.
"""

from __future__ import annotations

import os

import torch

EMBEDDING_SOURCES = ("input", "output")


def check_vocab_size(embeddings: torch.Tensor, vocab_size: int, *, what: str = "the logits") -> None:
    """Raise ``ValueError`` unless ``embeddings`` is a (V, d) matrix with ``V == vocab_size``.

    Args:
        embeddings: (V, d) token-embedding matrix.
        vocab_size: number of logits per position (the vocabulary the penalty sees).
        what: how the error message names the source of ``vocab_size``.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a floating-point (V, d) matrix, got {shape}")
    if embeddings.shape[0] != vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the embedding matrix has {embeddings.shape[0]} rows but {what} have "
            f"{vocab_size} entries per position; take the embeddings from a model with the same tokenizer and "
            "the same (padded) vocabulary size as the policy"
        )


def embedding_matrix(
    model: torch.nn.Module,
    *,
    source: str = "input",
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The (V, d) token-embedding matrix of a Hugging Face model, detached from its parameters.

    Args:
        model: a ``transformers`` model (anything with ``get_input_embeddings`` / ``get_output_embeddings``).
        source: ``"input"`` (the token embeddings, WPR's default) or ``"output"`` (the LM head's weight).
        vocab_size: if given, the number of logits the matrix will serve; a mismatch raises ``ValueError``.
        dtype: cast to this dtype (default: keep the model's).
        device: move to this device (default: keep the model's).

    Returns:
        A new (V, d) tensor (a copy: later updates of the model do not change it).
    """
    if source not in EMBEDDING_SOURCES:
        raise ValueError(f"source must be one of {EMBEDDING_SOURCES}, got {source!r}")
    getter = "get_input_embeddings" if source == "input" else "get_output_embeddings"
    module = getattr(model, getter, lambda: None)()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no {source} embedding matrix ({getter}() gave {module!r})")
    if hasattr(weight, "ds_shape") or weight.dim() != 2 or weight.is_meta:
        # DeepSpeed ZeRO-3 (zero3_init_flag) partitions the weight into a flat shard; FSDP's low-memory
        # loading leaves it on the meta device: either way this process does not hold the matrix.
        raise ValueError(
            f"the {source} embedding matrix of {type(model).__name__} is not whole on this process (shape "
            f"{tuple(weight.shape)}, {'DeepSpeed-partitioned' if hasattr(weight, 'ds_shape') else weight.device}): "
            "load the reference model whole on every process (zero3_init_flag: false, "
            "fsdp_cpu_ram_efficient_loading: false)"
        )
    matrix = weight.detach().to(dtype=dtype, device=device).clone()
    if vocab_size is not None:
        check_vocab_size(matrix, vocab_size)
    return matrix


def load_embedding_matrix(
    name_or_path: str | os.PathLike,
    *,
    source: str = "input",
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    **from_pretrained_kwargs,
) -> torch.Tensor:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` and return its embedding matrix.

    Use it for another model with the same tokenizer as the policy. Arguments as in
    :func:`embedding_matrix`; ``from_pretrained_kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return embedding_matrix(model, source=source, vocab_size=vocab_size, dtype=dtype, device=device)
