"""The store's schema: tables, the typed records written to them, and the in-place migrations.

Versions: v1 tables; v2 the import report's columns on ``cohort_slides``; v3 Moran's I in
``slide_summary``; v4 an integer ``run_id`` leading every per-tile table (x/y in ``pred_*``) and
per-tile nucleus counts; v5 the cell tables (``cells``, ``cell_tiles``: :mod:`core.store.cell_tables`);
v6 the tile's embedding in the model's joint image ↔ expression space (``tile_vectors.joint``).
Older stores are upgraded in place by the first writer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from core.errors import OutdatedStoreError, StoreError
from core.store.cell_tables import CELL_SCHEMA
from core.store.domain_tables import DOMAIN_SCHEMA

log = logging.getLogger(__name__)
SCHEMA_VERSION = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS fingerprints (
    path VARCHAR, size BIGINT, mtime_ns BIGINT, fingerprint VARCHAR,
    PRIMARY KEY (path, size, mtime_ns));
CREATE TABLE IF NOT EXISTS models (
    model_key VARCHAR PRIMARY KEY, model_id VARCHAR, version VARCHAR, pred_table VARCHAR,
    genes VARCHAR[], cell_types VARCHAR[], card JSON, registered_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER, run_key VARCHAR PRIMARY KEY, slide_fp VARCHAR, model_key VARCHAR, tiling_key VARCHAR,
    tiling JSON, slide_name VARCHAR, slide_path VARCHAR, n_tiles INTEGER, tile_size INTEGER,
    width INTEGER, height INTEGER, mpp DOUBLE, device VARCHAR, seconds DOUBLE,
    finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS tiles (
    run_id INTEGER, tile_idx INTEGER, x INTEGER, y INTEGER, tissue REAL);
CREATE TABLE IF NOT EXISTS tile_vectors (
    run_id INTEGER, tile_idx INTEGER, embedding FLOAT[], composition FLOAT[]);
CREATE TABLE IF NOT EXISTS slide_summary (
    run_key VARCHAR, gene VARCHAR, mean REAL, median REAL, q90 REAL);
CREATE TABLE IF NOT EXISTS cohorts (
    name VARCHAR PRIMARY KEY, clinical_table VARCHAR, source JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS cohort_slides (
    cohort VARCHAR, slide_name VARCHAR, slide_path VARCHAR, patient VARCHAR,
    sample_type VARCHAR, slide_type VARCHAR, fingerprint VARCHAR, status VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS cohort_issues (
    cohort VARCHAR, severity VARCHAR, kind VARCHAR, subject VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS measured (
    cohort VARCHAR, patient VARCHAR, gene VARCHAR, value DOUBLE);
CREATE TABLE IF NOT EXISTS measured_sources (
    cohort VARCHAR PRIMARY KEY, source JSON, n_genes INTEGER, n_patients INTEGER, imported_at TIMESTAMP);
"""

# v4 (added in place): per-class nucleus counts per tile, when a job counted them (predict --nuclei).
_TILE_VECTORS_V4 = [("nuclei", "SMALLINT[]")]
# v6 (added in place): the tile's joint-space embedding, when the model ships a joint space
# (models.joint; NULL for runs of models without one and for runs written before v6).
_TILE_VECTORS_V6 = [("joint", "FLOAT[]")]
# v3: Moran's I per slide and gene (spatial heterogeneity) in slide_summary.
_SUMMARY_V3 = [("morans_i", "REAL")]
# v2: the import report's columns on cohort_slides (added in place to v1 stores).
_COHORT_SLIDE_V2 = [("link", "VARCHAR"), ("selected", "BOOLEAN"), ("vendor", "VARCHAR"), ("width", "INTEGER"),
                    ("height", "INTEGER"), ("levels", "INTEGER"), ("mpp", "DOUBLE"), ("mpp_source", "VARCHAR"),
                    ("objective", "DOUBLE"), ("tissue_fraction", "DOUBLE"), ("n_tiles", "INTEGER")]
_PRED_KEYS = ("run_id", "tile_idx", "x", "y")
SUMMARY_COLUMNS = ("gene", "mean", "median", "q90", "morans_i")
SLIDE_COLUMNS = ["slide_name", "slide_path", "patient", "sample_type", "slide_type", "fingerprint", "status",
                 "message", *(c for c, _ in _COHORT_SLIDE_V2)]



def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'



@dataclass(frozen=True)
class RunRecord:
    """One completed prediction of one slide by one model with one tiling."""

    run_key: str
    slide_fp: str
    model_key: str
    tiling_key: str
    tiling: dict
    slide_name: str
    slide_path: str
    tile_size: int
    width: int
    height: int
    mpp: float
    device: str
    seconds: float



@dataclass(frozen=True)
class ModelInfo:
    """A model registered in the store: where its predictions live and what they hold."""

    model_key: str
    pred_table: str
    genes: list[str]
    cell_types: list[str]
    card: dict

    @property
    def tiling(self) -> tuple[float, float]:
        """(tile µm, µm/px) the model reads."""
        return float(self.card["tile_um"]), float(self.card["mpp"])


