"""The inference engine: plan slides, stream tiles through loader workers, run the model, spool.

Data flow (one pass over a whole cohort, not one loader per slide):

    plan (main): fingerprint → run key → cached? else tissue grid, minus chunks already spooled
    read (DataLoader workers, one OpenSlide handle per slide per worker): tiles of pending chunks
    model (main): the fastest verified runtime (ONNX Runtime on CPU, PyTorch + AMP on CUDA)
    write (main): finished chunks → Parquet in the spool; a finished slide → its run marker
    ingest: complete runs → the DuckDB store, one transaction each, whenever the lock is free

Faults stay where they happen: a slide that cannot be planned or read (moved, deleted, damaged)
is a ``failed`` result and the others go on; a slide whose run another job is writing is ``busy``
(run locks, :mod:`core.engine.spool`); a spooled run the store cannot take is quarantined or left
for the next ingest (:func:`core.engine.access.ingest_spool`), and if it is one of this call's own
runs, :class:`core.errors.IngestError` is raised once every other slide is done and stored.

A run is keyed by (slide content fingerprint, model id + version, tiling, slide µm/px); a run that
is complete in the store is served from it and no model work is done. See :mod:`core.engine.spool` for
why the engine never holds the store's write lock while it computes, and how it resumes.
The pieces: :mod:`core.engine.plan` (cache check, tissue grid), :mod:`core.engine.loop` (workers and
runtime), :mod:`core.engine.access` (store lock policy, ingest); this module ties them together.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from core.engine.access import StoreAccess, ingest_spool
from core.engine.loop import Engine
from core.engine.modelhub import LoadedModel
from core.engine.plan import Progress, SlideJob, SlideResult, plan_slides, usable_slides
from core.errors import IngestError, StoreBusyError, TesseraError
from core.store.db import Store
from core.wsi.tiling import TilingParams

log = logging.getLogger(__name__)


def predict_slides(store: Store | str | Path, slides: list[tuple[str | Path, float | None]], model: LoadedModel, *,
                   tiling: TilingParams | None = None, device: str = "auto", batch_size: int | None = None,
                   workers: int | None = None, runtime: str = "auto", force: bool = False,
                   progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
                   engine: Engine | None = None, ingest_wait_s: float = 30.0,
                   ingest: bool = True, nuclei: bool = False, cells: bool = False) -> list[SlideResult]:
    """Predict ``slides`` ((path, µm/px override or None) pairs) into the store, or serve them from it.

    ``nuclei=True`` also counts nuclei per class in every tile (in the loader workers, overlapped
    with the model); such runs are cached separately from runs without counts. ``cells=True``
    goes further: every nucleus becomes a cell (centroid, outline, morphology, type, profile; see
    :mod:`core.analysis.cells`), stored with the run; it implies the counts, and needs the default
    grid (stride 1: cells do not depend on the stride, and overlapping tiles would find them twice).

    ``ingest=False`` (Ray actors): read the store only, leave finished runs in the spool for the
    driver to ingest.
    """
    access = StoreAccess(store)
    tiling = tiling or model.tiling()
    if cells and tiling.high_res:
        raise TesseraError(f"Cells need the default grid: run --cells without --stride (stride {tiling.stride:g} "
                           "tiles overlap, so each nucleus would be found several times; cells do not depend on it).")
    nuclei = nuclei or cells
    ingested: set[str] = set()
    failures: dict[str, str] = {}

    def open_store():
        if ingest:
            return access.open(wait_s=5.0, or_read_only=True)
        return Store(access.path, read_only=True, wait_s=30.0)

    def ingest_earlier(st: Store) -> None:
        if ingest and not st.read_only:  # runs finished by an earlier, interrupted job
            keys = ingest_spool(st, access.spool, failures=failures)
            ingested.update(keys)
            for key in keys:
                failures.pop(key, None)

    # planning holds the store only for brief lookups, never while it hashes or reads slides
    planned = plan_slides(open_store, access.spool, slides, model, tiling, force=force, nuclei=nuclei,
                          on_open=ingest_earlier, cells=cells)
    jobs = [p for p in planned if isinstance(p, SlideJob)]
    finished: set[int] = set()
    failed: dict[int, str] = {}
    try:
        if jobs:
            engine = engine or Engine(model, device=device, batch_size=batch_size, workers=workers, runtime=runtime)
            if progress:    # the planned total from the start, not 0 / 0 until the first batch
                progress(Progress(0, sum(len(j.xy) for j in jobs), slide=jobs[0].name))
            # finished slides are ingested on a background thread while the model keeps running
            # (DuckDB and the runtimes release the GIL); one thread, so ingests never overlap
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1, thread_name_prefix="ingest") as background:
                pending = []
                on_slide = (lambda job: pending.append(background.submit(_ingest, access, 0.0, failures, ingested))
                            ) if ingest else None
                finished = engine.run(jobs, access.spool, progress=progress, cancel=cancel, nuclei=nuclei,
                                      on_slide=on_slide, failed=failed, cells=cells)
                for future in pending:
                    try:
                        future.result()
                    except Exception as exc:  # noqa: BLE001 - the runs stay in the spool; retried below
                        log.warning("background ingest failed (%s); retrying at the end", exc)
            if ingest and access.spool.complete_runs() and not _ingest(access, ingest_wait_s, failures, ingested):
                log.warning("the store stayed busy: finished runs wait in %s and are ingested by the next "
                            "process that opens the store for writing (the app does on its next page load)",
                            access.spool.root)
            if ingest and finished:
                access.refresh_index(model.key)
    finally:
        for job in jobs:     # cancelled or failed slides: their runs are free for the next writer
            job.release()
    results, by_job = [], {id(j): i for i, j in enumerate(jobs)}
    for p in planned:
        if isinstance(p, SlideResult):
            results.append(p)
        else:
            j = by_job[id(p)]
            seconds = time.perf_counter() - p.started if p.started else 0.0
            if j in failed:
                results.append(SlideResult(p.name, p.run_key, "failed", len(p.xy), seconds, failed[j]))
            else:
                results.append(SlideResult(p.name, p.run_key, "computed" if j in finished else "cancelled",
                                           len(p.xy), seconds))
    # computed but refused by the store (rolled back): the job says so once every other slide is in
    mine = {p.run_key: p.name for i, p in enumerate(jobs) if i in finished}
    refused = {k: failures[k] for k in mine if k in failures and k not in ingested}
    if refused:
        raise IngestError(
            f"{len(refused)} of {len(results)} slide(s) were computed but could not be stored: "
            + "; ".join(f"{mine[k]}: {why}" for k, why in refused.items())
            + f". Their results wait in {access.spool.root} (retried by the next ingest) or, after "
              f"repeated failures, in {access.spool.quarantine_root}.")
    return results


def _ingest(access: StoreAccess, wait_s: float, failures: dict, ingested: set) -> int:
    """Ingest into the store like :meth:`StoreAccess.ingest`, noting which runs went in (a run that
    went in at a later try is no longer a failure)."""
    if not access.spool.complete_runs():
        return 0
    try:
        with access.open(wait_s) as st:
            keys = ingest_spool(st, access.spool, failures=failures)
    except StoreBusyError:
        log.info("store busy: %d finished run(s) wait in the spool", len(access.spool.complete_runs()))
        return 0
    ingested.update(keys)
    for key in keys:
        failures.pop(key, None)
    return len(keys)


def predict_cohort(store: Store | str | Path, cohort: str, model: LoadedModel, *, device: str = "auto",
                   batch_size: int | None = None, workers: int | None = None, force: bool = False,
                   min_tissue: float | None = None, runtime: str = "auto",
                   progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
                   ingest_wait_s: float = 30.0, nuclei: bool = False, cells: bool = False,
                   stride: float = 1.0) -> list[SlideResult]:
    """Predict every usable slide of a cohort (status ``ok``), honouring µm/px overrides.
    ``stride`` ½ or ¼: a high-resolution run (overlapping tiles), cached apart from the default."""
    with StoreAccess(store).open(wait_s=5.0, or_read_only=True) as st:
        pairs = usable_slides(st, cohort)
    tiling = model.tiling(stride=float(stride), **({"min_tissue": min_tissue} if min_tissue is not None else {}))
    return predict_slides(store, pairs, model, tiling=tiling, device=device, batch_size=batch_size,
                          workers=workers, runtime=runtime, force=force, progress=progress, cancel=cancel,
                          ingest_wait_s=ingest_wait_s, nuclei=nuclei, cells=cells)
