"""Cells in the store (mixed into :class:`core.store.db.Store`), written with their run.

Layout (chosen by measurement, ``python -m benchmarks.cells_bench``):

- ``cells``: one row per cell, sorted by (run_id, tile_idx): centroid ``x, y`` in level-0 px,
  outline ellipse (``major_um``, ``minor_um``, ``angle`` in radians), morphology, the nucleus
  class, the reference ``cell_type`` (index into the model's cell types) and its ``confidence``.
- ``cell_tiles``: per tile of a cells run, the refinement's mixture weights ``w`` and
  normalisers ``z`` per type (:mod:`core.analysis.cells`).
- ``model_profiles``: the reference profiles (types × genes, log1p CP10k) of each model that made a
  cells run, so readers compute cell values without loading the model.

Profiles are not stored per cell: a cell's value of a gene is computed from its type, its tile's
factors and the tile's stored prediction (:func:`core.analysis.cells.cell_values`), which keeps a
cells run a few percent larger than a plain one instead of cells × genes larger. Cells belong to
their run: written in the run's transaction, replaced with it, never changed otherwise.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

CELL_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    run_id INTEGER, tile_idx INTEGER, x REAL, y REAL, major_um REAL, minor_um REAL, angle REAL,
    area_um2 REAL, eccentricity REAL, solidity REAL, h_mean REAL, h_rel REAL, h_core_ratio REAL,
    e_ring REAL, density REAL, nucleus_class UTINYINT, cell_type UTINYINT, confidence REAL);
CREATE TABLE IF NOT EXISTS cell_tiles (run_id INTEGER, tile_idx INTEGER, w FLOAT[], z FLOAT[]);
CREATE TABLE IF NOT EXISTS model_profiles (
    model_key VARCHAR PRIMARY KEY, cell_types VARCHAR[], genes VARCHAR[], profiles FLOAT[]);
"""
CELL_COLUMNS = ["x", "y", "major_um", "minor_um", "angle", "area_um2", "eccentricity", "solidity", "h_mean",
                "h_rel", "h_core_ratio", "e_ring", "density", "nucleus_class", "cell_type", "confidence"]
_DROP_ORDER = ("cells", "cell_tiles")


def cell_table(run_id: int, xy: np.ndarray, cells: np.ndarray, cell_tile: np.ndarray, fields: list[str]) -> pa.Table:
    """The ``cells`` rows of one run from the spool's flat records (``fields`` name their columns:
    :data:`core.wsi.cells.CELL_FIELDS` then ``cell_type``, ``confidence``)."""
    col = {name: cells[:, i] for i, name in enumerate(fields)}
    probs = np.stack([col[f] for f in fields if f.startswith("p_")], axis=1) if len(cells) else np.zeros((0, 1))
    tile = np.asarray(cell_tile, np.int64)
    out = {"run_id": np.full(len(cells), run_id, np.int32), "tile_idx": tile.astype(np.int32),
           "x": (xy[tile, 0] + col["cx"]).astype(np.float32), "y": (xy[tile, 1] + col["cy"]).astype(np.float32)}
    for name in CELL_COLUMNS[2:13]:
        out[name] = col[name].astype(np.float32)
    out["nucleus_class"] = probs.argmax(axis=1).astype(np.uint8)
    out["cell_type"] = col["cell_type"].astype(np.uint8)
    out["confidence"] = col["confidence"].astype(np.float32)
    return pa.table(out)


