"""The inference engine: tile dataset, loader workers, device, batching and the run cache.

A run is keyed by (slide content fingerprint, model id + version, tiling parameters); a run that
is already complete in the store is served from it and no model work is done.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.modelhub import LoadedModel
from core.slides import Slide, TilingParams, file_fingerprint, tile_grid
from core.store import RunRecord, Store

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SlideResult:
    slide_name: str
    run_key: str
    status: str  # "cached" or "computed"
    n_tiles: int
    seconds: float

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


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


def run_key_for(slide_fp: str, model_key: str, tiling: TilingParams, slide_mpp: float) -> str:
    """The cache key; the slide's µm/px is part of it, since fixing a wrong µm/px changes the tiles."""
    payload = f"{slide_fp}|{model_key}|{tiling.key()}|{slide_mpp:.6g}".encode()
    return hashlib.blake2b(payload, digest_size=12).hexdigest()


def resolve_device(device: str = "auto"):
    """``auto`` → CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no GPU is visible; use --device cpu or auto.")
    return torch.device(device)


def _autocast(device):
    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class TileDataset:
    """Tiles of one slide as uint8 HWC arrays; each loader worker opens its own OpenSlide handle."""

    def __init__(self, path: Path, xy: np.ndarray, size_level0: int, out_px: int, mpp_override: float | None):
        self.path, self.xy, self.size, self.out_px = Path(path), xy, size_level0, out_px
        self.mpp_override = mpp_override
        self._slide: Slide | None = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.xy)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = Slide(self.path, mpp_override=self.mpp_override), os.getpid()
        return self._slide.read_region(tuple(self.xy[i]), self.size, self.out_px)


def _collate(batch):
    import torch

    return torch.from_numpy(np.stack(batch))


def run_model(model: LoadedModel, dataset: TileDataset, *, device, batch_size: int, workers: int,
              progress: ProgressFn | None = None) -> dict[str, np.ndarray]:
    """Run the model over every tile; returns expression, embedding and composition arrays."""
    import torch
    from torch.utils.data import DataLoader

    module = model.module.to(device).to(memory_format=torch.channels_last).eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers > 0 else None)
    outs: dict[str, list] = {"expression": [], "embedding": [], "composition": []}
    done = 0
    with torch.inference_mode(), _autocast(device):
        for batch in loader:
            result = module(batch.to(device, non_blocking=True))
            for name in outs:
                outs[name].append(result[name].float().cpu().numpy())
            done += len(batch)
            if progress:
                progress(done, len(dataset))
    return {k: np.concatenate(v) for k, v in outs.items()}


def predict_slide(path: str | Path, model: LoadedModel, store: Store, *, device: str = "auto",
                  batch_size: int = 64, workers: int = 1, tiling: TilingParams | None = None,
                  mpp_override: float | None = None, force: bool = False,
                  progress: ProgressFn | None = None) -> SlideResult:
    """Predict every tissue tile of a slide into the store, or serve it from the cache."""
    path = Path(path)
    tiling = tiling or model.tiling()
    started = time.perf_counter()
    slide_fp = fingerprint(store, path)
    with Slide(path, mpp_override=mpp_override) as slide:
        mpp = slide.mpp
        run_key = run_key_for(slide_fp, model.key, tiling, mpp)
        existing = store.find_run(run_key)
        if existing is not None and not force:
            log.info("%s: cached (run %s, %d tiles), no model work", path.name, run_key, existing["n_tiles"])
            return SlideResult(path.name, run_key, "cached", int(existing["n_tiles"]),
                               time.perf_counter() - started)
        grid = tile_grid(slide, tiling)
        width, height = slide.dimensions
    dev = resolve_device(device)
    dataset = TileDataset(path, grid.xy, grid.size_level0, tiling.out_px, mpp_override)
    out = run_model(model, dataset, device=dev, batch_size=batch_size, workers=workers, progress=progress)
    store.register_model(model.model_id, model.version, model.genes, model.cell_types, model.card)
    seconds = time.perf_counter() - started
    record = RunRecord(run_key=run_key, slide_fp=slide_fp, model_key=model.key, tiling_key=tiling.key(),
                       tiling=asdict(tiling), slide_name=path.name, slide_path=str(path.resolve()),
                       tile_size=grid.size_level0, width=width, height=height, mpp=mpp,
                       device=str(dev), seconds=seconds)
    store.write_run(record, grid.xy, grid.tissue, out["expression"], out["embedding"], out["composition"])
    log.info("%s: %d tiles in %.1f s (%.1f tiles/s)", path.name, len(grid), seconds, len(grid) / seconds)
    return SlideResult(path.name, run_key, "computed", len(grid), seconds)


def predict_cohort(store: Store, cohort: str, model: LoadedModel, *, device: str = "auto", batch_size: int = 64,
                   workers: int = 1, force: bool = False, min_tissue: float | None = None,
                   progress: Callable[[int, int, SlideResult], None] | None = None) -> list[SlideResult]:
    """Predict every usable slide of a cohort (status ``ok``), honouring µm/px overrides."""
    slides = store.cohort_slides(cohort)
    usable = slides[slides["status"] == "ok"]
    tiling = model.tiling(**({"min_tissue": min_tissue} if min_tissue is not None else {}))
    results = []
    for i, row in enumerate(usable.itertuples(index=False)):
        override = float(row.mpp) if row.mpp_source == "override" else None
        result = predict_slide(row.slide_path, model, store, device=device, batch_size=batch_size,
                               workers=workers, tiling=tiling, mpp_override=override, force=force)
        results.append(result)
        if progress:
            progress(i + 1, len(usable), result)
    return results
