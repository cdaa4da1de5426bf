"""Planning: which slides need model work, and what each one's run is.

A run is keyed by (slide content fingerprint, model id + version, tiling, slide µm/px); a run
that is complete in the store is served from it and no model work is done.

Planning never holds the store for long (:func:`plan_slides`): the store is opened for two brief
moments (fingerprint memo and cached runs looked up; new fingerprints remembered), while content
hashing, slide reading and tissue masks run with the store closed, so the app and other jobs can
write meanwhile. A slide that cannot be planned (moved, deleted, unreadable) is a ``failed``
:class:`SlideResult` with the reason; the other slides go on. A slide whose run another writer is
computing (its run lock is held, :mod:`core.engine.spool`) is ``busy`` and skipped.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.engine.modelhub import LoadedModel
from core.engine.spool import CHUNK_TILES, RunLock, Spool
from core.store.db import RunRecord, Store
from core.vocab import SlideStatus
from core.wsi.fingerprint import file_fingerprint, fingerprint
from core.wsi.slide import Slide
from core.wsi.tiling import TilingParams, tile_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideResult:
    slide_name: str
    run_key: str
    status: str  # "cached", "computed", "cancelled", "failed" (see message) or "busy" (another job has it)
    n_tiles: int
    seconds: float
    message: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Progress:
    """Where a prediction job stands: tiles done of the planned total, rate, ETA, current slide."""

    done: int
    total: int
    tiles_per_s: float = 0.0
    eta_s: float | None = None
    slide: str = ""


@dataclass
class SlideJob:
    """The planned work for one slide that is not in the store yet. ``run`` is the record the
    store gets when the slide is complete (``device`` and ``seconds`` are filled in by then)."""

    path: Path
    mpp_override: float | None
    run: RunRecord
    xy: np.ndarray
    tissue: np.ndarray
    pending: set[int] = field(default_factory=set)  # chunk numbers still to compute
    started: float | None = None
    lock: RunLock | None = field(default=None, repr=False)  # the run's spool lock, held while writing

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_key(self) -> str:
        return self.run.run_key

    @property
    def size_level0(self) -> int:
        return self.run.tile_size

    @property
    def n_chunks(self) -> int:
        return -(-len(self.xy) // CHUNK_TILES)

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * CHUNK_TILES, min((chunk + 1) * CHUNK_TILES, len(self.xy)))


def run_key_for(slide_fp: str, model_key: str, tiling: TilingParams, slide_mpp: float, *,
                nuclei: bool = False, cells: bool | str = False) -> str:
    """The cache key; the slide's µm/px is part of it, since fixing a wrong µm/px changes the tiles.
    A run with nucleus counts, or with cells, is a different run (the keys of runs without them are
    unchanged); the tiling's key holds the stride of a high-resolution run."""
    payload = (f"{slide_fp}|{model_key}|{tiling.key()}|{slide_mpp:.6g}" + ("|nuclei" if nuclei else "")
               + ((f"|cells:{cells}" if isinstance(cells, str) else "|cells") if cells else ""))
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def usable_slides(store: Store, cohort: str) -> list[tuple[str, float | None]]:
    """The cohort's slides that can be predicted (status ok), as (path, µm/px override or None):
    the override is passed only where the user set one; otherwise the slide's metadata is read."""
    slides = store.cohort_slides(cohort)
    usable = slides[slides["status"] == SlideStatus.OK]
    return [(row.slide_path, float(row.mpp) if row.mpp_source == "override" else None)
            for row in usable.itertuples(index=False)]


def plan_slide(store: Store, spool: Spool, path: str | Path, model: LoadedModel, tiling: TilingParams, *,
               mpp_override: float | None = None, force: bool = False, nuclei: bool = False,
               cells: bool = False) -> SlideJob | SlideResult:
    """A :class:`SlideResult` (cached, or busy when another writer holds the run) when no model
    work is due here, else the :class:`SlideJob` (holding the run's spool lock)."""
    path = Path(path)
    started = time.perf_counter()
    slide_fp = fingerprint(store, path)
    with Slide(path, mpp_override=mpp_override) as slide:
        mpp = slide.mpp
        run_key = run_key_for(slide_fp, model.key, tiling, mpp, nuclei=nuclei, cells=cells and model.cells_variant)
        existing = store.find_run(run_key)
        if existing is not None and not force:
            log.info("%s: cached (run %s, %d tiles), no model work", path.name, run_key, existing["n_tiles"])
            return SlideResult(path.name, run_key, "cached", int(existing["n_tiles"]), time.perf_counter() - started)
        return _job(spool, path, slide, slide_fp, run_key, model, tiling, mpp_override, force, nuclei, started, cells)


