"""The similar-tiles index: exact vs IVF recall, persistence, add, edge cases (small and fast)."""
from __future__ import annotations

import numpy as np
import pytest

from core.store.vector_index import VectorIndex, default_nlist, recall_at_k

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, *, n_clusters: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random directions, like tile embeddings of tissue types."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_clusters, DIM)))
    labels = rng.integers(n_clusters, size=n)
    return unit(centres[labels] + rng.normal(scale=spread / np.sqrt(DIM), size=(n, DIM)))


@pytest.fixture(scope="module")
def data():
    x = clustered(10_000)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 1000      # ids need not be row numbers
    return x, ids


@pytest.fixture(scope="module")
def held_out():
    """Queries from the same distribution as ``data`` (same seed, hence same clusters), not indexed."""
    return clustered(10_300)[10_000:]


def brute_force(x, ids, q, k):
    s = q @ x.T
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def test_exact_matches_brute_force(data):
    x, ids = data
    index = VectorIndex.build(x, ids)
    assert index.kind == "exact" and len(index) == len(x)
    q = x[:50]
    scores, found = index.search(q, 24)
    ref_s, ref_i = brute_force(x, ids, q, 24)
    assert scores.shape == found.shape == (50, 24)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)
    assert recall_at_k(found, ref_i) > 0.99          # only exact ties may swap
    assert (found[:, 0] == ids[:50]).all()           # each vector is its own nearest neighbour
    assert (np.diff(scores, axis=1) <= 1e-6).all()   # descending


def test_exact_search_in_blocks_equals_single_block(data, monkeypatch):
    """A small score budget forces the blocked path (many row blocks merged); results must not change."""
    import core.store.vector_index as vi

    x, ids = data
    index = VectorIndex.build(x, ids)
    q = x[::97]
    whole = index.search(q, 24)
    monkeypatch.setattr(vi, "_BLOCK_SCORES", 1024 * len(q))      # 1024-row blocks
    blocked = index.search(q, 24)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-5, atol=1e-6)   # BLAS sums differ by block


@pytest.mark.parametrize("quantizer", ["flat", "hnsw"])
def test_ivf_recall_against_exact(data, held_out, quantizer):
    pytest.importorskip("faiss")
    x, ids = data
    ivf = VectorIndex.build(x, ids, kind="ivf", quantizer=quantizer, target_recall=0.95, seed=0)
    assert ivf.kind == "ivf" and ivf.nlist == default_nlist(len(x)) and len(ivf) == len(x)
    assert ivf.quantizer == quantizer
    assert 1 <= ivf.nprobe <= ivf.nlist and ivf.recall >= 0.95
    q = held_out                                     # fresh queries, not used for tuning
    _, truth = VectorIndex.build(x, ids, kind="exact").search(q, 24)
    _, found = ivf.search(q, 24)
    assert recall_at_k(found, truth) >= 0.9


def test_tune_without_ground_truth_scans_every_cell_for_it(data):
    pytest.importorskip("faiss")
    x, ids = data
    ivf = VectorIndex.build(x, ids, kind="ivf", target_recall=0.5)
    low = ivf.nprobe
    nprobe, recall = ivf.tune(x[:100], k=24, target=0.99)
    assert nprobe == ivf.nprobe >= low and recall >= 0.99


def test_auto_switches_to_ivf_above_threshold(data):
    pytest.importorskip("faiss")
    x, ids = data
    assert VectorIndex.build(x[:1000], ids[:1000], exact_max=5000).kind == "exact"
    assert VectorIndex.build(x[:1000], ids[:1000], exact_max=5000, expected_size=10_000).kind == "ivf"
    assert VectorIndex.build(x, ids, exact_max=5000).kind == "ivf"


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_save_load_round_trip(tmp_path, data, kind):
    if kind == "ivf":
        pytest.importorskip("faiss")
    x, ids = data
    index = VectorIndex.build(x, ids, kind=kind)
    index.save(tmp_path / "idx")
    again = VectorIndex.load(tmp_path / "idx")
    assert (again.kind, again.dim, len(again), again.nprobe, again.nlist) == \
           (index.kind, index.dim, len(index), index.nprobe, index.nlist)
    q = x[100:120]
    s1, i1 = index.search(q, 24)
    s2, i2 = again.search(q, 24)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No vector index"):
        VectorIndex.load(tmp_path / "nothing")


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_add_then_search_finds_added_ids(data, kind):
    if kind == "ivf":
        pytest.importorskip("faiss")
    x, ids = data
    index = VectorIndex.build(x, ids, kind=kind)
    new = clustered(30, seed=9)
    new_ids = np.arange(30, dtype=np.int64) + 10**12
    index.add(new, new_ids)
    assert len(index) == len(x) + 30
    _, found = index.search(new, 5)
    assert (found[:, 0] == new_ids).all()


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_k_larger_than_index(kind):
    if kind == "ivf":
        pytest.importorskip("faiss")
    x = clustered(200, seed=4)
    ids = np.arange(200, dtype=np.int64)
    index = VectorIndex.build(x, ids, kind=kind)
    scores, found = index.search(x[:3], 500)
    assert scores.shape == found.shape == (3, 500)
    assert (found[:, 0] == ids[:3]).all()
    for row_s, row_i in zip(scores, found):
        real = row_i >= 0
        assert real.sum() <= 200 and (row_i[~real] == -1).all() and np.isneginf(row_s[~real]).all()
        assert len(set(row_i[real])) == real.sum()   # no duplicates
    if kind == "exact":
        assert (found >= 0).sum(axis=1).tolist() == [200, 200, 200]