def one(con, sql: str, params: list | None = None):
    """The first row of a query, or None (fetched whole: DuckDB keeps a half-read result open)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def columns(con, table: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table]).fetchall()]


def migrate(con, path: Path) -> None:
    """Create missing tables and bring an older store to ``SCHEMA_VERSION`` in place."""
    con.execute(_SCHEMA)
    con.execute(DOMAIN_SCHEMA)
    con.execute(CELL_SCHEMA)
    for column, kind in _COHORT_SLIDE_V2:
        con.execute(f"ALTER TABLE cohort_slides ADD COLUMN IF NOT EXISTS {column} {kind}")
    for column, kind in _SUMMARY_V3:
        con.execute(f"ALTER TABLE slide_summary ADD COLUMN IF NOT EXISTS {column} {kind}")
    row = one(con, "SELECT value FROM meta WHERE key = 'schema_version'")
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema v{row[0]}, newer than this Tessera (v{SCHEMA_VERSION}).")
    if "run_key" in columns(con, "tiles"):
        _migrate_v4(con, path)
    for column, kind in _TILE_VECTORS_V4 + _TILE_VECTORS_V6:
        con.execute(f"ALTER TABLE tile_vectors ADD COLUMN IF NOT EXISTS {column} {kind}")
    if row is None:
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    else:
        con.execute("UPDATE meta SET value=? WHERE key='schema_version'", [str(SCHEMA_VERSION)])


def check_version(con, path: Path) -> None:
    """A read-only view cannot migrate: say how to upgrade instead of failing in a query."""
    try:
        row = one(con, "SELECT value FROM meta WHERE key = 'schema_version'")
    except duckdb.CatalogException:
        row = None
    version = int(row[0]) if row else None
    if version is None or version < SCHEMA_VERSION:
        raise OutdatedStoreError(
            f"The store {path.name} has schema v{version or '?'}; this Tessera reads v{SCHEMA_VERSION}. "
            "Open it once for writing to upgrade it in place (`python -m core.cli migrate`; the app does it "
            "on its next page load).")
    if version > SCHEMA_VERSION:
        raise StoreError(f"The store {path.name} has schema v{version}, newer than this Tessera "
                         f"(v{SCHEMA_VERSION}).")


def _migrate_v4(con, path: Path) -> None:
    """v3 → v4: number the runs in the order they were written, then rewrite every per-tile
    table keyed by ``run_id`` and sorted by (run_id, tile_idx); rows of runs that never
    completed are dropped. One transaction: an interrupted upgrade leaves the v3 store."""
    t0 = time.perf_counter()
    models = con.execute("SELECT model_key, pred_table, genes FROM models").fetchall()
    tables = [m[1] for m in models]
    for key, _, genes in models:
        clash = sorted({g for g in genes if g.lower() in _PRED_KEYS})
        if clash:
            raise StoreError(f"Cannot upgrade {path.name}: model {key} has genes named {clash}, which v4 "
                             f"uses as columns ({', '.join(_PRED_KEYS)}). Export its predictions, then drop it.")
    con.execute("BEGIN")
    try:
        con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS run_id INTEGER")
        con.execute("""UPDATE runs SET run_id = n.rid FROM (
                           SELECT run_key, row_number() OVER (ORDER BY finished_at, run_key)::INTEGER AS rid
                           FROM runs) n WHERE runs.run_key = n.run_key""")
        rewrites = {"tiles": "SELECT r.run_id, t.tile_idx, t.x, t.y, t.tissue FROM tiles t",
                    "tile_vectors": "SELECT r.run_id, t.tile_idx, t.embedding, t.composition FROM tile_vectors t"}
        for table in tables:
            rewrites[table] = (f"SELECT r.run_id, t.tile_idx, g.x, g.y, t.* EXCLUDE (run_key, tile_idx) "
                               f"FROM {table} t JOIN tiles g USING (run_key, tile_idx)")
        # prediction tables first: they read x/y from the old tiles table
        for table in [*tables, "tiles", "tile_vectors"]:
            con.execute(f"CREATE TABLE {table}__v4 AS {rewrites[table]} JOIN runs r USING (run_key) "
                        "ORDER BY r.run_id, t.tile_idx")
        for table in [*tables, "tiles", "tile_vectors"]:
            con.execute(f"DROP TABLE {table}")
            con.execute(f"ALTER TABLE {table}__v4 RENAME TO {table}")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    con.execute("CHECKPOINT")
    n = one(con, "SELECT count(*) FROM runs")[0]
    log.info("store %s upgraded to schema v4 (%d runs) in %.1f s", path.name, n, time.perf_counter() - t0)


def list_array(matrix: np.ndarray, dtype=np.float32) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel()))


def stack_lists(column) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.combine_chunks()
    width = len(flat[0])
    return np.asarray(flat.flatten(), dtype=np.float32).reshape(-1, width)


