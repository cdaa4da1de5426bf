"""The engine loop: loader workers read tiles of many slides, the runtime runs the model, finished
chunks go to the spool (see :mod:`core.engine.spool` for why the engine never holds the store's
write lock while it computes, and how it resumes).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import asdict
from typing import Callable

import numpy as np

from core.engine.modelhub import LoadedModel
from core.engine.plan import Progress, SlideJob
from core.engine.spool import Spool
from core.wsi.slide import Slide

log = logging.getLogger(__name__)


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

        def __init__(self, units: list[tuple], out_px: int, nuclei_mpp: float | None = None,
                     cells: tuple[float, float] | None = None):
            self.units, self.out_px, self.nuclei_mpp = units, out_px, nuclei_mpp
            self.cells = cells    # (tile µm, µm/px for the nuclei) of a cells run

        def __iter__(self):
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            wid, n = (0, 1) if info is None else (info.id, info.num_workers)
            handles: OrderedDict[str, Slide] = OrderedDict()
            broken: set[str] = set()    # slides that failed here: their other units are skipped
            try:
                for job, chunk, path, mpp_override, size, idx, xy in self.units[wid::n]:
                    if path in broken:
                        continue
                    try:
                        if path not in handles:
                            handles[path] = Slide(path, mpp_override=mpp_override)
                            if len(handles) > 4:
                                handles.popitem(last=False)[1].close()
                        slide = handles[path]
                        for i, (x, y) in zip(idx, xy):
                            tile = slide.read_region((int(x), int(y)), size, self.out_px)
                            counts, cells = None, None
                            if self.cells:        # in the loader worker: overlapped with the model
                                cells = _tile_cells(slide, (int(x), int(y)), size, tile, self.out_px, *self.cells)
                                from core.wsi.cells import class_counts

                                counts = class_counts(cells)
                            elif self.nuclei_mpp:
                                from core.wsi.nuclei_classes import nucleus_counts

                                counts = nucleus_counts(tile, mpp=self.nuclei_mpp)
                            yield job, chunk, int(i), tile, counts, cells
                    except Exception as exc:  # noqa: BLE001 - this slide fails, the others go on
                        broken.add(path)
                        old = handles.pop(path, None)
                        if old is not None:
                            try:
                                old.close()
                            except Exception:  # noqa: BLE001
                                pass
                        # a failure marker: no tile, the message where the counts go
                        yield job, chunk, -1, None, f"{type(exc).__name__}: {exc}", None
                        continue
            finally:
                for slide in handles.values():
                    slide.close()

    return TileStream


def _tile_cells(slide: Slide, xy: tuple[int, int], size: int, tile: np.ndarray, out_px: int, tile_um: float,
                cell_mpp: float) -> np.ndarray:
    """The cell records of one tile, segmented at ``cell_mpp`` (a second, sharper read when the
    model's tile is coarser); centroids in level-0 px from the tile's corner."""
    from core.wsi.cells import detect_cells

    px = int(round(tile_um / cell_mpp))
    patch = tile if px <= out_px else slide.read_region(xy, size, px)
    px = patch.shape[1]
    return detect_cells(patch, mpp=tile_um / px, scale=size / px)


def _collate(batch):
    """Tiles into a batch; failure markers (tile ``None``) come out apart as (job, message) pairs.
    The cells of a cells run travel as an object array, one records array per tile."""
    import torch

    failures = [(b[0], b[4]) for b in batch if b[3] is None]
    batch = [b for b in batch if b[3] is not None]
    if not batch:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, None, None, None, failures
    jobs, chunks, idx, tiles, counts, cells = zip(*batch)
    nuclei = None if counts[0] is None else np.stack(counts).astype(np.int16)
    records = None
    if cells[0] is not None:
        records = np.empty(len(cells), dtype=object)
        records[:] = list(cells)
    return (np.array(jobs), np.array(chunks), np.array(idx), torch.from_numpy(np.stack(tiles)), nuclei, records,
            failures)


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

    def run(self, jobs: list[SlideJob], spool: Spool, *, progress: Callable[[Progress], None] | None = None,
            cancel: Callable[[], bool] | None = None, on_slide: Callable[[SlideJob], None] | None = None,
            nuclei: bool = False, failed: dict[int, str] | None = None, cells: bool = False) -> set[int]:
        """Compute every pending chunk of ``jobs`` into ``spool``; returns the indices of finished jobs.

        A slide that cannot be read any more (moved, deleted, damaged after planning) stops only
        itself: its index and the reason go to ``failed`` (its finished chunks stay in the spool),
        and the other slides go on.

        ``nuclei``: the loader workers also segment and classify the nuclei of every tile
        (:func:`core.wsi.nuclei_classes.nucleus_counts`) while the model runs on earlier batches.

        ``cells``: the workers find every nucleus as a cell record (:mod:`core.wsi.cells`, at
        :data:`core.wsi.cells.CELL_MPP`); each finished chunk's cells are typed and refined against
        the model's reference profiles (:func:`core.analysis.cells.chunk_cells`) before it is spooled.

        ``progress`` gets a :class:`Progress` after every batch; ``cancel()`` is polled
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
        cell_opts = None
        if cells:
            from core.wsi.cells import CELL_MPP

            cell_opts = (tiling.tile_um, min(CELL_MPP, tiling.mpp))
            self._cell_setup()
        loader = DataLoader(_stream_class()(units, tiling.out_px, nuclei_mpp, cell_opts), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers > 0 else None)
        buffers: dict[tuple, list] = {}
        got: Counter = Counter()
        done, started = 0, time.perf_counter()
        failed = {} if failed is None else failed
        for job_ids, chunk_ids, idx, tiles, counts, records, failures in loader:
            if cancel is not None and cancel():
                log.info("cancelled after %d of %d tiles; finished chunks are kept", done, total)
                break
            for j, message in failures:
                j = int(j)
                if j not in failed and j not in finished:
                    failed[j] = message
                    log.warning("%s: failed while its tiles were read (%s); the other slides go on",
                                jobs[j].name, message)
                    for key in [k for k in buffers if k[0] == j]:
                        buffers.pop(key)
                    total -= sum(expected[k] - got[k] for k in expected if k[0] == j)
                    jobs[j].release()
            if tiles is None:
                continue
            keep = np.array([int(j) not in failed for j in job_ids], dtype=bool)
            if not keep.all():
                import torch

                job_ids, chunk_ids, idx = job_ids[keep], chunk_ids[keep], idx[keep]
                tiles = tiles[torch.from_numpy(keep)]
                counts = None if counts is None else counts[keep]
                records = None if records is None else records[keep]
                if not len(idx):
                    continue
            for j in set(job_ids.tolist()):
                jobs[j].started = jobs[j].started or time.perf_counter()
            out = self.runtime(tiles)
            if counts is not None:
                out["nuclei"] = counts
            if records is not None:
                out["cells"] = records
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
                progress(Progress(done, total, rate, (total - done) / rate, jobs[int(job_ids[-1])].name))
        return finished

    def _cell_setup(self) -> None:
        """The reference profiles and the learned typer (if the model ships one) for cells."""
        if getattr(self, "_profiles", None) is not None:
            return
        head = getattr(self.model.module, "head", None)
        profiles = getattr(head, "profiles", None)
        if profiles is None:
            raise RuntimeError(f"model {self.model.key} has no reference profiles: cells need a reference-informed "
                               "head (composition × profiles)")
        self._profiles = profiles.detach().cpu().numpy().astype(np.float64)
        from core.analysis.cell_typer import load_typer

        self._typer = load_typer(self.model)

    def _write_chunk(self, job: SlideJob, chunk: int, parts: list, spool: Spool) -> None:
        idx = np.concatenate([p[0] for p in parts])
        order = np.argsort(idx)
        outputs = {k: np.concatenate([p[1][k] for p in parts])[order] for k in parts[0][1]}
        idx = idx[order]
        if "cells" in outputs:
            outputs.update(self._cells_of_chunk(outputs))
        spool.write_chunk(job.run_key, chunk, idx, job.xy[idx], job.tissue[idx], outputs)
        job.pending.discard(chunk)

    def _cells_of_chunk(self, outputs: dict) -> dict:
        """Typed and refined cells of one chunk: per tile, the records plus type and confidence."""
        from core.analysis.cells import chunk_cells

        records = list(outputs["cells"])
        typed = chunk_cells(records, outputs["composition"], outputs["expression"], self._profiles,
                            self.model.cell_types, typer=self._typer)
        rows, start = [], 0
        for rec in records:
            n = len(rec)
            extra = np.stack([typed["cell_type"][start:start + n].astype(np.float32),
                              typed["confidence"][start:start + n]], axis=1) if n else np.zeros((0, 2), np.float32)
            rows.append(np.hstack([rec, extra]).astype(np.float32))
            start += n
        return {"cells": rows, "cell_w": typed["w"], "cell_z": typed["z"]}

    def _finish(self, job: SlideJob, spool: Spool, on_slide) -> None:
        seconds = time.perf_counter() - (job.started or time.perf_counter())
        m = self.model
        marker = {**asdict(job.run), "device": job.run.device or f"{self.device}/{self.runtime.name}",
                  "seconds": seconds, "model": {"model_id": m.model_id, "version": m.version, "genes": m.genes,
                                                "cell_types": m.cell_types, "card": m.card}}
        if job.run.tiling.get("cells"):
            from core.wsi.cells import CELL_FIELDS

            self._cell_setup()
            marker["cell_layout"] = {"fields": [*CELL_FIELDS, "cell_type", "confidence"],
                                     "typer": getattr(self._typer, "name", "posterior"),
                                     "profiles": self._profiles.tolist()}
        spool.finish(job.run_key, marker, job.n_chunks)
        job.release()   # the run is complete: an ingest may take it now
        log.info("%s: %d tiles done (%.1f s)", job.name, len(job.xy), seconds)
        if on_slide:
            on_slide(job)