def test_empty_exact_index_returns_padding():
    index = VectorIndex(DIM)
    scores, found = index.search(np.ones((2, DIM), np.float32), 3)
    assert (found == -1).all() and np.isneginf(scores).all()


def test_mismatched_dimension_raises(data):
    x, ids = data
    index = VectorIndex.build(x[:500], ids[:500])
    with pytest.raises(ValueError, match="index holds 32-d"):
        index.search(np.ones((1, 16), np.float32), 5)
    with pytest.raises(ValueError, match="dimension 16"):
        index.add(np.ones((3, 16), np.float32), np.arange(3))
    with pytest.raises(ValueError, match="ids must be"):
        VectorIndex.build(x[:10], ids[:9])
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex.build(np.full((4, DIM), np.nan, np.float32), np.arange(4))


def test_single_query_vector_is_accepted(data):
    x, ids = data
    index = VectorIndex.build(x[:1000], ids[:1000])
    scores, found = index.search(x[0], 4)
    assert found.shape == (1, 4) and found[0, 0] == ids[0]


def test_running_top_k_over_batches_equals_one_exact_search(data):
    from core.store.vector_index import _RunningTopK

    x, ids = data
    q = x[::250]
    running = _RunningTopK(q, 24)
    for start in range(0, len(x), 777):                  # uneven batches, the last one short
        running.update(x[start:start + 777], ids[start:start + 777])
    ref_s, ref_i = brute_force(x, ids, q, 24)
    np.testing.assert_allclose(running.scores, ref_s, rtol=1e-5, atol=1e-6)
    assert recall_at_k(running.ids, ref_i) > 0.99        # only exact ties may swap


def test_build_streamed_from_batches_reaches_the_recall_of_build(data, held_out):
    pytest.importorskip("faiss")
    x, ids = data
    rng = np.random.default_rng(3)
    train = x[np.sort(rng.choice(len(x), size=3000, replace=False))]
    batches = ((x[s:s + 1000], ids[s:s + 1000]) for s in range(0, len(x), 1000))
    ivf = VectorIndex.build_streamed(batches, train=train, total=len(x), kind="ivf", target_recall=0.95)
    assert ivf.kind == "ivf" and len(ivf) == len(x) and ivf.nlist == default_nlist(len(x))
    assert ivf.recall >= 0.95
    _, truth = VectorIndex.build(x, ids, kind="exact").search(held_out, 24)
    assert recall_at_k(ivf.search(held_out, 24)[1], truth) >= 0.9


def test_build_streamed_exact_kind_concatenates_the_batches(data):
    x, ids = data
    batches = [(x[s:s + 3000], ids[s:s + 3000]) for s in range(0, len(x), 3000)]
    index = VectorIndex.build_streamed(batches, train=None, total=len(x))
    assert index.kind == "exact" and len(index) == len(x)
    np.testing.assert_array_equal(index.search(x[:20], 24)[1], VectorIndex.build(x, ids).search(x[:20], 24)[1])


def test_build_streamed_ivf_needs_a_training_sample(data):
    x, ids = data
    with pytest.raises(ValueError, match="training sample"):
        VectorIndex.build_streamed([(x, ids)], train=None, total=len(x), kind="ivf")
    with pytest.raises(ValueError, match="at least 100 training vectors"):
        VectorIndex.build_streamed([(x, ids)], train=x[:50], total=len(x), kind="ivf", nlist=100)
