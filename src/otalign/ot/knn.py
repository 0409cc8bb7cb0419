"""k-nearest-neighbour radii of an embedding matrix, blocked and cached on disk.

The WPR paper's nearest-k1 cost truncation (cost(i, j) = +inf unless j is among the k1 nearest
neighbours of i or i among those of j) is equivalent to ``cost(i, j) <= max(r_i, r_j)`` with
``r_i`` the distance of row i to its k1-th nearest other row. Storing one radius per token is
O(V) memory instead of the paper's V x k1 index.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .costs import pairwise_cost


def content_hash(matrix: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes (hex)."""
    data = matrix.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def knn_radius(
    embeddings: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    block_size: int = 1024,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Distance from each row of ``embeddings`` to its ``k``-th nearest *other* row.

    Args:
        embeddings: (V, d) matrix (e.g. a model's input embeddings).
        k: neighbour rank, 1 <= k < V.
        metric: a cost name from :mod:`otalign.ot.costs`.
        block_size: rows per block; peak extra memory is ``block_size * V`` floats.
        cache_dir: if given, the radii are stored there under the matrix's content hash
            (with ``k`` and ``metric``) and reused; writes are atomic.
        progress: show a progress bar over blocks.

    Returns:
        (V,) float32 radii on the embeddings' device. Identical rows count as neighbours at
        distance 0.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (V, d), got shape {tuple(embeddings.shape)}")
    vocab = embeddings.shape[0]
    if not 1 <= k < vocab:
        raise ValueError(f"k must be in [1, V-1] = [1, {vocab - 1}], got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"knn-radius-{metric}-k{k}-{content_hash(embeddings)}.pt"
        if cache_file.exists():
            return torch.load(cache_file, map_location=embeddings.device)

    radii = torch.empty(vocab, dtype=torch.float32, device=embeddings.device)
    starts = range(0, vocab, block_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"k-NN radius (k={k})", unit="block")
    with torch.no_grad():
        for start in starts:
            stop = min(start + block_size, vocab)
            dist = pairwise_cost(embeddings[start:stop], embeddings, metric)
            rows = torch.arange(stop - start, device=dist.device)
            dist[rows, rows + start] = torch.inf  # a row is not its own neighbour
            radii[start:stop] = dist.topk(k, dim=-1, largest=False).values[:, -1].float()

    if cache_file is not None:
        save_atomic(radii.cpu(), cache_file)
    return radii


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
