"""What a ``path`` field of a config may name, and what is wrong with a value that names it.

A config field's ``path`` metadata is one of :data:`PATH_KINDS` (see :mod:`otalign.config`):

- ``file``: an input file that exists and is readable; ``dir``: the same for a folder (a checkpoint);
- ``data``: a dataset: a readable file or folder, or (when it does not look like a path) a Hugging Face dataset
  name, which cannot be checked offline;
- ``model``: a readable model folder holding ``config.json`` and whole weight files (:func:`weights_problem`),
  ``default`` (the embedded model), or (when it
  does not look like a path) a Hugging Face id ``name`` or ``owner/name``: ``runs/sft/model`` or ``./m``
  that does not exist is "model folder ... does not exist", never a hub lookup;
- ``output``: a file or folder the command writes: it, or else its nearest existing parent, is writable;
  ``output_dir`` and ``output_file`` the same, for a folder (an existing file is refused) and a file (an existing
  folder is refused).

A string *looks like a path* when it starts with ``.``, ``/`` or ``~``, holds more than one ``/`` (or a
``\\``), or ends in a data file's extension.

:func:`path_problem` is the one check: :meth:`otalign.config.Config.validate` runs it on every ``path`` field, and
:func:`otalign.models.resolve_model_path` on a model before loading it.

**Atomic outputs.** Every final artefact a command writes (a saved model folder, a JSON report, a plot, a data
split) is written through :func:`written_atomically`: into a hidden temporary sibling, renamed into place once
whole. A failed write (a full disk) removes the temporary sibling and leaves the previous output, or nothing; on a
full disk it raises :class:`OutputError`, one line naming the path and the free space. Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator
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


def _creation_problem(value: str, parent: Path) -> str | None:
    """Whether a folder can really be created in ``parent`` (``os.access`` answers yes for root on ``/proc`` or
    ``/sys``, which refuse new entries): a hidden probe folder is made and removed, by the main process only (the
    launcher's ``RANK`` unset or 0: the other processes of a run write nothing)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".otalign-probe-", dir=parent))
    except OSError as err:
        return f"cannot create {value}: {parent} does not take new files ({err.strerror or err})"
    return None


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
        return _creation_problem(value, parent)
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
        if kind == "model" and (problem := weights_problem(path)):
            return problem
        readable = os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))
        return None if readable else f"{noun} {value} is not readable"
    if kind in ("file", "dir") or looks_like_path(value):
        return f"{noun} {value} does not exist"
    if kind == "model" and not _HUB_ID.match(value):
        return f"model {value!r} is neither a local folder, 'default' nor a Hugging Face id (owner/name)"
    return None


HUB_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _hub_cache_folders(kind: str, value: str) -> list[Path]:
    """Where the Hugging Face libraries keep ``value`` once downloaded: the hub cache's ``models--owner--name``
    (``datasets--owner--name``), and for a dataset the ``datasets`` library's ``owner___name``."""
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    repo = "--".join([("datasets" if kind == "data" else "models"), *value.split("/")])
    folders = [hub.expanduser() / repo]
    if kind == "data":
        folders.append(
            Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser() / value.replace("/", "___")
        )
    return folders


