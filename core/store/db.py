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
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from core.errors import StoreBusyError, StoreError
from core.store.cell_tables import CellTables
from core.store.domain_tables import DomainTables
from core.store.queries import StoreQueries
from core.store.schema import (_PRED_KEYS, SCHEMA_VERSION, SLIDE_COLUMNS, SUMMARY_COLUMNS, ModelInfo,  # noqa: F401
                               RunRecord, check_version, ident, list_array, migrate)
from core.vocab import slug

log = logging.getLogger(__name__)


def _rollback(con) -> None:
    """Undo the open transaction; a rollback that fails too (a connection DuckDB invalidated)
    is logged, so the error that caused it is the one raised."""
    try:
        con.execute("ROLLBACK")
    except Exception as exc:  # noqa: BLE001
        log.error("rollback failed: %s", exc)


def cohort_table_name(name: str) -> str:
    """The clinical table of cohort ``name``: its slug (readable) plus a short hash of the exact name
    (distinct names never share a table)."""
    return f"clinical_{slug(name)[:40]}_{hashlib.blake2b(name.encode(), digest_size=4).hexdigest()}"


class Store(StoreQueries, DomainTables, CellTables):
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
            except (duckdb.IOException, duckdb.ConnectionException, duckdb.ResourceInUseException) as exc:
                # another process holds the file lock (IOException), or this process has the file open
                # with the other access mode (ConnectionException: "different configuration"), or is
                # attaching it in another thread at this very moment (ResourceInUseException: "unique
                # file handle conflict"), as when one Streamlit session writes while another reads:
                # all pass in a moment
                text = str(exc).lower()
                busy = "lock" in text or "different configuration" in text or "file handle conflict" in text
                if busy and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if busy:
                    raise StoreBusyError(
                        f"The store {self.path.name} is busy: another process holds its lock (a prediction "
                        "job ingesting results, or another writer). Try again in a moment.") from exc
                raise StoreError(f"Cannot open the store {self.path}: {exc}") from exc
        try:
            migrate(self.con, self.path) if not read_only else check_version(self.con, self.path)
        except Exception:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        # one column per gene, and DuckDB's column names ignore case: "CD8A" and "cd8a" would clash
        by_lower: dict[str, list[str]] = {}
        for g in genes:
            by_lower.setdefault(str(g).lower(), []).append(str(g))
        dupes = sorted(names for names in by_lower.values() if len(names) > 1)
        if dupes:
            shown = "; ".join(" / ".join(repr(n) for n in names) for names in dupes)
            raise StoreError(f"Model {model_key}: gene names must be unique ignoring case (the store keeps one "
                             f"column per gene and column names ignore case), but the panel has {shown}. "
                             "Rename or drop the duplicates in the model card.")
        if self._one("SELECT 1 FROM models WHERE model_key=?", [model_key]):
            return model_key
        clash = sorted({g for g in genes if g.lower() in _PRED_KEYS})
        if clash:
            raise StoreError(f"Gene names {clash} collide with the prediction table's own columns {_PRED_KEYS}.")
        cols = ", ".join(f"{ident(g)} REAL" for g in genes)
        con = self.con
        con.execute("BEGIN")
        try:
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                        f"(run_id INTEGER, tile_idx INTEGER, x INTEGER, y INTEGER, {cols})")
            con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, now())",
                        [model_key, model_id, version, table, genes, cell_types, json.dumps(card)])
            con.execute("COMMIT")
        except Exception:
            _rollback(con)
            raise
        return model_key

    def models(self) -> pd.DataFrame:
        return self.con.execute(
            "SELECT model_key, model_id, version, genes, cell_types, card FROM models ORDER BY registered_at").df()

    # -- runs ---------------------------------------------------------------------------------
    def find_run(self, run_key: str) -> dict | None:
        df = self.con.execute("SELECT * FROM runs WHERE run_key=?", [run_key]).df()
        return None if df.empty else df.iloc[0].to_dict()

    def write_run(self, run: RunRecord, xy: np.ndarray, tissue: np.ndarray, expression: np.ndarray,
                  embedding: np.ndarray, composition: np.ndarray, nuclei: np.ndarray | None = None, *,
                  summary: pd.DataFrame, cells: dict | None = None, joint: np.ndarray | None = None) -> int:
        """Write a whole slide's results atomically; the ``runs`` row is the completion marker.
        A run written again replaces the old one under a new ``run_id``. Returns the run id.

        ``nuclei``: optional per-tile nucleus counts per class [n, C]. ``summary``: the slide's
        statistics per gene (``SUMMARY_COLUMNS``: gene, mean, median, q90, morans_i), computed by
        :func:`core.analysis.spatial.slide_summary`; the store stores them, it does not compute them.
        ``cells``: a cells run's cells as read from the spool (``cells``, ``cell_tile``, ``cell_w``,
        ``cell_z`` and the record ``fields``), written in the same transaction. ``joint``: the
        tiles' embeddings in the model's joint space [n, d] (models that ship one).
        """
        info = self.model_info(run.model_key)
        genes = info.genes
        n = len(xy)
        if expression.shape != (n, len(genes)):
            raise StoreError(f"expression is {expression.shape}, expected {(n, len(genes))}")
        missing = [c for c in SUMMARY_COLUMNS if c not in summary.columns]
        if missing or sorted(summary["gene"]) != sorted(genes):
            raise StoreError(f"the slide summary must have one row per panel gene and columns {SUMMARY_COLUMNS}"
                             + (f"; missing {missing}" if missing else ""))
        summary = summary[list(SUMMARY_COLUMNS)].assign(run_key=run.run_key)
        idx = np.arange(n, dtype=np.int32)
        x, y = xy[:, 0].astype(np.int32), xy[:, 1].astype(np.int32)
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
                for table in ("tiles", "tile_vectors", info.pred_table):
                    con.execute(f"DELETE FROM {table} WHERE run_id=?", [old[0]])
                self._drop_cells(old[0])
                con.execute("DELETE FROM runs WHERE run_key=?", [run.run_key])
            con.execute("DELETE FROM slide_summary WHERE run_key=?", [run.run_key])
            ids = np.full(n, run_id, dtype=np.int32)
            con.register("_tiles", pa.table({"run_id": ids, "tile_idx": idx, "x": x, "y": y,
                                             "tissue": tissue.astype(np.float32)}))
            con.execute("INSERT INTO tiles SELECT * FROM _tiles")
            con.register("_pred", pa.table({"run_id": ids, "tile_idx": idx, "x": x, "y": y,
                                            **{g: expression[:, i].astype(np.float32) for i, g in enumerate(genes)}}))
            con.execute(f"INSERT INTO {info.pred_table} SELECT * FROM _pred")
            vec = {"run_id": ids, "tile_idx": idx, "embedding": list_array(embedding),
                   "composition": list_array(composition)}
            if nuclei is not None:
                vec["nuclei"] = list_array(nuclei, np.int16)
            if joint is not None:
                vec["joint"] = list_array(joint)
            con.register("_vec", pa.table(vec))
            con.execute("INSERT INTO tile_vectors BY NAME SELECT * FROM _vec")
            if cells is not None:
                self._write_cells(run_id, xy, cells, run.model_key)
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
            _rollback(con)
            raise
        finally:
            for name in ("_tiles", "_pred", "_vec", "_summary"):
                con.unregister(name)
        return int(run_id)


    # -- cohorts ------------------------------------------------------------------------------
    def save_cohort(self, name: str, slides: pd.DataFrame, clinical: pd.DataFrame, source: dict,
                    issues: list[dict] | None = None) -> None:
        """Replace cohort ``name``: its slides (``SLIDE_COLUMNS``), clinical table and import issues.

        The clinical table is ``clinical_<slug>_<hash of the exact name>``, so names that slug alike
        ("TCGA-BRCA", "tcga brca") keep tables of their own; ``cohorts.clinical_table`` records the
        name, so cohorts of older stores (``clinical_<slug>``) keep reading theirs.
        """
        table = cohort_table_name(name)
        previous = self._one("SELECT clinical_table FROM cohorts WHERE name=?", [name])
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
            con.execute(f"CREATE OR REPLACE TABLE {ident(table)} AS SELECT * FROM _clin")
            con.execute("INSERT OR REPLACE INTO cohorts VALUES (?, ?, ?, now())", [name, table, json.dumps(source)])
            if previous and previous[0] != table and not self._one(
                    "SELECT 1 FROM cohorts WHERE clinical_table=?", [previous[0]]):
                con.execute(f"DROP TABLE IF EXISTS {ident(previous[0])}")  # an older store's table, now unused
            con.execute("COMMIT")
        except Exception:
            _rollback(con)
            raise
        finally:
            for view in ("_slides", "_issues", "_clin"):
                con.unregister(view)

    def save_measured(self, cohort: str, long: pd.DataFrame, source: dict) -> None:
        """Replace the cohort's measured expression: ``long`` has columns patient, gene, value."""
        if cohort not in self.cohorts():
            raise StoreError(f"No cohort named {cohort!r} in {self.path}; import it first.")
        data = long[["patient", "gene", "value"]].assign(cohort=cohort)[["cohort", "patient", "gene", "value"]]
        con = self.con
        con.execute("BEGIN")
        try:
            con.execute("DELETE FROM measured WHERE cohort=?", [cohort])
            con.register("_measured", data)
            con.execute("INSERT INTO measured SELECT * FROM _measured")
            con.execute("INSERT OR REPLACE INTO measured_sources VALUES (?, ?, ?, ?, now())",
                        [cohort, json.dumps(source), int(data["gene"].nunique()), int(data["patient"].nunique())])
            con.execute("COMMIT")
        except Exception:
            _rollback(con)
            raise
        finally:
            con.unregister("_measured")

    def update_slide(self, cohort: str, slide_path: str, values: dict) -> None:
        """Update import-report columns of one slide (e.g. after a µm/px fix)."""
        bad = set(values) - set(SLIDE_COLUMNS)
        if bad:
            raise StoreError(f"unknown slide columns {sorted(bad)}")
        sets = ", ".join(f"{ident(k)} = ?" for k in values)
        self.con.execute(f"UPDATE cohort_slides SET {sets} WHERE cohort=? AND slide_path=?",
                         [*values.values(), cohort, slide_path])

    def select_slide(self, cohort: str, patient: str, slide_path: str) -> None:
        """Make ``slide_path`` the patient's slide for patient-level analyses (one per patient)."""
        self.con.execute("BEGIN")
        try:
            self.con.execute("UPDATE cohort_slides SET selected = (slide_path = ?) WHERE cohort=? AND patient=?",
                             [slide_path, cohort, patient])
            self.con.execute("COMMIT")
        except Exception:
            _rollback(self.con)
            raise

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
        return self.con.execute(f"SELECT * FROM {ident(row[0])}").df()

    def model_coverage(self, cohort: str) -> pd.DataFrame:
        """Every model in the store (oldest first) with how many of the cohort's slides it has
        predicted: model_key, predicted."""
        return self.con.execute("""
            SELECT m.model_key,
                   (SELECT count(DISTINCT s.slide_path) FROM cohort_slides s JOIN runs r
                      ON r.slide_fp = s.fingerprint AND abs(r.mpp - s.mpp) < 1e-9
                    WHERE s.cohort = ? AND r.model_key = m.model_key) AS predicted
            FROM models m ORDER BY m.registered_at""", [cohort]).df()

    def cohort_runs(self, cohort: str, model_key: str, *, stride: float = 1.0) -> pd.DataFrame:
        """Every slide of the cohort with its latest complete run for the model (or NULL) on the
        default grid, or with ``stride`` ½ / ¼ its latest high-resolution run."""
        return self.con.execute("""
            SELECT s.* EXCLUDE (n_tiles, width, height), r.run_key, r.n_tiles, r.tile_size,
                   coalesce(r.width, s.width) AS width, coalesce(r.height, s.height) AS height, r.finished_at
            FROM cohort_slides s
            LEFT JOIN (SELECT * FROM runs WHERE model_key = ? AND coalesce(TRY_CAST(tiling->>'stride' AS DOUBLE), 1.0) = ?
                       QUALIFY row_number() OVER (PARTITION BY slide_fp, mpp ORDER BY finished_at DESC) = 1) r
              ON r.slide_fp = s.fingerprint AND abs(r.mpp - s.mpp) < 1e-9
            WHERE s.cohort = ? ORDER BY s.patient, s.slide_name""", [model_key, float(stride), cohort]).df()

