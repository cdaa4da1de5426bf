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
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import StoreError
from core.engine.modelhub import LoadedModel
from core.wsi.slide import Slide, TilingParams, file_fingerprint, tile_grid
from core.engine.spool import CHUNK_TILES, Spool, spool_dir
from core.store.db import Store

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


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


@dataclass
class SlideJob:
    """The planned work for one slide that is not in the store yet."""

    name: str
    path: Path
    mpp_override: float | None
    record: dict  # RunRecord fields except seconds (plus the model), for the spool marker
    xy: np.ndarray
    tissue: np.ndarray
    size_level0: int
    pending: set[int] = field(default_factory=set)  # chunk numbers still to compute
    started: float | None = None

    @property
    def run_key(self) -> str:
        return self.record["run_key"]

    @property
    def n_chunks(self) -> int:
        return -(-len(self.xy) // CHUNK_TILES)

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * CHUNK_TILES, min((chunk + 1) * CHUNK_TILES, len(self.xy)))


def fingerprint(store: Store, path: Path) -> str:
    """Content fingerprint, memoised in the store by (path, size, mtime) to avoid re-hashing."""
    path = Path(path).resolve()
    st = path.stat()
    cached = store.cached_fingerprint(str(path), st.st_size, st.st_mtime_ns)
    if cached:
        return cached
    fp = file_fingerprint(path)
    if not store.read_only:
        store.remember_fingerprint(str(path), st.st_size, st.st_mtime_ns, fp)
    return fp


def run_key_for(slide_fp: str, model_key: str, tiling: TilingParams, slide_mpp: float, *,
                nuclei: bool = False) -> str:
    """The cache key; the slide's µm/px is part of it, since fixing a wrong µm/px changes the tiles.
    A run with nucleus counts is a different run (the keys of runs without them are unchanged)."""
    payload = f"{slide_fp}|{model_key}|{tiling.key()}|{slide_mpp:.6g}" + ("|nuclei" if nuclei else "")
    payload = payload.encode()
    return hashlib.blake2b(payload, digest_size=12).hexdigest()


