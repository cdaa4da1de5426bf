"""Store schema v4 (integer run ids leading every per-tile table), the v3 → v4 upgrade, and the
similar-tiles index kept beside the store (core.store.tile_index), on real DuckDB files."""
import duckdb
import numpy as np
import pytest

from core.analysis.spatial import slide_summary
from core.errors import StoreError
from core.store.db import RunRecord, Store
from core.store import tile_index
from core.store.tile_index import index_root, refresh, similar_tiles

GENES = ["ERBB2", "CD8A", "MKI67"]
TYPES = ["tumour", "t_cell"]


def _run(i: int, n: int, seed: int = 0):
    rng = np.random.default_rng([seed, i])
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * 100
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    comp = rng.dirichlet([1, 1], size=n).astype(np.float32)
    expr = rng.gamma(2.0, 1.0, size=(n, len(GENES))).astype(np.float32)
    record = RunRecord(run_key=f"run{i:03d}-{seed}", slide_fp=f"fp{i}", model_key="", tiling_key="t", tiling={},
                       slide_name=f"slide{i}.svs", slide_path=f"/slides/slide{i}.svs", tile_size=100,
                       width=side * 100, height=side * 100, mpp=0.5, device="cpu", seconds=0.1)
    return record, xy, rng.uniform(0.3, 1, n).astype(np.float32), expr, emb, comp


def _write(store, record, xy, tissue, expr, emb, comp):
    """``write_run`` with the slide summary the engine's ingest computes."""
    return store.write_run(record, xy, tissue, expr, emb, comp,
                           summary=slide_summary(expr, xy, record.tile_size, GENES))


def _fill(store, runs, seed=0, n=60):
    key = store.register_model("sim", "v1", GENES, TYPES, {})
    out = {}
    for i in runs:
        record, *arrays = _run(i, n, seed)
        record = RunRecord(**{**record.__dict__, "model_key": key})
        _write(store, record, *arrays)
        out[record.run_key] = arrays
    return key, out