def _job(spool: Spool, path: Path, slide: Slide, slide_fp: str, run_key: str, model: LoadedModel,
         tiling: TilingParams, mpp_override: float | None, force: bool, nuclei: bool,
         started: float, cells: bool = False) -> SlideJob | SlideResult:
    lock = spool.lock(run_key, slide=path.name)
    if lock is None:
        holder = spool.lock_holder(run_key)
        log.info("%s: run %s is being written by another process (pid %s); skipped", path.name, run_key,
                 holder.get("pid", "?"))
        return SlideResult(path.name, run_key, "busy", 0, time.perf_counter() - started,
                           f"another job (pid {holder.get('pid', '?')}) is computing this slide")
    try:
        grid = tile_grid(slide, tiling)
        width, height = slide.dimensions
        if force:
            spool.remove(run_key)
        run = RunRecord(run_key=run_key, slide_fp=slide_fp, model_key=model.key, tiling_key=tiling.key(),
                        tiling={**asdict(tiling), **({"nuclei": True} if nuclei else {}),
                                **({"cells": True} if cells else {})}, slide_name=path.name,
                        slide_path=str(path.resolve()), tile_size=grid.size_level0, width=width, height=height,
                        mpp=slide.mpp, device="", seconds=0.0)
        job = SlideJob(path, mpp_override, run, grid.xy, grid.tissue, lock=lock)
        job.pending = set(range(job.n_chunks)) - spool.done_chunks(run_key)
    except BaseException:
        lock.release()
        raise
    if len(job.pending) < job.n_chunks:
        log.info("%s: resuming, %d of %d chunks already spooled", path.name, job.n_chunks - len(job.pending),
                 job.n_chunks)
    return job


def _failed(path: Path, exc: BaseException, started: float, run_key: str = "") -> SlideResult:
    message = str(exc) or type(exc).__name__
    log.warning("%s: skipped, it cannot be read (%s)", path.name, message)
    return SlideResult(path.name, run_key, "failed", 0, time.perf_counter() - started, message)


def plan_slides(open_store, spool: Spool, slides: list[tuple[str | Path, float | None]], model: LoadedModel,
                tiling: TilingParams, *, force: bool = False, nuclei: bool = False,
                on_open=None, cells: bool = False) -> list[SlideJob | SlideResult]:
    """Plan many slides, holding the store only for brief lookups (see the module docstring).

    ``open_store()`` returns a context manager giving the store (writable, or read-only: then new
    fingerprints are not remembered); ``on_open(store)`` runs in the first moment (e.g. an ingest).
    One result per slide, in order: a :class:`SlideJob` or a :class:`SlideResult` (cached, busy, failed).
    """
    out: list = [None] * len(slides)
    paths = [Path(p) for p, _ in slides]
    starts = [time.perf_counter()] * len(slides)
    stats: dict[int, tuple[str, int, int]] = {}
    fps: dict[int, str] = {}
    # 1. one brief moment: the fingerprint memo
    with open_store() as st:
        if on_open is not None:
            on_open(st)
        for i, path in enumerate(paths):
            try:
                resolved = path.resolve()
                info = resolved.stat()
                stats[i] = (str(resolved), info.st_size, info.st_mtime_ns)
                cached = st.cached_fingerprint(*stats[i])
                if cached:
                    fps[i] = cached
            except Exception as exc:  # noqa: BLE001 - per slide
                out[i] = _failed(path, exc, starts[i])
    # 2. store closed: hash new files, read µm/px
    new_fps: dict[int, str] = {}
    keys: dict[int, tuple[str, float]] = {}
    for i, path in enumerate(paths):
        if out[i] is not None:
            continue
        try:
            if i not in fps:
                fps[i] = new_fps[i] = file_fingerprint(stats[i][0])
            with Slide(path, mpp_override=slides[i][1]) as slide:
                keys[i] = (run_key_for(fps[i], model.key, tiling, slide.mpp, nuclei=nuclei,
                                      cells=cells and model.cells_variant), slide.mpp)
        except Exception as exc:  # noqa: BLE001 - per slide
            out[i] = _failed(path, exc, starts[i])
    # 3. one brief moment: remember new fingerprints, look the runs up
    existing: dict[int, dict] = {}
    with open_store() as st:
        if not st.read_only:
            for i, fp in new_fps.items():
                st.remember_fingerprint(*stats[i], fp)
        for i, (run_key, _) in keys.items():
            found = None if force else st.find_run(run_key)
            if found is not None:
                existing[i] = found
    # 4. store closed: tissue grids of the slides with model work
    for i, (run_key, _) in keys.items():
        path = paths[i]
        if i in existing:
            log.info("%s: cached (run %s, %d tiles), no model work", path.name, run_key, existing[i]["n_tiles"])
            out[i] = SlideResult(path.name, run_key, "cached", int(existing[i]["n_tiles"]),
                                 time.perf_counter() - starts[i])
            continue
        try:
            with Slide(path, mpp_override=slides[i][1]) as slide:
                out[i] = _job(spool, path, slide, fps[i], run_key, model, tiling, slides[i][1], force, nuclei,
                              starts[i], cells)
        except Exception as exc:  # noqa: BLE001 - per slide
            out[i] = _failed(path, exc, starts[i], run_key)
    return out