def resolve_device(device: str = "auto"):
    """``auto`` → CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no GPU is visible; use --device cpu or auto.")
    return torch.device(device)


def auto_batch_size(runtime, device, input_px: int) -> int:
    """CPU: 64 (throughput is flat beyond it). CUDA: the largest power of two ≤ 1024 whose forward
    fits in memory, found by trying it."""
    import torch

    if device.type != "cuda":
        return 64
    for size in (1024, 512, 256, 128, 64, 32):
        try:
            runtime(torch.zeros(size, input_px, input_px, 3, dtype=torch.uint8))
            return size
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return 16


# -- reading -------------------------------------------------------------------------------------
def _stream_class():
    from torch.utils.data import IterableDataset

    class TileStream(IterableDataset):
        """Tiles of the pending chunks of many slides; worker *w* of *n* reads units w, w+n, …
        (a unit is one chunk of one slide) with its own OpenSlide handles."""

        def __init__(self, units: list[tuple], out_px: int, nuclei_mpp: float | None = None):
            self.units, self.out_px, self.nuclei_mpp = units, out_px, nuclei_mpp

        def __iter__(self):
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            wid, n = (0, 1) if info is None else (info.id, info.num_workers)
            handles: OrderedDict[str, Slide] = OrderedDict()
            try:
                for job, chunk, path, mpp_override, size, idx, xy in self.units[wid::n]:
                    if path not in handles:
                        handles[path] = Slide(path, mpp_override=mpp_override)
                        if len(handles) > 4:
                            handles.popitem(last=False)[1].close()
                    slide = handles[path]
                    for i, (x, y) in zip(idx, xy):
                        tile = slide.read_region((int(x), int(y)), size, self.out_px)
                        counts = None
                        if self.nuclei_mpp:   # in the loader worker: overlapped with the model
                            from core.wsi.nuclei_classes import nucleus_counts

                            counts = nucleus_counts(tile, mpp=self.nuclei_mpp)
                        yield job, chunk, int(i), tile, counts
            finally:
                for slide in handles.values():
                    slide.close()

    return TileStream


def _collate(batch):
    import torch

    jobs, chunks, idx, tiles, counts = zip(*batch)
    nuclei = None if counts[0] is None else np.stack(counts).astype(np.int16)
    return np.array(jobs), np.array(chunks), np.array(idx), torch.from_numpy(np.stack(tiles)), nuclei


# -- the engine ----------------------------------------------------------------------------------
class Engine:
    """Runs a model over many slides' tiles into a spool. Build once, :meth:`run` many times."""

    def __init__(self, model: LoadedModel, *, device: str = "auto", batch_size: int | None = None,
                 workers: int | None = None, runtime: str = "auto"):
        from core.config import load_settings
        from models.runtime import create_runtime

        self.model = model
        self.device = resolve_device(device)
        self.input_px = int(model.card.get("input_px") or model.tiling().out_px)
        self.runtime = create_runtime(model.module, device=self.device, input_px=self.input_px, kind=runtime,
                                      version=f"{model.model_id}-{model.version}",
                                      cache_dir=load_settings().cache_dir / "onnx")
        self.batch_size = batch_size or auto_batch_size(self.runtime, self.device, self.input_px)
        self.workers = (1 if (os.cpu_count() or 1) <= 2 else min(4, os.cpu_count() - 2)) if workers is None else workers

    def run(self, jobs: list[SlideJob], spool: Spool, *, progress: Callable[[dict], None] | None = None,
            cancel: Callable[[], bool] | None = None, on_slide: Callable[[SlideJob], None] | None = None,
            nuclei: bool = False) -> set[int]:
        """Compute every pending chunk of ``jobs`` into ``spool``; returns the indices of finished jobs.

        ``nuclei``: the loader workers also segment and classify the nuclei of every tile
        (:func:`core.wsi.nuclei_classes.nucleus_counts`) while the model runs on earlier batches.

        ``progress`` gets a dict (done, total, tiles_per_s, eta_s, slide); ``cancel()`` is polled
        between batches — finished chunks stay in the spool, so a later run resumes there.
        """
        from torch.utils.data import DataLoader

        units, expected = [], {}
        for j, job in enumerate(jobs):
            for c in sorted(job.pending):
                sl = job.chunk_slice(c)
                units.append((j, c, str(job.path), job.mpp_override, job.size_level0,
                              np.arange(sl.start, sl.stop), job.xy[sl]))
                expected[(j, c)] = sl.stop - sl.start
        total = sum(expected.values())
        finished = {j for j, job in enumerate(jobs) if not job.pending}
        for j in sorted(finished):
            self._finish(jobs[j], spool, on_slide)
        if not units:
            return finished
        tiling = self.model.tiling()
        nuclei_mpp = tiling.tile_um / tiling.out_px if nuclei else None
        loader = DataLoader(_stream_class()(units, tiling.out_px, nuclei_mpp), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers > 0 else None)
        buffers: dict[tuple, list] = {}
        got: Counter = Counter()
        done, started = 0, time.perf_counter()
        for job_ids, chunk_ids, idx, tiles, counts in loader:
            if cancel is not None and cancel():
                log.info("cancelled after %d of %d tiles; finished chunks are kept", done, total)
                break
            for j in set(job_ids.tolist()):
                jobs[j].started = jobs[j].started or time.perf_counter()
            out = self.runtime(tiles)
            if counts is not None:
                out["nuclei"] = counts
            for key in sorted(set(zip(job_ids.tolist(), chunk_ids.tolist()))):
                rows = (job_ids == key[0]) & (chunk_ids == key[1])
                job = jobs[key[0]]
                buffers.setdefault(key, []).append((idx[rows], {k: v[rows] for k, v in out.items()}))
                got[key] += int(rows.sum())
                if got[key] == expected[key]:
                    self._write_chunk(job, key[1], buffers.pop(key), spool)
                    if not job.pending:
                        self._finish(job, spool, on_slide)
                        finished.add(key[0])
            done += len(tiles)
            if progress:
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress({"done": done, "total": total, "tiles_per_s": rate, "eta_s": (total - done) / rate,
                          "slide": jobs[int(job_ids[-1])].name})
        return finished

    @staticmethod
    def _write_chunk(job: SlideJob, chunk: int, parts: list, spool: Spool) -> None:
        idx = np.concatenate([p[0] for p in parts])
        order = np.argsort(idx)
        outputs = {k: np.concatenate([p[1][k] for p in parts])[order] for k in parts[0][1]}
        idx = idx[order]
        spool.write_chunk(job.run_key, chunk, idx, job.xy[idx], job.tissue[idx], outputs)
        job.pending.discard(chunk)

    @staticmethod
    def _finish(job: SlideJob, spool: Spool, on_slide) -> None:
        seconds = time.perf_counter() - (job.started or time.perf_counter())
        spool.finish(job.run_key, {**job.record, "seconds": seconds}, job.n_chunks)
        log.info("%s: %d tiles done (%.1f s)", job.name, len(job.xy), seconds)
        if on_slide:
            on_slide(job)


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
    record = {"run_key": run_key, "slide_fp": slide_fp, "model_key": model.key, "tiling_key": tiling.key(),
              "tiling": {**asdict(tiling), **({"nuclei": True} if nuclei else {})}, "slide_name": path.name, "slide_path": str(path.resolve()),
              "tile_size": grid.size_level0, "width": width, "height": height, "mpp": mpp, "device": "",
              "model": {"model_id": model.model_id, "version": model.version, "genes": model.genes,
                        "cell_types": model.cell_types, "card": model.card}}
    job = SlideJob(path.name, path, mpp_override, record, grid.xy, grid.tissue, grid.size_level0)
    job.pending = set(range(job.n_chunks)) - spool.done_chunks(run_key)
    if len(job.pending) < job.n_chunks:
        log.info("%s: resuming, %d of %d chunks already spooled", path.name, job.n_chunks - len(job.pending), job.n_chunks)
    return job


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
        import contextlib

        if self.store is not None:
            return contextlib.nullcontext(self.store)
        try:
            return Store(self.path, wait_s=wait_s)
        except StoreError as exc:
            if "busy" in str(exc) and or_read_only and self.path.exists():
                return Store(self.path, read_only=True)
            raise

    def ingest(self, wait_s: float = 0.0) -> int:
        """Ingest complete spooled runs; returns how many (0 when the lock stayed busy)."""
        if not self.spool.complete_runs():
            return 0
        try:
            with self.open(wait_s) as store:
                return len(store.ingest(self.spool))
        except StoreError as exc:
            if "busy" not in str(exc):
                raise
            log.info("store busy: %d finished run(s) wait in the spool", len(self.spool.complete_runs()))
            return 0

    def refresh_index(self, model_key: str) -> None:
        """Bring the model's similar-tiles index up to date (:mod:`core.store.tile_index`). The store is
        opened read-only, and only while vectors are read (not while the index is trained). A
        failure is logged, not raised: queries search what the index lacks exactly."""
        from core.store.tile_index import refresh

        try:
            refresh(self.store if self.store is not None else self.path, model_key)
        except Exception as exc:  # noqa: BLE001 - the predictions are safe; the index can be rebuilt
            log.warning("the similar-tiles index was not updated (%s); `python -m core.cli index` rebuilds it", exc)


