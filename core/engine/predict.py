"""The inference engine: plan slides, stream tiles through loader workers, run the model, spool.

Data flow (one pass over a whole cohort, not one loader per slide):

    plan (main): fingerprint → run key → cached? else tissue grid, minus chunks already spooled
    read (DataLoader workers, one OpenSlide handle per slide per worker): tiles of pending chunks
    model (main): the fastest verified runtime (ONNX Runtime on CPU, PyTorch + AMP on CUDA)
    write (main): finished chunks → Parquet in the spool; a finished slide → its run marker
    ingest: complete runs → the DuckDB store, one transaction each, whenever the lock is free

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
from core.engine.plan import Progress, SlideJob, SlideResult, plan_slide, usable_slides
from core.store.db import Store
from core.wsi.tiling import TilingParams

log = logging.getLogger(__name__)


def predict_slides(store: Store | str | Path, slides: list[tuple[str | Path, float | None]], model: LoadedModel, *,
                   tiling: TilingParams | None = None, device: str = "auto", batch_size: int | None = None,
                   workers: int | None = None, runtime: str = "auto", force: bool = False,
                   progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
                   engine: Engine | None = None, ingest_wait_s: float = 30.0,
                   ingest: bool = True, nuclei: bool = False) -> list[SlideResult]:
    """Predict ``slides`` ((path, µm/px override or None) pairs) into the store, or serve them from it.

    ``nuclei=True`` also counts nuclei per class in every tile (in the loader workers, overlapped
    with the model); such runs are cached separately from runs without counts.

    ``ingest=False`` (Ray actors): read the store only, leave finished runs in the spool for the
    driver to ingest.
    """
    access = StoreAccess(store)
    tiling = tiling or model.tiling()
    opened = access.open(wait_s=5.0, or_read_only=True) if ingest else Store(access.path, read_only=True, wait_s=30.0)
    with opened as st:
        if not st.read_only:
            ingest_spool(st, access.spool)  # runs finished by an earlier, interrupted job
        planned = [plan_slide(st, access.spool, path, model, tiling, mpp_override=mpp, force=force, nuclei=nuclei)
                   for path, mpp in slides]
    jobs = [p for p in planned if isinstance(p, SlideJob)]
    finished: set[int] = set()
    if jobs:
        engine = engine or Engine(model, device=device, batch_size=batch_size, workers=workers, runtime=runtime)
        if progress:    # the planned total from the start, not 0 / 0 until the first batch
            progress(Progress(0, sum(len(j.xy) for j in jobs), slide=jobs[0].name))
        # finished slides are ingested on a background thread while the model keeps running
        # (DuckDB and the runtimes release the GIL); one thread, so ingests never overlap
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="ingest") as background:
            pending = []
            on_slide = (lambda job: pending.append(background.submit(access.ingest, 0.0))) if ingest else None
            finished = engine.run(jobs, access.spool, progress=progress, cancel=cancel, nuclei=nuclei,
                                  on_slide=on_slide)
            for future in pending:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - the runs stay in the spool; retried below
                    log.warning("background ingest failed (%s); retrying at the end", exc)
        if ingest and access.spool.complete_runs() and not access.ingest(wait_s=ingest_wait_s):
            log.warning("the store stayed busy: finished runs wait in %s and are ingested by the next "
                        "process that opens the store for writing (the app does on its next page load)",
                        access.spool.root)
        if ingest and finished:
            access.refresh_index(model.key)
    results, by_job = [], {id(j): i for i, j in enumerate(jobs)}
    for p in planned:
        if isinstance(p, SlideResult):
            results.append(p)
        else:
            done = by_job[id(p)] in finished
            seconds = time.perf_counter() - p.started if p.started else 0.0
            results.append(SlideResult(p.name, p.run_key, "computed" if done else "cancelled", len(p.xy), seconds))
    return results


def predict_cohort(store: Store | str | Path, cohort: str, model: LoadedModel, *, device: str = "auto",
                   batch_size: int | None = None, workers: int | None = None, force: bool = False,
                   min_tissue: float | None = None, runtime: str = "auto",
                   progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
                   ingest_wait_s: float = 30.0, nuclei: bool = False) -> list[SlideResult]:
    """Predict every usable slide of a cohort (status ``ok``), honouring µm/px overrides."""
    with StoreAccess(store).open(wait_s=5.0, or_read_only=True) as st:
        pairs = usable_slides(st, cohort)
    tiling = model.tiling(**({"min_tissue": min_tissue} if min_tissue is not None else {}))
    return predict_slides(store, pairs, model, tiling=tiling, device=device, batch_size=batch_size,
                          workers=workers, runtime=runtime, force=force, progress=progress, cancel=cancel,
                          ingest_wait_s=ingest_wait_s, nuclei=nuclei)
