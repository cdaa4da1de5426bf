"""Planning: which slides need model work, and what each one's run is.

A run is keyed by (slide content fingerprint, model id + version, tiling, slide µm/px); a run
that is complete in the store is served from it and no model work is done.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.engine.modelhub import LoadedModel
from core.engine.spool import CHUNK_TILES, Spool
from core.store.db import RunRecord, Store
from core.vocab import SlideStatus
from core.wsi.fingerprint import fingerprint
from core.wsi.slide import Slide
from core.wsi.tiling import TilingParams, tile_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideResult:
    slide_name: str
    run_key: str
    status: str  # "cached", "computed" or "cancelled"
    n_tiles: int
    seconds: float

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
                nuclei: bool = False) -> str:
    """The cache key; the slide's µm/px is part of it, since fixing a wrong µm/px changes the tiles.
    A run with nucleus counts is a different run (the keys of runs without them are unchanged)."""
    payload = f"{slide_fp}|{model_key}|{tiling.key()}|{slide_mpp:.6g}" + ("|nuclei" if nuclei else "")
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def usable_slides(store: Store, cohort: str) -> list[tuple[str, float | None]]:
    """The cohort's slides that can be predicted (status ok), as (path, µm/px override or None):
    the override is passed only where the user set one; otherwise the slide's metadata is read."""
    slides = store.cohort_slides(cohort)
    usable = slides[slides["status"] == SlideStatus.OK]
    return [(row.slide_path, float(row.mpp) if row.mpp_source == "override" else None)
            for row in usable.itertuples(index=False)]


def plan_slide(store: Store, spool: Spool, path: str | Path, model: LoadedModel, tiling: TilingParams, *,
               mpp_override: float | None = None, force: bool = False, nuclei: bool = False) -> SlideJob | SlideResult:
    """A :class:`SlideResult` (cached) when the run is in the store, else the :class:`SlideJob`."""
    path = Path(path)
    started = time.perf_counter()
    slide_fp = fingerprint(store, path)
    with Slide(path, mpp_override=mpp_override) as slide:
        mpp = slide.mpp
        run_key = run_key_for(slide_fp, model.key, tiling, mpp, nuclei=nuclei)
        existing = store.find_run(run_key)
        if existing is not None and not force:
            log.info("%s: cached (run %s, %d tiles), no model work", path.name, run_key, existing["n_tiles"])
            return SlideResult(path.name, run_key, "cached", int(existing["n_tiles"]), time.perf_counter() - started)
        grid = tile_grid(slide, tiling)
        width, height = slide.dimensions
    if force:
        spool.remove(run_key)
    run = RunRecord(run_key=run_key, slide_fp=slide_fp, model_key=model.key, tiling_key=tiling.key(),
                    tiling={**asdict(tiling), **({"nuclei": True} if nuclei else {})}, slide_name=path.name,
                    slide_path=str(path.resolve()), tile_size=grid.size_level0, width=width, height=height,
                    mpp=mpp, device="", seconds=0.0)
    job = SlideJob(path, mpp_override, run, grid.xy, grid.tissue)
    job.pending = set(range(job.n_chunks)) - spool.done_chunks(run_key)
    if len(job.pending) < job.n_chunks:
        log.info("%s: resuming, %d of %d chunks already spooled", path.name, job.n_chunks - len(job.pending), job.n_chunks)
    return job