def predict_slides(store: Store | str | Path, slides: list[tuple[str | Path, float | None]], model: LoadedModel, *,
                   tiling: TilingParams | None = None, device: str = "auto", batch_size: int | None = None,
                   workers: int | None = None, runtime: str = "auto", force: bool = False,
                   progress: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None,
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
            st.ingest(access.spool)  # runs finished by an earlier, interrupted job
        planned = [plan_slide(st, access.spool, path, model, tiling, mpp_override=mpp, force=force, nuclei=nuclei)
                   for path, mpp in slides]
    jobs = [p for p in planned if isinstance(p, SlideJob)]
    finished: set[int] = set()
    if jobs:
        engine = engine or Engine(model, device=device, batch_size=batch_size, workers=workers, runtime=runtime)
        for job in jobs:
            job.record["device"] = f"{engine.device}/{engine.runtime.name}"
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


def predict_slide(path: str | Path, model: LoadedModel, store: Store | str | Path, *, device: str = "auto",
                  batch_size: int | None = None, workers: int | None = 1, tiling: TilingParams | None = None,
                  mpp_override: float | None = None, force: bool = False, runtime: str = "auto",
                  progress: ProgressFn | None = None) -> SlideResult:
    """Predict every tissue tile of one slide into the store, or serve it from the cache."""
    tick = (lambda p: progress(p["done"], p["total"])) if progress else None
    [result] = predict_slides(store, [(path, mpp_override)], model, tiling=tiling, device=device,
                              batch_size=batch_size, workers=workers, runtime=runtime, force=force, progress=tick)
    return result


def predict_cohort(store: Store | str | Path, cohort: str, model: LoadedModel, *, device: str = "auto",
                   batch_size: int | None = None, workers: int | None = None, force: bool = False,
                   min_tissue: float | None = None, runtime: str = "auto",
                   progress: Callable[[dict], None] | None = None, cancel: Callable[[], bool] | None = None,
                   ingest_wait_s: float = 30.0, nuclei: bool = False) -> list[SlideResult]:
    """Predict every usable slide of a cohort (status ``ok``), honouring µm/px overrides."""
    access = StoreAccess(store)
    with access.open(wait_s=5.0, or_read_only=True) as st:
        slides = st.cohort_slides(cohort)
    usable = slides[slides["status"] == "ok"]
    tiling = model.tiling(**({"min_tissue": min_tissue} if min_tissue is not None else {}))
    pairs = [(row.slide_path, float(row.mpp) if row.mpp_source == "override" else None)
             for row in usable.itertuples(index=False)]
    return predict_slides(store, pairs, model, tiling=tiling, device=device, batch_size=batch_size,
                          workers=workers, runtime=runtime, force=force, progress=progress, cancel=cancel,
                          ingest_wait_s=ingest_wait_s, nuclei=nuclei)
