"""The store's read queries for pages and analyses (mixed into :class:`core.store.db.Store`).

Per-tile queries look the run's integer ``run_id`` up first, so DuckDB's zone maps skip the row
groups of every other run (see :mod:`core.store.db`).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa

from core.errors import StoreError
from core.store.schema import ModelInfo, columns, ident, one, stack_lists


class StoreQueries:
    """Read-only queries over ``self.con`` (a DuckDB connection)."""

    con: object

    def _one(self, sql: str, params: list | None = None):
        return one(self.con, sql, params)

    def _columns(self, table: str) -> list[str]:
        return columns(self.con, table)

    def model_info(self, model_key: str) -> ModelInfo:
        row = self._one("SELECT pred_table, genes, cell_types, card FROM models WHERE model_key=?", [model_key])
        if row is None:
            raise StoreError(f"Model {model_key} has no predictions in this store.")
        return ModelInfo(model_key, row[0], list(row[1]), list(row[2]), json.loads(row[3]))

    def run_ids(self, run_keys: list[str]) -> dict[str, int]:
        """``run_key`` → ``run_id`` for the complete runs among ``run_keys``."""
        return dict(self.con.execute("SELECT run_key, run_id FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[]))",
                                     [list(run_keys)]).fetchall())

    def _run_id(self, run_key: str) -> int:
        row = self._one("SELECT run_id FROM runs WHERE run_key=?", [run_key])
        if row is None:
            raise StoreError(f"No complete run {run_key} in this store (it may have been re-predicted).")
        return row[0]

    def heatmap(self, model_key: str, run_key: str, gene: str | list[str] | dict[str, float], *,
                offset: float = 0.0) -> pd.DataFrame:
        """Tile x, y (level-0 px) and predicted value of one gene (or the mean of a signature's
        genes, or ``offset`` + a weighted sum ``{gene: weight}``: see :meth:`_value`) on one slide."""
        table, value = self._value(model_key, gene, offset)
        return self.con.execute(f"SELECT tile_idx, x, y, {value} AS value FROM {table} "
                                "WHERE run_id = ? ORDER BY tile_idx", [self._run_id(run_key)]).df()

    def run_expression(self, model_key: str, run_key: str, genes: list[str] | None = None
                       ) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
        """One slide's whole prediction: tiles (tile_idx, x, y level-0 top-left px, tissue fraction)
        in tile order, the [N, G] float32 matrix of predicted log1p(CP10k) and its genes (the
        panel's order, or ``genes``' order)."""
        info = self.model_info(model_key)
        genes = list(info.genes) if genes is None else list(genes)
        missing = [g for g in genes if g not in info.genes]
        if missing:
            raise StoreError(f"{', '.join(missing)} not in the panel of {model_key}.")
        run_id = self._run_id(run_key)
        cols = ", ".join(f"p.{ident(g)}" for g in genes)
        df = self.con.execute(f"SELECT p.tile_idx, p.x, p.y, t.tissue{', ' + cols if cols else ''} "
                              f"FROM {info.pred_table} p LEFT JOIN tiles t "
                              "ON t.run_id = p.run_id AND t.tile_idx = p.tile_idx "
                              "WHERE p.run_id = ? ORDER BY p.tile_idx", [run_id]).df()
        tiles = df[["tile_idx", "x", "y", "tissue"]].reset_index(drop=True)
        matrix = df[genes].to_numpy(np.float32) if genes else np.zeros((len(df), 0), np.float32)
        return tiles, matrix, genes

    def top_tiles(self, model_key: str, gene: str | list[str] | dict[str, float], run_keys: list[str], k: int = 24,
                  *, offset: float = 0.0, lowest: bool = False) -> pd.DataFrame:
        """The ``k`` tiles with the highest predicted value of ``gene`` (or of the mean of a
        signature's genes, or of a weighted sum: see :meth:`_value`) across the given runs;
        ``lowest``: the ``k`` lowest instead (bottom-k, for contrast)."""
        table, value = self._value(model_key, gene, offset)
        order = "ASC" if lowest else "DESC"
        # top k first (one column scan), then join only those k rows to the runs: joining every
        # tile first costs seconds at 10 M tiles (benchmarks/store_bench.py)
        return self.con.execute(f"""
            WITH sel AS (SELECT run_id, run_key, tile_size, slide_name, slide_path FROM runs
                         WHERE run_key IN (SELECT unnest(?::VARCHAR[]))),
                 top AS (SELECT run_id, tile_idx, x, y, {value} AS value FROM {table}
                         WHERE run_id IN (SELECT run_id FROM sel) ORDER BY value {order} LIMIT ?)
            SELECT sel.run_key, top.tile_idx, top.value, top.x, top.y, sel.tile_size, sel.slide_name, sel.slide_path
            FROM top JOIN sel USING (run_id) ORDER BY top.value {order}""", [list(run_keys), k]).df()

    def tile_profile(self, model_key: str, run_key: str, tile_idx: int) -> pd.Series:
        info = self.model_info(model_key)
        df = self.con.execute(f"SELECT * EXCLUDE (run_id, tile_idx, x, y) FROM {info.pred_table} "
                              "WHERE run_id=? AND tile_idx=?", [self._run_id(run_key), tile_idx]).df()
        if df.empty:
            raise StoreError(f"No tile {tile_idx} in run {run_key}.")
        return df.iloc[0]

    def tile_vectors(self, run_keys: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """(index of run_key/run_id/tile_idx/x/y/slide, embeddings [N,E], compositions [N,T])."""
        tbl = self.con.sql("""
            SELECT r.run_key, v.run_id, v.tile_idx, t.x, t.y, r.tile_size, r.slide_name, r.slide_path,
                   v.embedding, v.composition
            FROM (SELECT * FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[]))) r
            JOIN tile_vectors v USING (run_id) JOIN tiles t USING (run_id, tile_idx)
            ORDER BY v.run_id, v.tile_idx""", params=[list(run_keys)]).to_arrow_table()
        index = tbl.drop_columns(["embedding", "composition"]).to_pandas()
        return index, stack_lists(tbl.column("embedding")), stack_lists(tbl.column("composition"))

    def tile_embedding(self, run_key: str, tile_idx: int) -> np.ndarray:
        """One tile's embedding."""
        row = self._one("SELECT embedding FROM tile_vectors WHERE run_id=? AND tile_idx=?",
                        [self._run_id(run_key), tile_idx])
        if row is None:
            raise StoreError(f"No tile {tile_idx} in run {run_key}.")
        return np.asarray(row[0], dtype=np.float32)

    def embeddings(self, run_ids: list[int], space: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(ids ``run_id << 32 | tile_idx`` [N] int64, embeddings [N, E]) of the given runs, for
        the vector index (:mod:`core.store.tile_index`). ``space``: ``image`` (the model's tile
        embedding) or ``joint`` (the joint image ↔ expression space; only tiles that have one)."""
        column = {"image": "embedding", "joint": "joint"}.get(space)
        if column is None:
            raise ValueError(f"space must be 'image' or 'joint', not {space!r}")
        tbl = self.con.sql(f"""SELECT (run_id::BIGINT << 32) | tile_idx AS id, {column} AS v FROM tile_vectors
                               WHERE run_id IN (SELECT unnest(?::INTEGER[])) AND {column} IS NOT NULL
                               ORDER BY run_id, tile_idx""",
                           params=[[int(r) for r in run_ids]]).to_arrow_table()
        return np.asarray(tbl.column("id").to_numpy(), dtype=np.int64), stack_lists(tbl.column("v"))

    def tile_vector(self, run_key: str, tile_idx: int, space: str = "image") -> np.ndarray | None:
        """One tile's vector in ``space`` (``image``: its embedding; ``joint``: its joint-space
        embedding, None when the run has none)."""
        column = {"image": "embedding", "joint": "joint"}.get(space)
        if column is None:
            raise ValueError(f"space must be 'image' or 'joint', not {space!r}")
        row = self._one(f"SELECT {column} FROM tile_vectors WHERE run_id=? AND tile_idx=?",
                        [self._run_id(run_key), int(tile_idx)])
        if row is None:
            raise StoreError(f"No tile {tile_idx} in run {run_key}.")
        return None if row[0] is None else np.asarray(row[0], dtype=np.float32)

    def has_joint(self, run_keys: list[str]) -> bool:
        """Whether any tile of the runs has a joint-space embedding (one tile per run is checked)."""
        row = self._one("""SELECT count(*) FROM (SELECT run_id FROM runs WHERE run_key IN
                               (SELECT unnest(?::VARCHAR[]))) r
                           WHERE (SELECT joint FROM tile_vectors v WHERE v.run_id = r.run_id AND v.tile_idx = 0)
                                 IS NOT NULL""", [list(run_keys)])
        return bool(row and row[0])

    def compositions_by_id(self, ids: np.ndarray) -> np.ndarray:
        """Predicted compositions [n, T] of tiles addressed by ``run_id << 32 | tile_idx``, in order."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return np.zeros((0, 0), np.float32)
        self.con.register("_want", pa.table({"run_id": (ids >> 32).astype(np.int32),
                                             "tile_idx": (ids & 0xFFFFFFFF).astype(np.int32),
                                             "_order": np.arange(len(ids))}))
        try:
            tbl = self.con.sql("""SELECT v.composition FROM _want w JOIN tile_vectors v USING (run_id, tile_idx)
                                  ORDER BY w._order""").to_arrow_table()
        finally:
            self.con.unregister("_want")
        return stack_lists(tbl.column("composition"))

    def mean_composition(self, run_keys: list[str], n_types: int) -> np.ndarray:
        """The mean predicted composition [T] over the tiles of the runs (each slide weighted by its tiles)."""
        cols = ", ".join(f"avg(composition[{i + 1}])" for i in range(int(n_types)))
        row = self._one(f"""SELECT {cols} FROM tile_vectors WHERE run_id IN
                            (SELECT run_id FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[])))""",
                        [list(run_keys)])
        return np.asarray(row, dtype=np.float64)

    def model_runs(self, model_key: str) -> pd.DataFrame:
        """run_id, run_key, n_tiles of every complete default-grid run of a model (high-resolution
        runs repeat the same tissue in overlapping tiles: they stay out of indexes and references)."""
        return self.con.execute("""SELECT run_id, run_key, n_tiles FROM runs WHERE model_key=?
                                   AND coalesce(TRY_CAST(tiling->>'stride' AS DOUBLE), 1.0) = 1.0 ORDER BY run_id""",
                                [model_key]).df()

    def high_res_runs(self, model_key: str, slide_fp: str, mpp: float) -> pd.DataFrame:
        """A slide's latest high-resolution run per stride: stride, run_key, n_tiles, tile_size."""
        return self.con.execute("""
            SELECT TRY_CAST(tiling->>'stride' AS DOUBLE) AS stride, run_key, n_tiles, tile_size FROM runs
            WHERE model_key = ? AND slide_fp = ? AND abs(mpp - ?) < 1e-9
              AND coalesce(TRY_CAST(tiling->>'stride' AS DOUBLE), 1.0) < 1.0
            QUALIFY row_number() OVER (PARTITION BY stride ORDER BY finished_at DESC) = 1
            ORDER BY stride DESC""", [model_key, slide_fp, float(mpp)]).df()

    def tiles_by_id(self, ids: np.ndarray) -> pd.DataFrame:
        """Tiles addressed by ``run_id << 32 | tile_idx``, in the order given: run_key, run_id,
        tile_idx, x, y, tile_size, slide_name, slide_path (unknown ids are left out)."""
        ids = np.asarray(ids, dtype=np.int64)
        want = pd.DataFrame({"run_id": (ids >> 32).astype(np.int32), "tile_idx": (ids & 0xFFFFFFFF).astype(np.int32),
                             "_order": np.arange(len(ids))})
        self.con.register("_want", want)
        try:
            return self.con.execute("""
                SELECT r.run_key, w.run_id, w.tile_idx, t.x, t.y, r.tile_size, r.slide_name, r.slide_path
                FROM _want w JOIN tiles t USING (run_id, tile_idx) JOIN runs r USING (run_id)
                ORDER BY w._order""").df()
        finally:
            self.con.unregister("_want")

    def has_nuclei(self, run_key: str) -> bool:
        """Whether the job that made this run counted nuclei (cheap: one row)."""
        if "nuclei" not in self._columns("tile_vectors"):
            return False
        return self._one("SELECT 1 FROM tile_vectors WHERE run_id = ? AND nuclei IS NOT NULL LIMIT 1",
                         [self._run_id(run_key)]) is not None

    def tile_nuclei(self, run_key: str) -> pd.DataFrame | None:
        """Per tile of a run: tile_idx, x, y and the nucleus count of each class (columns
        ``n0 … n{C-1}``, in ``core.wsi.nuclei_classes.CLASSES`` order), or None when the job that
        made the run did not count nuclei."""
        if "nuclei" not in self._columns("tile_vectors"):    # opened read-only before the column existed
            return None
        tbl = self.con.sql("""SELECT t.tile_idx, t.x, t.y, v.nuclei FROM tile_vectors v JOIN tiles t USING (run_id, tile_idx)
                              WHERE v.run_id = ? ORDER BY t.tile_idx""", params=[self._run_id(run_key)]).to_arrow_table()
        if tbl.num_rows == 0 or tbl.column("nuclei").null_count == tbl.num_rows:
            return None
        counts = stack_lists(tbl.column("nuclei").cast(pa.list_(pa.float32())))
        df = tbl.drop_columns(["nuclei"]).to_pandas()
        for c in range(counts.shape[1]):
            df[f"n{c}"] = counts[:, c].astype(np.int32)
        return df

    def slide_summary(self, model_key: str, genes: list[str], run_keys: list[str]) -> pd.DataFrame:
        """Per slide and gene: mean, median, q90 and Moran's I of the tile predictions."""
        return self.con.execute("""
            SELECT s.run_key, r.slide_name, r.slide_fp, s.gene, s.mean, s.median, s.q90, s.morans_i
            FROM slide_summary s JOIN runs r USING (run_key)
            WHERE s.run_key IN (SELECT unnest(?::VARCHAR[])) AND s.gene IN (SELECT unnest(?::VARCHAR[]))""",
                                [list(run_keys), genes]).df()

    def fraction_above(self, model_key: str, gene: str, run_keys: list[str], quantile: float = 0.75) -> pd.DataFrame:
        """Per slide, the fraction of its tiles above the *cohort* threshold: the ``quantile`` of
        ``gene`` over all tiles of ``run_keys``. Columns run_key, threshold, fraction."""
        table = self._pred_table(model_key, gene)
        col = ident(gene)
        return self.con.execute(f"""
            WITH r AS (SELECT run_id, run_key FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[]))),
                 sel AS (SELECT run_id, {col} AS v FROM {table} WHERE run_id IN (SELECT run_id FROM r)),
                 thr AS (SELECT quantile_cont(v, ?) AS t FROM sel),
                 per AS (SELECT run_id, any_value(thr.t) AS threshold, avg((v > thr.t)::DOUBLE) AS fraction
                         FROM sel, thr GROUP BY run_id)
            SELECT r.run_key, per.threshold, per.fraction FROM per JOIN r USING (run_id)
            ORDER BY r.run_key""", [list(run_keys), quantile]).df()

    def _value(self, model_key: str, genes: str | list[str] | dict[str, float], offset: float = 0.0
               ) -> tuple[str, str]:
        """(prediction table, SQL for one gene's column, the mean of several, or ``offset`` + a
        weighted sum when ``genes`` maps gene → weight: a signature score that is a fixed linear
        combination of the predictions, :mod:`core.analysis.signature_scores`). Weights go into
        the SQL as 17-digit DOUBLE literals, so they round-trip exactly."""
        weights = {str(g): float(w) for g, w in genes.items()} if isinstance(genes, dict) else None
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise StoreError("No gene given.")
        info = self.model_info(model_key)
        missing = [g for g in genes if g not in info.genes]
        if missing:
            raise StoreError(f"{', '.join(missing)} not in the panel of {model_key}.")
        table = info.pred_table
        if weights is not None:
            bad = [g for g, w in weights.items() if not np.isfinite(w)] + ([] if np.isfinite(offset) else ["offset"])
            if bad:
                raise StoreError(f"Non-finite weight for {', '.join(bad)}.")
            terms = [f"{float(offset):.17e}"] + [f"{w:.17e} * {ident(g)}" for g, w in weights.items()]
            return table, "(" + " + ".join(terms) + ")"
        if offset:
            raise StoreError("An offset needs gene weights ({gene: weight}).")
        if len(genes) == 1:
            return table, ident(genes[0])
        return table, "(" + " + ".join(ident(g) for g in genes) + f") / {len(genes)}"

    def _pred_table(self, model_key: str, gene: str) -> str:
        info = self.model_info(model_key)
        if gene not in info.genes:
            raise StoreError(f"{gene} is not in the panel of {model_key}.")
        return info.pred_table



    # -- measured expression (imported per cohort; see Store.save_measured) ---------------------
    def _has_table(self, table: str) -> bool:
        return self._one("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table])[0] > 0

    def measured(self, cohort: str, genes: list[str] | None = None) -> pd.DataFrame:
        """The cohort's measured expression as patients × genes (empty when none was imported)."""
        if not self._has_table("measured"):  # a read-only store from before measured imports
            return pd.DataFrame()
        sql, params = "SELECT patient, gene, value FROM measured WHERE cohort = ?", [cohort]
        if genes is not None:
            sql += " AND gene IN (SELECT unnest(?::VARCHAR[]))"
            params.append(list(genes))
        long = self.con.execute(sql, params).df()
        if long.empty:
            return pd.DataFrame()
        return long.pivot_table(index="patient", columns="gene", values="value", aggfunc="first").rename_axis(
            index="patient", columns=None)

    def measured_genes(self, cohort: str) -> list[str]:
        if not self._has_table("measured"):
            return []
        return [r[0] for r in self.con.execute("SELECT DISTINCT gene FROM measured WHERE cohort = ? ORDER BY gene",
                                               [cohort]).fetchall()]

    def measured_source(self, cohort: str) -> dict:
        """Where the cohort's measured matrix came from and its size; {} when none."""
        if not self._has_table("measured_sources"):
            return {}
        row = self._one("SELECT source, n_genes, n_patients, imported_at FROM measured_sources WHERE cohort = ?",
                        [cohort])
        return {} if row is None else {**json.loads(row[0]), "n_genes": row[1], "n_patients": row[2],
                                       "imported_at": str(row[3])}
