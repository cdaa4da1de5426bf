"""How the engine and the app reach the store without holding its lock: short write connections
that wait while another process holds the lock, and the ingest of complete spooled runs.

Ingest is where a finished slide's per-gene summary (mean, median, q90, Moran's I) is computed
(:func:`core.analysis.spatial.slide_summary`) and handed to the store with the tiles.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from core.analysis.spatial import slide_summary
from core.engine.spool import MAX_INGEST_ATTEMPTS, Spool, spool_dir
from core.errors import StoreBusyError
from core.store.db import RunRecord, Store
from core.wsi.tiling import default_grid

log = logging.getLogger(__name__)


def ingest_spool(store: Store, spool: Spool, *, failures: dict[str, str] | None = None) -> list[str]:
    """Move every complete run of ``spool`` into ``store``, one transaction each, then delete it
    from the spool; returns the run keys ingested. Idempotent: a crash between the commit and the
    deletion re-ingests the same rows (``write_run`` replaces a run), never duplicates them.

    One bad run never stops the others: a run that cannot be read (a damaged chunk or marker) is
    moved to the quarantine at once; a run the store refuses (the transaction is rolled back) stays
    for the next ingest and is quarantined after :data:`MAX_INGEST_ATTEMPTS` refusals. Either
    way it is logged and, with ``failures``, noted there as ``{run_key: reason}``. A run whose
    lock another process holds (a writer rewriting it, another ingest) is left for the next ingest.
    """
    done = []
    for run_key in spool.complete_runs():
        lock = spool.lock(run_key)
        if lock is None:
            log.info("run %s is locked by another process; it is ingested later", run_key)
            continue
        try:
            if not (spool.root / run_key / "run.json").exists():  # another ingest took it meanwhile
                lock.release()
                continue
            try:
                record, arrays = spool.read_run(run_key)
                model = record.pop("model")
                layout = record.pop("cell_layout", None)
                run = RunRecord(**record)
                cells = None if layout is None else {
                    "cells": arrays["cells"], "cell_tile": arrays["cell_tile"], "cell_w": arrays["cell_w"],
                    "cell_z": arrays["cell_z"], "fields": layout["fields"], "profiles": layout.get("profiles")}
                xy = np.stack([arrays["x"], arrays["y"]], axis=1)
            except Exception as exc:  # noqa: BLE001 - a damaged run must not stop the others
                reason = f"unreadable in the spool: {exc}"
                if failures is not None:
                    failures[run_key] = reason
                spool.quarantine(run_key, reason, stage="read")
                lock.release(unlink=True)
                continue
            try:
                store.register_model(model["model_id"], model["version"], model["genes"], model["cell_types"],
                                     model["card"])
                # a high-resolution run's summaries (and Moran's I) are those of its default-grid tiles
                on_grid = default_grid(xy, run.tile_size) if float(run.tiling.get("stride", 1.0)) != 1.0 else None
                summary = (slide_summary(arrays["expression"], xy, run.tile_size, model["genes"]) if on_grid is None
                           else slide_summary(arrays["expression"][on_grid], xy[on_grid], run.tile_size, model["genes"]))
                store.write_run(run, xy, arrays["tissue"], arrays["expression"], arrays["embedding"],
                                arrays["composition"], arrays.get("nuclei"), summary=summary, cells=cells,
                                joint=arrays.get("joint"))
            except Exception as exc:  # noqa: BLE001 - rolled back by the store; this run only
                reason = f"the store refused it: {type(exc).__name__}: {exc}"
                if failures is not None:
                    failures[run_key] = reason
                attempts = spool.record_failure(run_key, reason)
                if attempts >= MAX_INGEST_ATTEMPTS:
                    spool.quarantine(run_key, f"{reason} ({attempts} attempts)", stage="write")
                    lock.release(unlink=True)
                else:
                    log.warning("run %s was not ingested (attempt %d of %d, retried by the next ingest): %s",
                                run_key, attempts, MAX_INGEST_ATTEMPTS, reason)
                    lock.release()
                continue
            spool.remove(run_key)
            lock.release(unlink=True)
            done.append(run_key)
        finally:
            lock.release()
    if done:
        log.info("ingested %d run(s) from %s", len(done), spool.root)
    return done


class StoreAccess:
    """The store as an open :class:`Store` (used as is: the caller holds the lock) or as a path
    (opened only for short moments, waiting while another process holds the lock)."""

    def __init__(self, store: Store | str | Path):
        self.store = store if isinstance(store, Store) else None
        self.path = store.path if isinstance(store, Store) else Path(store)
        self.spool = Spool(spool_dir(self.path))

    def open(self, wait_s: float = 60.0, *, or_read_only: bool = False):
        """The store for writing, waiting up to ``wait_s`` for the lock; then, with
        ``or_read_only``, a read-only view (readers share the file with other readers)."""
        if self.store is not None:
            return contextlib.nullcontext(self.store)
        try:
            return Store(self.path, wait_s=wait_s)
        except StoreBusyError:
            if or_read_only and self.path.exists():
                return Store(self.path, read_only=True)
            raise

    def ingest(self, wait_s: float = 0.0, *, failures: dict[str, str] | None = None) -> int:
        """Ingest complete spooled runs; returns how many (0 when the lock stayed busy). Runs that
        fail are quarantined or left for the next try (:func:`ingest_spool`), never raised."""
        if not self.spool.complete_runs():
            return 0
        try:
            with self.open(wait_s) as store:
                return len(ingest_spool(store, self.spool, failures=failures))
        except StoreBusyError:
            log.info("store busy: %d finished run(s) wait in the spool", len(self.spool.complete_runs()))
            return 0

    def quarantined(self) -> list[dict]:
        """Spooled runs that could not be ingested, newest first (:meth:`Spool.quarantined`):
        dicts with run_key, slide, reason, stage, time (epoch seconds) and path."""
        return self.spool.quarantined()

    def refresh_index(self, model_key: str) -> None:
        """Bring the model's similar-tiles index up to date (:mod:`core.store.tile_index`). The store is
        opened read-only, and only while vectors are read (not while the index is trained). A
        failure is logged, not raised: queries search what the index lacks exactly."""
        from core.store.tile_index import refresh

        try:
            refresh(self.store if self.store is not None else self.path, model_key)
        except Exception as exc:  # noqa: BLE001 - the predictions are safe; the index can be rebuilt
            log.warning("the similar-tiles index was not updated (%s); `python -m core.cli index` rebuilds it", exc)