def test_run_ids_in_write_order_and_rewrite_gets_a_new_id(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        key, runs = _fill(store, range(3))
        ids = store.run_ids(list(runs))
        assert sorted(ids.values()) == [1, 2, 3]
        record, *arrays = _run(0, 60, seed=0)
        new_id = _write(store, RunRecord(**{**record.__dict__, "model_key": key}), *arrays)
        assert new_id == 4 and store.run_ids([record.run_key]) == {record.run_key: 4}
        # the rewritten run's rows exist once, under its new id; per-tile tables stay sorted by run id
        for table in ("tiles", "tile_vectors", store.model_info(key).pred_table):
            rows = store.con.execute(f"SELECT run_id, count(*) FROM {table} GROUP BY run_id ORDER BY run_id").fetchall()
            assert rows == [(2, 60), (3, 60), (4, 60)]
            order = [r[0] for r in store.con.execute(f"SELECT run_id FROM {table}").fetchall()]
            assert order == sorted(order)
        heat = store.heatmap(key, record.run_key, "CD8A")
        np.testing.assert_allclose(heat["value"], arrays[2][:, 1], rtol=1e-6)
        assert (heat[["x", "y"]].to_numpy() == arrays[0]).all()


def test_gene_named_like_a_key_column_is_refused(tmp_path):
    with Store(tmp_path / "s.duckdb") as store, pytest.raises(StoreError, match="collide"):
        store.register_model("odd", "v1", ["X", "CD8A"], TYPES, {})


V3_DDL = """
        CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
        INSERT INTO meta VALUES ('schema_version', '3');
        CREATE TABLE models (model_key VARCHAR PRIMARY KEY, model_id VARCHAR, version VARCHAR, pred_table VARCHAR,
            genes VARCHAR[], cell_types VARCHAR[], card JSON, registered_at TIMESTAMP);
        CREATE TABLE runs (run_key VARCHAR PRIMARY KEY, slide_fp VARCHAR, model_key VARCHAR, tiling_key VARCHAR,
            tiling JSON, slide_name VARCHAR, slide_path VARCHAR, n_tiles INTEGER, tile_size INTEGER,
            width INTEGER, height INTEGER, mpp DOUBLE, device VARCHAR, seconds DOUBLE, finished_at TIMESTAMP);
        CREATE TABLE tiles (run_key VARCHAR, tile_idx INTEGER, x INTEGER, y INTEGER, tissue REAL);
        CREATE TABLE tile_vectors (run_key VARCHAR, tile_idx INTEGER, embedding FLOAT[], composition FLOAT[]);
        CREATE TABLE slide_summary (run_key VARCHAR, gene VARCHAR, mean REAL, median REAL, q90 REAL, morans_i REAL);
        CREATE TABLE pred_old (run_key VARCHAR, tile_idx INTEGER, "ERBB2" REAL, "CD8A" REAL, "MKI67" REAL);
        INSERT INTO models VALUES ('sim@v1', 'sim', 'v1', 'pred_old', ['ERBB2','CD8A','MKI67'], ['tumour','t_cell'],
                                   '{}', now());
    """


def _make_v3(path, n_runs=3, n=20):
    """A store as Tessera v3 wrote it (random-hash run keys, no run ids), plus an orphan tile row."""
    con = duckdb.connect(str(path))
    con.execute(V3_DDL)
    expected = {}
    keys = ["f3a1", "0b7c", "9e22"][:n_runs]            # insertion order is not key order
    for i, key in enumerate(keys):
        rng = np.random.default_rng(i)
        expr = rng.random((n, 3)).astype(np.float32)
        for t in range(n):
            con.execute("INSERT INTO tiles VALUES (?, ?, ?, ?, 1.0)", [key, t, t * 10, i])
            con.execute("INSERT INTO tile_vectors VALUES (?, ?, ?, ?)", [key, t, [1.0, float(t)], [0.5, 0.5]])
            con.execute("INSERT INTO pred_old VALUES (?, ?, ?, ?, ?)", [key, t, *map(float, expr[t])])
        con.execute(f"INSERT INTO runs VALUES (?, 'fp{i}', 'sim@v1', 't', '{{}}', 's{i}', '/s{i}', ?, 10, 1, 1, 0.5,"
                    f" 'cpu', 1.0, TIMESTAMP '2026-01-0{i + 1}')", [key, n])
        expected[key] = expr
    con.execute("INSERT INTO tiles VALUES ('partial', 0, 0, 0, 1.0)")      # a run that never completed
    con.execute("INSERT INTO pred_old VALUES ('partial', 0, 1, 1, 1)")
    con.close()
    return expected


def test_v3_store_upgrades_in_place(tmp_path):
    path = tmp_path / "old.duckdb"
    expected = _make_v3(path)
    with pytest.raises(StoreError, match="migrate"):      # a reader cannot upgrade: it says how
        Store(path, read_only=True)
    with Store(path) as store:                              # any writer upgrades
        assert store.run_ids(list(expected)) == {"f3a1": 1, "0b7c": 2, "9e22": 3}   # in write order
        for key, expr in expected.items():
            heat = store.heatmap("sim@v1", key, "MKI67")
            np.testing.assert_allclose(heat["value"], expr[:, 2])
            assert list(heat["x"]) == [t * 10 for t in range(len(expr))]
        assert store.con.execute("SELECT count(*) FROM tiles").fetchone()[0] == 60        # orphan dropped
        assert "run_key" not in store._columns("pred_old")
        top = store.top_tiles("sim@v1", "ERBB2", list(expected), k=3)
        best = max((expr[:, 0].max(), key) for key, expr in expected.items())
        assert top.iloc[0]["run_key"] == best[1] and top.iloc[0]["value"] == pytest.approx(best[0])
    with Store(path, read_only=True) as store:
        assert store.tile_embedding("0b7c", 5).tolist() == [1.0, 5.0]


def _exact(store, run_keys, run_key, tile_idx, k):
    index, emb, _ = store.tile_vectors(run_keys)
    q = store.tile_embedding(run_key, tile_idx)
    sims = emb @ q
    self_row = np.flatnonzero((index["run_key"] == run_key).to_numpy() & (index["tile_idx"] == tile_idx).to_numpy())
    sims[self_row] = -np.inf
    order = np.argsort(-sims)[:k]
    return set(zip(index["run_key"].iloc[order], index["tile_idx"].iloc[order]))


def test_rewriting_the_latest_run_still_gets_a_new_id(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        key, runs = _fill(store, range(3))
        record, *arrays = _run(2, 60)
        assert _write(store, RunRecord(**{**record.__dict__, "model_key": key}), *arrays) == 4
        assert _write(store, RunRecord(**{**record.__dict__, "model_key": key}), *arrays) == 5


def test_similar_tiles_index_lifecycle(tmp_path, monkeypatch):
    monkeypatch.setattr(tile_index, "INDEX_MIN", 1000)      # tiny world: index from 1,000 tiles on
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        key, runs = _fill(store, range(8), n=400)             # 3,200 tiles
        keys = list(runs)
        # small: no index file, exact search
        assert refresh(store, key) == {key: "none"}
        small = similar_tiles(store, key, keys, keys[2], 7, k=10)
        assert small.attrs["method"] == "exact"
        assert set(zip(small["run_key"], small["tile_idx"])) == _exact(store, keys, keys[2], 7, 10)
        assert (keys[2], 7) not in set(zip(small["run_key"], small["tile_idx"]))
        assert small["similarity"].is_monotonic_decreasing

        # an IVF index (tiny thresholds so that 3,200 vectors get one): near-exact results
        assert refresh(store, key, min_vectors=1000, kind="ivf", nlist=16).get(key).startswith("built 3200")
        assert (index_root(path) / store.model_info(key).pred_table / "current").exists()
        hits = []
        for run_key, tile in [(keys[0], 0), (keys[3], 99), (keys[7], 250)]:
            got = similar_tiles(store, key, keys, run_key, tile, k=10)
            assert got.attrs["method"] == "index" and len(got) == 10
            hits.append(len(set(zip(got["run_key"], got["tile_idx"])) & _exact(store, keys, run_key, tile, 10)))
        assert sum(hits) / 30 >= 0.9
        # a cohort that is a subset of the indexed runs only gets its own tiles
        sub = similar_tiles(store, key, keys[:2], keys[0], 0, k=10)
        assert set(sub["run_key"]) <= set(keys[:2]) and len(sub) == 10

        # a new run not yet in the index is searched exactly and merged
        new_key, new_runs = _fill(store, [8], n=400)
        keys9 = keys + list(new_runs)
        mixed = similar_tiles(store, key, keys9, keys9[8], 3, k=10)
        assert mixed.attrs["method"] == "index+exact"
        truth = _exact(store, keys9, keys9[8], 3, 10)
        got = set(zip(mixed["run_key"], mixed["tile_idx"]))
        assert {t for t in truth if t[0] == keys9[8]} <= got          # the unindexed run is searched exactly
        assert len(got & truth) >= 8
        assert refresh(store, key, min_vectors=1000) == {key: "added 1 runs"}
        assert similar_tiles(store, key, keys9, keys9[8], 3, k=10).attrs["method"] == "index"
        assert refresh(store, key, min_vectors=1000) == {key: "current"}

        # the latest run re-predicted with other embeddings: new id, its old vectors never come back
        record, *arrays = _run(8, 400, seed=0)
        arrays[3] = np.roll(arrays[3], 1, axis=1)                  # different embeddings, same key
        new_id = _write(store, RunRecord(**{**record.__dict__, "model_key": key}), *arrays)
        ids = store.run_ids(keys9)
        assert ids[keys9[8]] == new_id and new_id not in tile_index.load(path, store.model_info(key).pred_table)[1]
        after = similar_tiles(store, key, keys9, keys9[8], 5, k=10)
        assert set(after["run_id"]) <= set(ids.values())
        assert after.attrs["method"] == "index+exact"
        truth = _exact(store, keys9, keys9[8], 5, 10)
        assert len(set(zip(after["run_key"], after["tile_idx"])) & truth) >= 8
        np.testing.assert_allclose(after["similarity"].iloc[0],
                                   float(store.tile_embedding(after["run_key"].iloc[0], int(after["tile_idx"].iloc[0]))
                                         @ store.tile_embedding(keys9[8], 5)), rtol=1e-5)
        assert refresh(store, key, min_vectors=1000) == {key: "added 1 runs"}   # 1 stale of 9: no rebuild
        # a small selection is searched exactly even though an index exists
        monkeypatch.setattr(tile_index, "INDEX_MIN", 10_000)
        assert similar_tiles(store, key, keys9, keys9[0], 0, k=10).attrs["method"] == "exact"


def test_signature_is_the_mean_of_its_genes(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        key, runs = _fill(store, range(3))
        run_key, arrays = next(iter(runs.items()))
        expr = arrays[2]
        sig = store.heatmap(key, run_key, ["ERBB2", "MKI67"])
        np.testing.assert_allclose(sig["value"], (expr[:, 0] + expr[:, 2]) / 2, rtol=1e-5)
        top = store.top_tiles(key, ["ERBB2", "MKI67"], list(runs), k=5)
        every = np.concatenate([(a[2][:, 0] + a[2][:, 2]) / 2 for a in runs.values()])
        np.testing.assert_allclose(top["value"], np.sort(every)[::-1][:5], rtol=1e-5)
        with pytest.raises(StoreError, match="not in the panel"):
            store.heatmap(key, run_key, ["ERBB2", "NOPE"])