class CellTables:
    """Writes (inside :meth:`Store.write_run`'s transaction) and reads of the cell tables."""

    def _write_cells(self, run_id: int, xy: np.ndarray, cells: dict, model_key: str) -> None:
        from core.store.schema import list_array

        con = self.con
        if cells.get("profiles") is not None:
            prof = np.asarray(cells["profiles"], np.float32)
            info = self.model_info(model_key)
            if prof.shape != (len(info.cell_types), len(info.genes)):
                raise ValueError(f"profiles are {prof.shape}, expected {(len(info.cell_types), len(info.genes))}")
            con.execute("INSERT OR REPLACE INTO model_profiles VALUES (?, ?, ?, ?)",
                        [model_key, info.cell_types, info.genes, prof.ravel().tolist()])
        con.register("_cells", cell_table(run_id, xy, cells["cells"], cells["cell_tile"], cells["fields"]))
        n = len(cells["cell_w"])
        con.register("_cell_tiles", pa.table({"run_id": np.full(n, run_id, np.int32),
                                              "tile_idx": np.arange(n, dtype=np.int32),
                                              "w": list_array(cells["cell_w"]), "z": list_array(cells["cell_z"])}))
        try:
            con.execute("INSERT INTO cells SELECT * FROM _cells ORDER BY tile_idx")
            con.execute("INSERT INTO cell_tiles SELECT * FROM _cell_tiles")
        finally:
            con.unregister("_cells")
            con.unregister("_cell_tiles")

    def _drop_cells(self, run_id: int) -> None:
        for table in _DROP_ORDER:
            self.con.execute(f"DELETE FROM {table} WHERE run_id=?", [run_id])

    def has_cells(self, run_key: str) -> bool:
        """Whether the run was made with cells (``predict --cells``)."""
        if not self._has_table("cell_tiles"):
            return False
        return self._one("""SELECT 1 FROM cell_tiles WHERE run_id = (SELECT run_id FROM runs WHERE run_key = ?)
                            LIMIT 1""", [run_key]) is not None

    def run_cells(self, run_key: str, columns: list[str] | None = None, *,
                  bounds: tuple[float, float, float, float] | None = None) -> pd.DataFrame:
        """The run's cells (``tile_idx`` and ``columns``, default all of :data:`CELL_COLUMNS`), in
        stored order; ``bounds`` (x0, y0, x1, y1, level-0 px) keeps the cells whose centre is inside."""
        cols = list(columns or CELL_COLUMNS)
        unknown = sorted(set(cols) - set(CELL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown cell columns {unknown}; known: {CELL_COLUMNS}")
        where, params = "run_id = ?", [self._run_id(run_key)]
        if bounds is not None:
            where += " AND x >= ? AND y >= ? AND x < ? AND y < ?"
            params += [float(b) for b in bounds]
        sql = f"SELECT tile_idx, {', '.join(cols)} FROM cells WHERE {where} ORDER BY tile_idx"
        return self.con.sql(sql, params=params).to_arrow_table().to_pandas() if self._has_table("cells") \
            else pd.DataFrame(columns=["tile_idx", *cols])

    def cell_factors(self, run_key: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-tile ``w`` and ``z`` ``(n_tiles, T)`` of a cells run, in tile order."""
        from core.store.schema import stack_lists

        tbl = self.con.sql("SELECT w, z FROM cell_tiles WHERE run_id = ? ORDER BY tile_idx",
                           params=[self._run_id(run_key)]).to_arrow_table()
        return stack_lists(tbl.column("w")), stack_lists(tbl.column("z"))

    def model_profiles(self, model_key: str) -> pd.DataFrame | None:
        """The model's reference profiles (cell types × genes, log1p CP10k) as stored with its
        cells runs, or None when it has made none."""
        if not self._has_table("model_profiles"):
            return None
        row = self._one("SELECT cell_types, genes, profiles FROM model_profiles WHERE model_key = ?", [model_key])
        if row is None:
            return None
        types, genes, flat = row
        return pd.DataFrame(np.asarray(flat, np.float64).reshape(len(types), len(genes)), index=list(types),
                            columns=list(genes))

    def cell_type_counts(self, run_keys: list[str]) -> pd.DataFrame:
        """Cells per (run_key, cell_type index), for cell-type fractions."""
        if not self._has_table("cells"):
            return pd.DataFrame(columns=["run_key", "cell_type", "n"])
        return self.con.execute("""
            SELECT r.run_key, c.cell_type, count(*)::BIGINT AS n FROM cells c JOIN runs r USING (run_id)
            WHERE r.run_key IN (SELECT unnest(?::VARCHAR[])) GROUP BY ALL ORDER BY ALL""", [list(run_keys)]).df()
