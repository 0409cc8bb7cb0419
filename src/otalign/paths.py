"""What a ``path`` field of a config may name, and what is wrong with a value that names it.

A config field's ``path`` metadata is one of :data:`PATH_KINDS` (see :mod:`otalign.config`):

- ``file``: an input file that exists and is readable; ``dir``: the same for a folder (a checkpoint);
- ``data``: a dataset: a readable file or folder, or (when it does not look like a path) a Hugging Face dataset
  name, which cannot be checked offline;
- ``model``: a readable model folder holding ``config.json``, ``default`` (the embedded model), or (when it
  does not look like a path) a Hugging Face id ``name`` or ``owner/name``: ``runs/sft/model`` or ``./m``
  that does not exist is "model folder ... does not exist", never a hub lookup;
- ``output``: a file or folder the command writes: it, or else its nearest existing parent, is writable;
  ``output_dir`` and ``output_file`` the same, for a folder (an existing file is refused) and a file (an existing
  folder is refused).

A string *looks like a path* when it starts with ``.``, ``/`` or ``~``, holds more than one ``/`` (or a
``\\``), or ends in a data file's extension.

:func:`path_problem` is the one check: :meth:`otalign.config.Config.validate` runs it on every ``path`` field, and
:func:`otalign.models.resolve_model_path` on a model before loading it. Stdlib only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL = "default"
"""The name that selects the embedded default model wherever a model id or path is accepted."""

PATH_KINDS = ("file", "dir", "data", "model", "output", "output_dir", "output_file")
"""Kinds of ``path`` field metadata (see the module docstring)."""
DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".yaml", ".yml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_path(value: str) -> bool:
    """Whether ``value`` reads as a local path rather than a Hugging Face name (rule in the module docstring)."""
    return (
        value.startswith((".", "/", "~"))
        or value.count("/") > 1
        or "\\" in value
        or value.lower().endswith(DATA_SUFFIXES)
    )


def path_problem(kind: str, value: str) -> str | None:
    """What is wrong with ``value`` as a ``path`` of ``kind`` (:data:`PATH_KINDS`), or None if it passes."""
    path = Path(value).expanduser()
    if kind.startswith("output"):
        if path.exists():
            if kind == "output_dir" and not path.is_dir():
                return f"{value} is a file, not a folder; give a folder to write into"
            if kind == "output_file" and path.is_dir():
                return f"{value} is a folder; give the name of the file to write"
            return None if os.access(path, os.W_OK) else f"{value} is not writable"
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create {value}: {parent} is not a writable folder"
        return None
    noun = {"file": "file", "dir": "folder", "data": "dataset", "model": "model folder"}[kind]
    if path.exists():
        if kind == "file" and not path.is_file():
            return f"{value} is not a file"
        if kind == "dir" and not path.is_dir():
            return f"{value} is not a folder"
        if kind == "model" and not path.is_dir():
            return f"model {value} is a file; give the folder holding config.json"
        if kind == "model" and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            hint = (
                f" (a run folder? its model is {path / 'model'})" if (path / "model" / "config.json").is_file() else ""
            )
            return f"model folder {value} has no config.json{hint}"
        readable = os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))
        return None if readable else f"{noun} {value} is not readable"
    if kind in ("file", "dir") or looks_like_path(value):
        return f"{noun} {value} does not exist"
    if kind == "model" and not _HUB_ID.match(value):
        return f"model {value!r} is neither a local folder, 'default' nor a Hugging Face id (owner/name)"
    return None