@functools.lru_cache(maxsize=4)
def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at ``endpoint`` (a URL) cannot be reached from here, or None when a TCP connection to it opens
    (3 s at most; the answer is kept for the process)."""
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=3).close()
    except OSError as err:
        return f"{parts.hostname} cannot be reached: {err.strerror or err}"
    return None


def hub_problem(kind: str, value: str) -> str | None:
    """What stops ``value``, a Hugging Face id (kind ``model``) or dataset name (``data``) that is not a local
    path, from loading, or None: it is not in the local cache and nothing may be downloaded (an ``HF_HUB_OFFLINE``-
    style variable is set, or the hub's host cannot be reached). Local paths and cached names pass unchecked."""
    if kind not in ("model", "data") or value == DEFAULT_MODEL or looks_like_path(value) or Path(value).exists():
        return None
    if any(folder.is_dir() for folder in _hub_cache_folders(kind, value)):
        return None
    noun = {"model": "a local model folder", "data": "a local dataset file or folder"}[kind]
    offline = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes")]
    if offline:
        why = f"{offline[0]} is set"
    elif reason := hub_unreachable(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT):
        why = f"no network ({reason})"
    else:
        return None
    return f"{value!r} is not {noun} nor in the Hugging Face cache, and nothing may be downloaded: {why}"


def _safetensors_problem(path: Path) -> str | None:
    """A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON header (each tensor's
    ``data_offsets`` into the data that follows), then the data: its size must be 8 + N + the largest end offset."""
    size = path.stat().st_size
    if size == 0:
        return f"weight file {path} is empty (0 bytes): a copy or save cut short; copy or save the model again"
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else size
        if size < 8 or 8 + n > size:
            return f"weight file {path} is truncated: {size} bytes, shorter than its own header; copy it again"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"weight file {path} is not a safetensors file (its header is not readable)"
    if size != 8 + n + end:
        return f"weight file {path} is truncated: {size} bytes where its header describes {8 + n + end}; copy it again"
    return None


def weights_problem(folder: str | Path) -> str | None:
    """What is wrong with the weight files of the model folder ``folder``, or None: a ``*.safetensors`` file that is
    empty, cut short or longer than its header says, a ``*.bin`` that is empty or a zip archive cut short (torch's
    format), a shard named by a ``*.index.json`` that is missing. Reads headers only (no tensor data)."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return problem
    for path in sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        if size == 0:
            return f"weight file {path} is empty (0 bytes): a copy or save cut short; copy or save the model again"
        with path.open("rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        if zipped and not zipfile.is_zipfile(path):
            return f"weight file {path} is truncated (its zip directory is missing); copy it again"
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"weight index {index} is not readable JSON with a weight_map"
        if missing := sorted(s for s in shards if not (folder / s).is_file()):
            return f"weight index {index} names shards that are missing: {', '.join(missing)}"
    return None


class OutputError(OSError):
    """An output could not be written (a full disk); the message is one line naming the path."""


LOW_SPACE = 16 << 20
"""Free bytes under which a failed write is taken for a full disk, whatever the error says (torch's zip writer
reports one as ``unexpected pos 576 vs 534``)."""


def out_of_space(err: BaseException, free: int) -> bool:
    """Whether ``err`` (from the OS, torch, pickle or safetensors), raised with ``free`` bytes left on the disk,
    means a full disk or an exceeded quota."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    if any(s in text for s in ("no space left", "file write failed", "quota exceeded", "os error 28")):
        return True
    return free < LOW_SPACE and isinstance(err, (OSError, RuntimeError))


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``512 B``, ``93 KiB``, ``2.1 MiB``, ``1.5 GiB``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def tree_bytes(path: Path) -> int:
    """Bytes of the file ``path``, or of every file under the folder ``path`` (0 if absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    return shutil.disk_usage(existing).free


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def written_atomically(target: str | Path) -> Iterator[Path]:
    """Write the file or folder ``target`` whole or not at all.

    Yields a temporary sibling path (``.tmp-<pid>-<name>``: same folder, so the same disk, and the same suffix, so a
    plot library picks the same format) for the block to create as a file or a folder. When the block ends, the
    temporary is renamed to ``target``; an existing ``target`` is replaced only then (a folder: renamed aside, the
    new one renamed in, the old one removed). When the block fails, the temporary is removed and ``target`` is left
    as it was; a full disk (:func:`out_of_space`) becomes :class:`OutputError`, other errors pass through.
    Temporaries of ``target`` left by a killed earlier write are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    for stale in target.parent.glob(f".tmp-*-{glob.escape(target.name)}"):  # left by a killed earlier write
        _remove(stale)
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".old-{os.getpid()}-{target.name}")
            _remove(old)
            os.rename(target, old)
            os.rename(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except Exception as err:
        written = tree_bytes(tmp)
        _remove(tmp)
        free = free_bytes(target.parent)
        if not out_of_space(err, free):
            raise
        if target.exists():
            need, kept = f", it needs about {size_text(max(written, tree_bytes(target)))}", f"{target} is as it was"
        else:
            need, kept = f", it needs more than {size_text(max(written, free))}", "nothing was left"
        raise OutputError(
            f"no space left to write {target}: {size_text(free)} free on its disk{need} (the partial write was "
            f"removed; {kept})"
        ) from None


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`written_atomically`: the file is whole or as it was."""
    with written_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
