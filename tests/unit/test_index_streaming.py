"""The similar-tiles index built from the store in bounded batches (core.store.tile_index): the
streamed IVF build finds what exact search finds, reads at most one batch of vectors at a time,
trains on a sample spread over the cohort, and the exact kind equals the in-memory build."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from core.analysis.spatial import slide_summary
from core.errors import TesseraError
from core.store import tile_index
from core.store.db import RunRecord, Store
from core.store.tile_index import _batches, _training_sample, load, refresh
from core.store.vector_index import VectorIndex, recall_at_k

GENES = ["ERBB2", "CD8A"]
TYPES = ["tumour", "t_cell"]
DIM = 16
SIZES = [300, 450, 200, 600, 350, 500, 250, 400, 550, 300, 450, 650]   # 5,000 tiles in 12 runs


def _embeddings(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 30 shared tissue-like directions, plus a small per-slide offset."""
    centres = np.random.default_rng(99).normal(size=(30, DIM))
    rng = np.random.default_rng([seed, 1])
    x = centres[rng.integers(30, size=n)] + rng.normal(scale=0.35, size=(n, DIM)) + rng.normal(scale=0.1, size=DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_runs(store: Store, key: str, sizes: list[int], first: int = 0) -> None:
    for i, n in enumerate(sizes, first):
        side = int(np.ceil(np.sqrt(n)))
        xy = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * 100
        rng = np.random.default_rng(i)
        record = RunRecord(run_key=f"run{i:03d}", slide_fp=f"fp{i}", model_key=key, tiling_key="t", tiling={},
                           slide_name=f"s{i}.svs", slide_path=f"/s/s{i}.svs", tile_size=100, width=side * 100,
                           height=side * 100, mpp=0.5, device="cpu", seconds=0.1)
        expr = rng.gamma(2.0, 1.0, (n, len(GENES))).astype(np.float32)
        store.write_run(record, xy, np.ones(n, np.float32), expr, _embeddings(n, i),
                        rng.dirichlet([1, 1], size=n).astype(np.float32),
                        summary=slide_summary(expr, xy, record.tile_size, GENES))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A closed store of 12 runs (5,000 tiles); returns (path, model key)."""
    path = tmp_path_factory.mktemp("stream") / "s.duckdb"
    with Store(path) as store:
        key = store.register_model("sim", "v1", GENES, TYPES, {})
        _write_runs(store, key, SIZES)
    return path, key


@pytest.fixture
def reads(monkeypatch):
    """Every ``Store.embeddings`` call's run ids and number of vectors returned, in order."""
    calls: list[tuple[list[int], int]] = []
    original = Store.embeddings

    def recording(self, run_ids, *args, **kw):
        ids, emb = original(self, run_ids, *args, **kw)
        calls.append((list(run_ids), len(ids)))
        return ids, emb

    monkeypatch.setattr(Store, "embeddings", recording)
    return calls


def _everything(path):
    with Store(path, read_only=True) as store:
        key = store.models()["model_key"].iloc[0]
        return store.embeddings(list(store.model_runs(key)["run_id"])) + (store.model_info(key).pred_table,)


def test_streamed_ivf_finds_the_exact_neighbours_reading_one_batch_at_a_time(cohort, reads):
    path, key = cohort
    done = refresh(path, key, min_vectors=1000, kind="ivf", nlist=24, rebuild_stale=-1, batch_vectors=1000,
                   target_recall=0.97)
    assert done[key].startswith("built 5000 vectors")
    sizes = [n for _, n in reads]
    assert max(sizes) <= 1000 and len(reads) >= 6          # many batches, none over the bound
    ids, emb, table = _everything(path)
    index, runs = load(path, table)
    assert index.kind == "ivf" and len(index) == 5000 and index.recall >= 0.97
    assert runs == set((ids >> 32).tolist())
    rows = np.random.default_rng(5).choice(len(ids), size=200, replace=False)
    _, truth = VectorIndex.build(emb, ids, kind="exact").search(emb[rows], 24)
    _, found = index.search(emb[rows], 24)
    assert recall_at_k(found, truth) >= 0.95


def test_every_run_is_added_once(cohort, reads):
    """The add pass reads each run exactly once, in store order (the sample pass reads some again)."""
    path, key = cohort
    refresh(path, key, min_vectors=1000, kind="ivf", nlist=24, rebuild_stale=-1, batch_vectors=1000)
    with Store(path, read_only=True) as store:
        run_ids = list(store.model_runs(key)["run_id"])
    added = [r for group, _ in reads[-len(_batches_of(path, key, 1000)):] for r in group]
    assert added == run_ids


def _batches_of(path, key, limit):
    with Store(path, read_only=True) as store:
        return _batches(store.model_runs(key), limit)


def test_training_sample_is_spread_over_runs_and_reproducible(cohort, reads):
    path, key = cohort
    with Store(path, read_only=True) as store:
        runs = store.model_runs(key)

        def reading():
            return contextlib.nullcontext(store)

        emb, ids, queries = _training_sample(reading, runs, 400, 1000, seed=0)
        read = sum(n for _, n in reads)
        again, again_ids, _ = _training_sample(reading, runs, 400, 1000, seed=0)
        other = _training_sample(reading, runs, 400, 1000, seed=1)[1]
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(emb, again)
    assert not np.array_equal(ids, other)                   # the seed picks the runs
    assert 300 <= len(ids) <= 500 and emb.shape == (len(ids), DIM)
    sampled = set((ids >> 32).tolist())
    assert read <= tile_index.TRAIN_READ * 400 + max(SIZES)  # only a bounded share of the store is read
    assert len(sampled) >= 4                                # many slides, not one
    first = set(runs["run_id"][:len(sampled)])
    assert sampled != first                                 # drawn over the cohort, not its first runs
    per_run = np.bincount(np.searchsorted(sorted(sampled), ids >> 32))
    assert per_run.max() <= 0.5 * len(ids)                  # no run dominates the k-means
    assert queries.shape == (tile_index.TUNE_QUERIES, DIM)  # tuning queries held out of the k-means
    assert not (queries[:, None, :] == emb[None, :, :]).all(axis=2).any()


def test_exact_kind_is_filled_in_batches_and_equals_the_in_memory_build(cohort, reads):
    path, key = cohort
    assert refresh(path, key, min_vectors=1000, rebuild_stale=-1, batch_vectors=700)[key].startswith("built 5000")
    assert max(n for _, n in reads) <= 700 and len(reads) >= 8
    ids, emb, table = _everything(path)
    index = load(path, table, mmap=False)[0]
    old = VectorIndex.build(emb, ids)                       # what the product built before
    assert index.kind == old.kind == "exact"
    q = emb[::50]
    s_new, i_new = index.search(q, 24)
    s_old, i_old = old.search(q, 24)
    np.testing.assert_array_equal(i_new, i_old)
    np.testing.assert_allclose(s_new, s_old, rtol=1e-6)


def test_new_runs_are_added_in_batches(tmp_path, reads):
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        key = store.register_model("sim", "v1", GENES, TYPES, {})
        _write_runs(store, key, SIZES[:6])
    assert refresh(path, key, min_vectors=1000, kind="ivf", nlist=16, batch_vectors=800)[key].startswith("built")
    with Store(path) as store:
        _write_runs(store, key, [500, 500, 500], first=20)
    reads.clear()
    assert refresh(path, key, min_vectors=1000, batch_vectors=800) == {key: "added 3 runs"}
    assert [n for _, n in reads] == [500, 500, 500]
    with Store(path, read_only=True) as store:
        assert len(load(path, store.model_info(key).pred_table)[0]) == sum(SIZES[:6]) + 1500


def test_batches_hold_at_most_the_limit_and_keep_store_order():
    import pandas as pd

    runs = pd.DataFrame({"run_id": [1, 2, 3, 4, 5, 6], "n_tiles": [400, 500, 1500, 100, 100, 900]})
    assert _batches(runs, 1000) == [[1, 2], [3], [4, 5], [6]]     # the 1,500-tile run alone
    assert _batches(runs, 10_000) == [[1, 2, 3, 4, 5, 6]]
    assert _batches(runs.iloc[:0], 1000) == []


def test_too_small_a_cohort_for_the_cells_and_a_bad_batch_size_are_clear(cohort):
    path, key = cohort
    with pytest.raises(TesseraError, match="batch_vectors"):
        refresh(path, key, min_vectors=1000, batch_vectors=0)
    with pytest.raises(TesseraError, match="needs at least 8000 embeddings"):
        refresh(path, key, min_vectors=1000, kind="ivf", nlist=8000, rebuild_stale=-1)
