"""k-NN radii (`otalign.ot.knn`): brute force, blocking, the on-disk cache and errors."""

from __future__ import annotations

import pytest
import torch

import otalign.ot.knn as knn_module
from otalign.ot import content_hash, knn_radius

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _embeddings(seed: int, vocab: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=g, dtype=torch.float64).to(dtype)


def brute_force_radius(emb: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """Full V x V matrix by direct differences, self excluded, k-th smallest per row."""
    x = emb.double()
    if metric == "euclidean":
        dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1)
    else:
        unit = x / x.norm(dim=-1, keepdim=True)
        dist = 1.0 - unit @ unit.T
    dist.fill_diagonal_(float("inf"))
    return dist.sort(dim=-1).values[:, k - 1]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("vocab,dim", [(37, 5), (50, 16), (2, 3)])
def test_matches_brute_force_for_several_k_and_block_sizes(metric, vocab, dim):
    emb = _embeddings(vocab, vocab, dim)
    for k in sorted({1, 2, 5, vocab - 1} & set(range(1, vocab))):
        expected = brute_force_radius(emb, k, metric)
        for block_size in (1, 3, 7, vocab, 1024):
            got = knn_radius(emb, k, metric=metric, block_size=block_size)
            assert got.shape == (vocab,) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_float64_and_half_embeddings():
    emb = _embeddings(1, 40, 8, dtype=torch.float64)
    torch.testing.assert_close(knn_radius(emb, 3, block_size=9).double(), brute_force_radius(emb, 3, "euclidean"))
    half = emb.to(torch.bfloat16)
    got = knn_radius(half, 3, block_size=9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), brute_force_radius(half, 3, "euclidean"), rtol=1e-4, atol=1e-4)


def test_duplicate_rows_are_neighbours_at_distance_zero():
    emb = _embeddings(2, 20, 6)
    emb[7] = emb[3]
    emb[15] = emb[3]
    radius = knn_radius(emb, 1, block_size=4)
    assert radius[3] == 0 and radius[7] == 0 and radius[15] == 0
    assert (radius[[i for i in range(20) if i not in (3, 7, 15)]] > 0).all()
    assert knn_radius(emb, 2, block_size=4)[3] == 0
    assert knn_radius(emb, 3, block_size=4)[3] > 0  # only two duplicates of row 3


def test_never_builds_the_full_matrix(monkeypatch):
    """Each distance block has at most block_size rows: peak memory is block_size x V, not V x V."""
    shapes = []
    real = knn_module.pairwise_cost

    def spy(x, y, metric):
        out = real(x, y, metric)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(knn_module, "pairwise_cost", spy)
    emb = _embeddings(3, 103, 4)
    knn_radius(emb, 4, block_size=10)
    assert len(shapes) == 11
    assert all(rows <= 10 and cols == 103 for rows, cols in shapes)
    assert sum(rows for rows, _ in shapes) == 103


def test_progress_bar_does_not_change_the_result(capsys):
    emb = _embeddings(4, 30, 4)
    torch.testing.assert_close(knn_radius(emb, 2, block_size=8, progress=True), knn_radius(emb, 2, block_size=8))


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class _CountingCost:
    def __init__(self):
        self.calls = 0
        self.real = knn_module.pairwise_cost

    def __call__(self, x, y, metric):
        self.calls += 1
        return self.real(x, y, metric)


def test_cache_is_written_then_reused_without_recomputing(tmp_path, monkeypatch):
    counter = _CountingCost()
    monkeypatch.setattr(knn_module, "pairwise_cost", counter)
    emb = _embeddings(5, 30, 6)
    first = knn_radius(emb, 3, block_size=7, cache_dir=tmp_path)
    assert counter.calls == 5
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"knn-radius-euclidean-k3-{content_hash(emb)}.pt"]
    torch.testing.assert_close(torch.load(files[0]), first, rtol=0, atol=0)

    second = knn_radius(emb.clone(), 3, block_size=7, cache_dir=tmp_path)
    assert counter.calls == 5, "the cached call recomputed distances"
    torch.testing.assert_close(second, first, rtol=0, atol=0)

    # A cached call really reads the file: a planted value comes back.
    planted = torch.arange(30, dtype=torch.float32)
    torch.save(planted, files[0])
    torch.testing.assert_close(knn_radius(emb, 3, cache_dir=tmp_path), planted, rtol=0, atol=0)
    assert counter.calls == 5


def test_cache_is_keyed_by_content_k_and_metric(tmp_path, monkeypatch):
    counter = _CountingCost()
    monkeypatch.setattr(knn_module, "pairwise_cost", counter)
    emb = _embeddings(6, 25, 4)
    base = knn_radius(emb, 2, block_size=25, cache_dir=tmp_path)
    assert counter.calls == 1

    changed = emb.clone()
    changed[11, 2] += 1e-3  # one changed entry: a new hash, a fresh computation
    got = knn_radius(changed, 2, block_size=25, cache_dir=tmp_path)
    assert counter.calls == 2
    torch.testing.assert_close(got.double(), brute_force_radius(changed, 2, "euclidean"), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, base)

    knn_radius(emb, 3, block_size=25, cache_dir=tmp_path)
    knn_radius(emb, 2, metric="cosine", block_size=25, cache_dir=tmp_path)
    assert counter.calls == 4
    assert len(list(tmp_path.glob("knn-radius-*.pt"))) == 4
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_cache_dir_is_created(tmp_path):
    target = tmp_path / "nested" / "cache"
    knn_radius(_embeddings(7, 10, 3), 1, cache_dir=target)
    assert len(list(target.glob("knn-radius-*.pt"))) == 1


def test_content_hash():
    emb = _embeddings(8, 6, 4)
    assert content_hash(emb) == content_hash(emb.clone())
    assert content_hash(emb) == content_hash(emb.T.contiguous().T)  # layout does not matter
    assert len(content_hash(emb)) == 64
    changed = emb.clone()
    changed[0, 0] = torch.nextafter(changed[0, 0], torch.tensor(1e9))
    assert content_hash(changed) != content_hash(emb)
    assert content_hash(emb.reshape(4, 6)) != content_hash(emb)  # same bytes, other shape
    assert content_hash(emb.double()) != content_hash(emb)
    assert content_hash(emb.to(torch.bfloat16)) == content_hash(emb.to(torch.bfloat16).clone())


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, 10, 11])
def test_bad_k_is_a_value_error(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, V-1\] = \[1, 9\]"):
        knn_radius(_embeddings(9, 10, 3), k)


def test_bad_shapes_and_block_size():
    with pytest.raises(ValueError, match="embeddings must be"):
        knn_radius(torch.randn(10), 1)
    with pytest.raises(ValueError, match="embeddings must be"):
        knn_radius(torch.randn(2, 10, 3), 1)
    with pytest.raises(ValueError, match="block_size"):
        knn_radius(torch.randn(10, 3), 1, block_size=0)
    with pytest.raises(ValueError, match="k must be"):
        knn_radius(torch.randn(1, 3), 1)
    with pytest.raises(ValueError, match="unknown metric"):
        knn_radius(torch.randn(10, 3), 1, metric="manhattan")
