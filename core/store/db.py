"""The DuckDB store: the only module that imports duckdb. Schema, migrations, every query.

Layout, chosen for the dashboard's queries (measured in ``benchmarks/store_bench.py``):
- ``runs``: one row per (slide content, model, tiling) = ``run_key`` (a content hash, the cache
  key) with a small integer ``run_id`` given in write order; the row is written in the same
  transaction as its tiles, so a partial slide is never visible as complete.
- ``tiles``: tile geometry (level-0 px) and tissue fraction per run.
- ``pred_<model>``: one table per model with **one REAL column per gene** (a heatmap or a cohort
  top-k reads a single column instead of scanning a long gene × tile table) plus the tile's x/y, so
  a heatmap touches this table only.
- ``tile_vectors``: embedding and composition per tile (fixed-size FLOAT arrays).
- ``slide_summary``: per run and gene, slide-level statistics for cohort analyses.
- ``cohorts``, ``cohort_slides``, ``clinical_<cohort>``: what was imported and linked.

Every per-tile table leads with ``run_id`` and is only ever appended to in increasing ``run_id``
order (a rewritten run gets a new id), so each DuckDB row group covers a narrow range of run
ids and its min/max zone map lets a one-slide query skip all the others: at 10 M tiles a heatmap
reads one or two row groups instead of all ~80 (a random-hash key in that position defeats the
zone maps: 23 ms vs 6 ms per heatmap). Queries take ``run_key`` and look the id up first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from core.errors import OutdatedStoreError, StoreError

log = logging.getLogger(__name__)
SCHEMA_VERSION = 4

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
"""

# v4 (added in place): per-class nucleus counts per tile, when a job counted them (predict --nuclei).
_TILE_VECTORS_V4 = [("nuclei", "SMALLINT[]")]
# v3: Moran's I per slide and gene (spatial heterogeneity) in slide_summary.
_SUMMARY_V3 = [("morans_i", "REAL")]
# v2: the import report's columns on cohort_slides (added in place to v1 stores).
_COHORT_SLIDE_V2 = [("link", "VARCHAR"), ("selected", "BOOLEAN"), ("vendor", "VARCHAR"), ("width", "INTEGER"),
                    ("height", "INTEGER"), ("levels", "INTEGER"), ("mpp", "DOUBLE"), ("mpp_source", "VARCHAR"),
                    ("objective", "DOUBLE"), ("tissue_fraction", "DOUBLE"), ("n_tiles", "INTEGER")]
_PRED_KEYS = ("run_id", "tile_idx", "x", "y")
SLIDE_COLUMNS = ["slide_name", "slide_path", "patient", "sample_type", "slide_type", "fingerprint", "status",
                 "message", *(c for c, _ in _COHORT_SLIDE_V2)]


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


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


