"""Load tokenizers and causal LMs from a Hugging Face id, a local folder, or ``"default"`` (the embedded model).

The frozen reference model is a parameter-free-of-gradients copy of the policy as it was before training;
LoRA adapters (through the optional ``peft`` package) make the policy train only low-rank updates.
"""

from __future__ import annotations

import copy
import os

import torch

from otalign.paths import DEFAULT_MODEL, hub_problem, path_problem

from .default import default_model_path

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """``"default"`` -> the converted default checkpoint folder; a local folder or a Hugging Face id is returned
    unchanged.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a path (:func:`otalign.paths.looks_like_path`) and is not a
            readable folder, or is not a plausible hub id either: "model folder X does not exist".
    """
    if str(name_or_path) == DEFAULT_MODEL:
        return str(default_model_path())
    if problem := path_problem("model", str(name_or_path)) or hub_problem("model", str(name_or_path)):
        raise FileNotFoundError(problem)
    return str(name_or_path)


def context_window(model) -> int | None:
    """The most positions ``model`` takes: its text config's ``max_position_embeddings``, or None when the config
    sets no such limit."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def check_fits_context(model, tokens: int, what: str, advice: str) -> None:
    """``ValueError`` "``what`` has ``tokens`` tokens, more than the model's context of L; ``advice``" when ``tokens``
    exceeds :func:`context_window` (nothing when the model sets no limit)."""
    limit = context_window(model)
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} has {tokens} tokens, more than the model's context of {limit}; {advice}")


def torch_dtype(name: str) -> torch.dtype | str:
    """The dtype called ``name`` (``auto``, ``float32``, ``bfloat16``, ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"unknown model dtype {name!r}; choose one of {tuple(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str | os.PathLike):
    """``AutoTokenizer`` for ``name_or_path``; a tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str | os.PathLike, *, dtype: str = "float32", **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on the resolved path, in ``dtype`` (see :func:`torch_dtype`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=torch_dtype(dtype), **kwargs)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` everywhere (the reference policy)."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


class AdapterDisabled:
    """The base model under a peft model's adapters, as a frozen reference: ``ref(**inputs)`` runs ``peft_model``
    with its adapters disabled and without gradients. TRL's reference for LoRA training: no second copy of the
    weights, and exactly the frozen base's outputs (a disabled LoRA layer is its base layer).

    Deliberately not an ``nn.Module``: ``.eval()``, ``.to()`` and ``.requires_grad_()`` on the reference must not
    reach the policy whose weights it shares, so they are no-ops here.
    """

    def __init__(self, peft_model) -> None:
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"AdapterDisabled needs a peft model, got {type(peft_model).__name__}")
        self.peft_model = peft_model

    @property
    def config(self):
        return self.peft_model.config

    @property
    def module(self):
        """The base transformers model (whose ``forward`` signature the generation helpers inspect)."""
        return self.peft_model.get_base_model()

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    def eval(self) -> AdapterDisabled:
        return self

    def to(self, *args, **kwargs) -> AdapterDisabled:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterDisabled:
        return self


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = "all-linear",
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` in ``peft`` LoRA adapters (only the adapters train; with ``task_type="SEQ_CLS"`` the
    scalar head trains fully too).

    Raises:
        ImportError: ``peft`` is not installed (``pip install 'otalign[peft]'``).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs the optional 'peft' package: pip install 'otalign[peft]'") from None
    if isinstance(target_modules, list) and target_modules == ["all-linear"]:
        target_modules = "all-linear"  # peft's keyword for every linear layer but the output head
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type)
    return get_peft_model(model, config)