class Store:
    """A DuckDB file holding cohorts, predictions and summaries; use as a context manager."""

    def __init__(self, path: str | Path, *, read_only: bool = False, wait_s: float = 2.0,
                 memory_limit: str | None = None):
        """Open the store; while another process holds the lock (e.g. a job ingesting a slide for
        a moment), retry for up to ``wait_s`` seconds before giving up with a clear message.

        ``memory_limit`` caps DuckDB's buffer pool (bigger work spills to disk): default
        ``$TESSERA_DB_MEMORY`` or 40 % of RAM, instead of DuckDB's 80 %, so the app, a prediction
        job and the model fit side by side.
        """
        import os
        import time

        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise StoreError(f"No store at {self.path}. Build the demo with `make demo` or import a cohort.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.con = duckdb.connect(str(self.path), read_only=read_only, config={
                    "memory_limit": memory_limit or os.environ.get("TESSERA_DB_MEMORY", "40%")})
                break
            except duckdb.IOException as exc:
                busy = "lock" in str(exc).lower()
                if busy and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise StoreError(
                    f"The store {self.path.name} is busy: another process holds its lock "
                    "(a prediction job ingesting results, or another writer). Try again in a moment."
                    if busy else f"Cannot open the store {self.path}: {exc}") from exc
        try:
            self._migrate() if not read_only else self._check_version()
        except Exception:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _migrate(self) -> None:
        self.con.execute(_SCHEMA)
        for column, kind in _COHORT_SLIDE_V2:
            self.con.execute(f"ALTER TABLE cohort_slides ADD COLUMN IF NOT EXISTS {column} {kind}")
        for column, kind in _SUMMARY_V3:
            self.con.execute(f"ALTER TABLE slide_summary ADD COLUMN IF NOT EXISTS {column} {kind}")
        row = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema v{row[0]}, newer than this Tessera (v{SCHEMA_VERSION}).")
        if "run_key" in self._columns("tiles"):
            self._migrate_v4()
        for column, kind in _TILE_VECTORS_V4:
            self.con.execute(f"ALTER TABLE tile_vectors ADD COLUMN IF NOT EXISTS {column} {kind}")
        if row is None:
            self.con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        else:
            self.con.execute("UPDATE meta SET value=? WHERE key='schema_version'", [str(SCHEMA_VERSION)])

    def _one(self, sql: str, params: list | None = None):
        """The first row of a query, or None (fetched whole: DuckDB keeps a half-read result open)."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def _check_version(self) -> None:
        """A read-only view cannot migrate: say how to upgrade instead of failing in a query."""
        try:
            row = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            row = None
        version = int(row[0]) if row else None
        if version is None or version < SCHEMA_VERSION:
            raise OutdatedStoreError(
                f"The store {self.path.name} has schema v{version or '?'}; this Tessera reads v{SCHEMA_VERSION}. "
                "Open it once for writing to upgrade it in place (`python -m core.cli migrate`; the app does it "
                "on its next page load).")
        if version > SCHEMA_VERSION:
            raise StoreError(f"The store {self.path.name} has schema v{version}, newer than this Tessera "
                             f"(v{SCHEMA_VERSION}).")

    def _columns(self, table: str) -> list[str]:
        return [r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table]).fetchall()]

    def _migrate_v4(self) -> None:
        """v3 → v4: number the runs in the order they were written, then rewrite every per-tile
        table keyed by ``run_id`` and sorted by (run_id, tile_idx); rows of runs that never
        completed are dropped. One transaction: an interrupted upgrade leaves the v3 store."""
        import time

        t0 = time.perf_counter()
        con = self.con
        models = con.execute("SELECT model_key, pred_table, genes FROM models").fetchall()
        tables = [m[1] for m in models]
        for key, _, genes in models:
            clash = sorted({g for g in genes if g.lower() in _PRED_KEYS})
            if clash:
                raise StoreError(f"Cannot upgrade {self.path.name}: model {key} has genes named {clash}, which v4 "
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
        n = self._one("SELECT count(*) FROM runs")[0]
        log.info("store %s upgraded to schema v4 (%d runs) in %.1f s", self.path.name, n, time.perf_counter() - t0)

    # -- fingerprints -------------------------------------------------------------------------
    def cached_fingerprint(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self._one(
            "SELECT fingerprint FROM fingerprints WHERE path=? AND size=? AND mtime_ns=?",
            [path, size, mtime_ns])
        return row[0] if row else None

    def remember_fingerprint(self, path: str, size: int, mtime_ns: int, fingerprint: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?)", [path, size, mtime_ns, fingerprint])

    # -- models -------------------------------------------------------------------------------
    def register_model(self, model_id: str, version: str, genes: list[str], cell_types: list[str], card: dict) -> str:
        """Make sure the model's prediction table exists; returns its ``model_key``."""
        model_key = f"{model_id}@{version}"
        table = "pred_" + hashlib.blake2b(model_key.encode(), digest_size=6).hexdigest()
        if self._one("SELECT 1 FROM models WHERE model_key=?", [model_key]):
            return model_key
        clash = sorted({g for g in genes if g.lower() in _PRED_KEYS})
        if clash:
            raise StoreError(f"Gene names {clash} collide with the prediction table's own columns {_PRED_KEYS}.")
        cols = ", ".join(f"{_ident(g)} REAL" for g in genes)
        self.con.execute("BEGIN")
        self.con.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                         f"(run_id INTEGER, tile_idx INTEGER, x INTEGER, y INTEGER, {cols})")
        self.con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, now())",
                         [model_key, model_id, version, table, genes, cell_types, json.dumps(card)])
        self.con.execute("COMMIT")
        return model_key

    def models(self) -> pd.DataFrame:
        return self.con.execute(
            "SELECT model_key, model_id, version, genes, cell_types, card FROM models ORDER BY registered_at").df()

    def model_info(self, model_key: str) -> dict:
        row = self._one("SELECT pred_table, genes, cell_types, card FROM models WHERE model_key=?",
                               [model_key])
        if row is None:
            raise StoreError(f"Model {model_key} has no predictions in this store.")
        return {"pred_table": row[0], "genes": list(row[1]), "cell_types": list(row[2]), "card": json.loads(row[3])}

    # -- runs ---------------------------------------------------------------------------------
    def find_run(self, run_key: str) -> dict | None:
        df = self.con.execute("SELECT * FROM runs WHERE run_key=?", [run_key]).df()
        return None if df.empty else df.iloc[0].to_dict()

    def write_run(self, run: RunRecord, xy: np.ndarray, tissue: np.ndarray, expression: np.ndarray,
                  embedding: np.ndarray, composition: np.ndarray, nuclei: np.ndarray | None = None) -> int:
        """Write a whole slide's results atomically; the ``runs`` row is the completion marker.
        A run written again replaces the old one under a new ``run_id``. Returns the run id.
        ``nuclei``: optional per-tile nucleus counts per class [n, C]."""
        info = self.model_info(run.model_key)
        genes = info["genes"]
        n = len(xy)
        if expression.shape != (n, len(genes)):
            raise StoreError(f"expression is {expression.shape}, expected {(n, len(genes))}")
        idx = np.arange(n, dtype=np.int32)
        x, y = xy[:, 0].astype(np.int32), xy[:, 1].astype(np.int32)
        from core.analysis.spatial import grid_neighbours, morans_i

        q = np.quantile(expression, [0.5, 0.9], axis=0)
        moran = morans_i(expression, grid_neighbours(xy, run.tile_size))
        summary = pd.DataFrame({"run_key": run.run_key, "gene": genes, "mean": expression.mean(axis=0),
                                "median": q[0], "q90": q[1], "morans_i": moran.astype(np.float32)})
        con = self.con
        con.execute("BEGIN")
        try:
            # ids only ever grow (a counter in meta), so a rewritten run never gets an id back
            last = self._one("""SELECT greatest(coalesce((SELECT max(run_id) FROM runs), 0),
                                    coalesce((SELECT value::INTEGER FROM meta WHERE key = 'last_run_id'), 0))""")[0]
            run_id = int(last) + 1
            con.execute("INSERT OR REPLACE INTO meta VALUES ('last_run_id', ?)", [str(run_id)])
            old = self._one("SELECT run_id FROM runs WHERE run_key=?", [run.run_key])
            if old is not None:
                for table in ("tiles", "tile_vectors", info["pred_table"]):
                    con.execute(f"DELETE FROM {table} WHERE run_id=?", [old[0]])
                con.execute("DELETE FROM runs WHERE run_key=?", [run.run_key])
            con.execute("DELETE FROM slide_summary WHERE run_key=?", [run.run_key])
            ids = np.full(n, run_id, dtype=np.int32)
            con.register("_tiles", pa.table({"run_id": ids, "tile_idx": idx, "x": x, "y": y,
                                             "tissue": tissue.astype(np.float32)}))
            con.execute("INSERT INTO tiles SELECT * FROM _tiles")
            con.register("_pred", pa.table({"run_id": ids, "tile_idx": idx, "x": x, "y": y,
                                            **{g: expression[:, i].astype(np.float32) for i, g in enumerate(genes)}}))
            con.execute(f"INSERT INTO {info['pred_table']} SELECT * FROM _pred")
            vec = {"run_id": ids, "tile_idx": idx, "embedding": _list_array(embedding),
                   "composition": _list_array(composition)}
            if nuclei is not None:
                vec["nuclei"] = _list_array(nuclei, np.int16)
            con.register("_vec", pa.table(vec))
            con.execute("INSERT INTO tile_vectors BY NAME SELECT * FROM _vec")
            con.register("_summary", summary)
            con.execute("INSERT INTO slide_summary BY NAME SELECT * FROM _summary")
            con.execute("""INSERT INTO runs (run_id, run_key, slide_fp, model_key, tiling_key, tiling, slide_name,
                               slide_path, n_tiles, tile_size, width, height, mpp, device, seconds, finished_at)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())""",
                        [run_id, run.run_key, run.slide_fp, run.model_key, run.tiling_key, json.dumps(run.tiling),
                         run.slide_name, run.slide_path, n, run.tile_size, run.width, run.height, run.mpp,
                         run.device, run.seconds])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            for name in ("_tiles", "_pred", "_vec", "_summary"):
                con.unregister(name)
        return int(run_id)

    def ingest(self, spool) -> list[str]:
        """Move every complete run of a :class:`core.engine.spool.Spool` into the store, one transaction
        each, then delete it from the spool. Idempotent: a crash between the commit and the
        deletion re-ingests the same rows (``write_run`` replaces a run), never duplicates them."""
        done = []
        for run_key in spool.complete_runs():
            record, arrays = spool.read_run(run_key)
            model = record.pop("model")
            self.register_model(model["model_id"], model["version"], model["genes"], model["cell_types"],
                                model["card"])
            xy = np.stack([arrays["x"], arrays["y"]], axis=1)
            self.write_run(RunRecord(**record), xy, arrays["tissue"], arrays["expression"], arrays["embedding"],
                           arrays["composition"], arrays.get("nuclei"))
            spool.remove(run_key)
            done.append(run_key)
        if done:
            log.info("ingested %d run(s) from %s", len(done), spool.root)
        return done

    # -- cohorts ------------------------------------------------------------------------------
    def save_cohort(self, name: str, slides: pd.DataFrame, clinical: pd.DataFrame, source: dict,
                    issues: list[dict] | None = None) -> None:
        """Replace cohort ``name``: its slides (``SLIDE_COLUMNS``), clinical table and import issues."""
        table = "clinical_" + _slug(name)
        slides = slides.reindex(columns=SLIDE_COLUMNS).assign(cohort=name)[["cohort", *SLIDE_COLUMNS]]
        issues_df = pd.DataFrame(issues or [], columns=["severity", "kind", "subject", "message"]).assign(cohort=name)
        con = self.con
        con.execute("BEGIN")
        try:
            con.execute("DELETE FROM cohort_slides WHERE cohort=?", [name])
            con.execute("DELETE FROM cohort_issues WHERE cohort=?", [name])
            con.register("_slides", slides)
            con.execute(f"INSERT INTO cohort_slides (cohort, {', '.join(SLIDE_COLUMNS)}) SELECT * FROM _slides")
            con.register("_issues", issues_df[["cohort", "severity", "kind", "subject", "message"]])
            con.execute("INSERT INTO cohort_issues SELECT * FROM _issues")
            con.register("_clin", clinical)
            con.execute(f"CREATE OR REPLACE TABLE {_ident(table)} AS SELECT * FROM _clin")
            con.execute("INSERT OR REPLACE INTO cohorts VALUES (?, ?, ?, now())", [name, table, json.dumps(source)])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            for view in ("_slides", "_issues", "_clin"):
                con.unregister(view)

    def update_slide(self, cohort: str, slide_path: str, values: dict) -> None:
        """Update import-report columns of one slide (e.g. after a µm/px fix)."""
        bad = set(values) - set(SLIDE_COLUMNS)
        if bad:
            raise StoreError(f"unknown slide columns {sorted(bad)}")
        sets = ", ".join(f"{_ident(k)} = ?" for k in values)
        self.con.execute(f"UPDATE cohort_slides SET {sets} WHERE cohort=? AND slide_path=?",
                         [*values.values(), cohort, slide_path])

    def select_slide(self, cohort: str, patient: str, slide_path: str) -> None:
        """Make ``slide_path`` the patient's slide for patient-level analyses (one per patient)."""
        self.con.execute("BEGIN")
        self.con.execute("UPDATE cohort_slides SET selected = (slide_path = ?) WHERE cohort=? AND patient=?",
                         [slide_path, cohort, patient])
        self.con.execute("COMMIT")

    def cohort_issues(self, cohort: str) -> pd.DataFrame:
        return self.con.execute("SELECT severity, kind, subject, message FROM cohort_issues WHERE cohort=?",
                                [cohort]).df()

    def cohort_source(self, cohort: str) -> dict:
        row = self._one("SELECT source FROM cohorts WHERE name=?", [cohort])
        return json.loads(row[0]) if row else {}

    def cohorts(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM cohorts ORDER BY created_at").fetchall()]

    def cohort_slides(self, cohort: str) -> pd.DataFrame:
        return self.con.execute("SELECT * EXCLUDE (cohort) FROM cohort_slides WHERE cohort=? ORDER BY patient, slide_name",
                                [cohort]).df()

    def clinical(self, cohort: str) -> pd.DataFrame:
        row = self._one("SELECT clinical_table FROM cohorts WHERE name=?", [cohort])
        if row is None:
            raise StoreError(f"No cohort named {cohort!r} in {self.path}.")
        return self.con.execute(f"SELECT * FROM {_ident(row[0])}").df()

    def cohort_runs(self, cohort: str, model_key: str) -> pd.DataFrame:
        """Every slide of the cohort with its latest complete run for the model (or NULL)."""
        return self.con.execute("""
            SELECT s.* EXCLUDE (n_tiles, width, height), r.run_key, r.n_tiles, r.tile_size,
                   coalesce(r.width, s.width) AS width, coalesce(r.height, s.height) AS height, r.finished_at
            FROM cohort_slides s
            LEFT JOIN (SELECT * FROM runs WHERE model_key = ?
                       QUALIFY row_number() OVER (PARTITION BY slide_fp, mpp ORDER BY finished_at DESC) = 1) r
              ON r.slide_fp = s.fingerprint AND abs(r.mpp - s.mpp) < 1e-9
            WHERE s.cohort = ? ORDER BY s.patient, s.slide_name""", [model_key, cohort]).df()

    # -- queries for pages --------------------------------------------------------------------
    def run_ids(self, run_keys: list[str]) -> dict[str, int]:
        """``run_key`` → ``run_id`` for the complete runs among ``run_keys``."""
        return dict(self.con.execute("SELECT run_key, run_id FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[]))",
                                     [list(run_keys)]).fetchall())

    def _run_id(self, run_key: str) -> int:
        row = self._one("SELECT run_id FROM runs WHERE run_key=?", [run_key])
        if row is None:
            raise StoreError(f"No complete run {run_key} in this store (it may have been re-predicted).")
        return row[0]

    def heatmap(self, model_key: str, run_key: str, gene: str | list[str]) -> pd.DataFrame:
        """Tile x, y (level-0 px) and predicted value of one gene (or the mean of a signature's
        genes) on one slide."""
        table, value = self._value(model_key, gene)
        return self.con.execute(f"SELECT tile_idx, x, y, {value} AS value FROM {table} "
                                "WHERE run_id = ? ORDER BY tile_idx", [self._run_id(run_key)]).df()

    def top_tiles(self, model_key: str, gene: str | list[str], run_keys: list[str], k: int = 24) -> pd.DataFrame:
        """The ``k`` tiles with the highest predicted value of ``gene`` (or of the mean of a
        signature's genes) across the given runs."""
        table, value = self._value(model_key, gene)
        # top k first (one column scan), then join only those k rows to the runs: joining every
        # tile first costs seconds at 10 M tiles (benchmarks/store_bench.py)
        return self.con.execute(f"""
            WITH sel AS (SELECT run_id, run_key, tile_size, slide_name, slide_path FROM runs
                         WHERE run_key IN (SELECT unnest(?::VARCHAR[]))),
                 top AS (SELECT run_id, tile_idx, x, y, {value} AS value FROM {table}
                         WHERE run_id IN (SELECT run_id FROM sel) ORDER BY value DESC LIMIT ?)
            SELECT sel.run_key, top.tile_idx, top.value, top.x, top.y, sel.tile_size, sel.slide_name, sel.slide_path
            FROM top JOIN sel USING (run_id) ORDER BY top.value DESC""", [list(run_keys), k]).df()

    def tile_profile(self, model_key: str, run_key: str, tile_idx: int) -> pd.Series:
        info = self.model_info(model_key)
        df = self.con.execute(f"SELECT * EXCLUDE (run_id, tile_idx, x, y) FROM {info['pred_table']} "
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
        return index, _stack(tbl.column("embedding")), _stack(tbl.column("composition"))

    def tile_embedding(self, run_key: str, tile_idx: int) -> np.ndarray:
        """One tile's embedding."""
        row = self._one("SELECT embedding FROM tile_vectors WHERE run_id=? AND tile_idx=?",
                        [self._run_id(run_key), tile_idx])
        if row is None:
            raise StoreError(f"No tile {tile_idx} in run {run_key}.")
        return np.asarray(row[0], dtype=np.float32)

    def embeddings(self, run_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids ``run_id << 32 | tile_idx`` [N] int64, embeddings [N, E]) of the given runs, for
        the vector index (:mod:`core.store.tile_index`)."""
        tbl = self.con.sql("""SELECT (run_id::BIGINT << 32) | tile_idx AS id, embedding FROM tile_vectors
                              WHERE run_id IN (SELECT unnest(?::INTEGER[])) ORDER BY run_id, tile_idx""",
                           params=[[int(r) for r in run_ids]]).to_arrow_table()
        return np.asarray(tbl.column("id").to_numpy(), dtype=np.int64), _stack(tbl.column("embedding"))

    def model_runs(self, model_key: str) -> pd.DataFrame:
        """run_id, run_key, n_tiles of every complete run of a model."""
        return self.con.execute("SELECT run_id, run_key, n_tiles FROM runs WHERE model_key=? ORDER BY run_id",
                                [model_key]).df()

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
        counts = _stack(tbl.column("nuclei").cast(pa.list_(pa.float32())))
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
        col = _ident(gene)
        return self.con.execute(f"""
            WITH r AS (SELECT run_id, run_key FROM runs WHERE run_key IN (SELECT unnest(?::VARCHAR[]))),
                 sel AS (SELECT run_id, {col} AS v FROM {table} WHERE run_id IN (SELECT run_id FROM r)),
                 thr AS (SELECT quantile_cont(v, ?) AS t FROM sel),
                 per AS (SELECT run_id, any_value(thr.t) AS threshold, avg((v > thr.t)::DOUBLE) AS fraction
                         FROM sel, thr GROUP BY run_id)
            SELECT r.run_key, per.threshold, per.fraction FROM per JOIN r USING (run_id)
            ORDER BY r.run_key""", [list(run_keys), quantile]).df()

    def _value(self, model_key: str, genes: str | list[str]) -> tuple[str, str]:
        """(prediction table, SQL for one gene's column or the mean of several)."""
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise StoreError("No gene given.")
        info = self.model_info(model_key)
        missing = [g for g in genes if g not in info["genes"]]
        if missing:
            raise StoreError(f"{', '.join(missing)} not in the panel of {model_key}.")
        table = info["pred_table"]
        if len(genes) == 1:
            return table, _ident(genes[0])
        return table, "(" + " + ".join(_ident(g) for g in genes) + f") / {len(genes)}"

    def _pred_table(self, model_key: str, gene: str) -> str:
        info = self.model_info(model_key)
        if gene not in info["genes"]:
            raise StoreError(f"{gene} is not in the panel of {model_key}.")
        return info["pred_table"]


def _list_array(matrix: np.ndarray, dtype=np.float32) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel()))


def _stack(column) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.combine_chunks()
    width = len(flat[0])
    return np.asarray(flat.flatten(), dtype=np.float32).reshape(-1, width)

