"""Tiler throughput: the project's pyramid reader vs a naive level-0 loop, same slide, same run.

    python -m benchmarks.tiler [--size W H] [--mpp 0.25] [--max-tiles N] [--workers 2]

Builds (once; cached by size/µm/px/seed) a large synthetic 40× slide: a pyramidal JPEG TIFF
in the layout of ``core.synth.tiff.write_pyramidal_tiff`` (every level a full IFD, resolution
in px/cm so OpenSlide reports µm/px), streamed tile by tile so memory stays bounded (a
1024² H&E-like texture and a coarse tissue map, never the whole level). Then, on the same N
tissue tiles of 112 µm at 1.0 µm/px, sampled evenly over the grid, it times:

  naive   ``OpenSlide.read_region`` at level 0 of the full 448 px tile, RGB, PIL resize, one by one
  tiler   ``core.wsi.slide.Slide.read_region`` (best pyramid level, then resize), 1 process
  tiler   the same in a ``multiprocessing`` pool, each worker holding its own OpenSlide handle

and the tissue step over the whole slide: thumbnail at 8 µm/px, ``core.wsi.tissue.detect_tissue``,
``tile_tissue_fraction`` over the full grid, each timed, then ``core.wsi.tiling.tile_grid`` end to end.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.tiler")

TILE = 256  # TIFF tile side, px
MAP_SHIFT = 6  # the coarse tissue map has one cell per 2**6 = 64 level-0 px (16 µm at 0.25)
H_OD = np.array([0.65, 0.70, 0.29])  # haematoxylin OD vector (Ruifrok & Johnston 2001)
E_OD = np.array([0.07, 0.99, 0.11])  # eosin
GLASS = np.array([243.0, 241.0, 244.0])
VERSION = 1  # bump when the generator changes: the cached slide is then rebuilt


# --- the synthetic slide -----------------------------------------------------------------


def _texture(rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    """Periodic H&E-like texture (uint8, size²×3): eosin stroma with fibres, haematoxylin nuclei
    of ~6–8 µm at 0.25 µm/px, coloured by Beer–Lambert absorption."""
    from scipy import ndimage

    stroma = ndimage.gaussian_filter(rng.standard_normal((size, size)), 24, mode="wrap")
    fibres = ndimage.gaussian_filter(rng.standard_normal((size, size)), (1.5, 9), mode="wrap")
    eosin = 0.45 + 0.12 * stroma / stroma.std() + 0.12 * fibres / fibres.std()
    haem = np.zeros((size, size))
    yy, xx = np.mgrid[-16:17, -16:17]
    for cy, cx, r in zip(rng.integers(0, size, 260), rng.integers(0, size, 260), rng.uniform(10, 16, 260)):
        disk = (yy ** 2 + xx ** 2 < r * r).astype(float)
        rows, cols = (cy + np.arange(-16, 17)) % size, (cx + np.arange(-16, 17)) % size
        haem[np.ix_(rows, cols)] = np.maximum(haem[np.ix_(rows, cols)], disk * rng.uniform(0.6, 1.1))
    haem = ndimage.gaussian_filter(haem, 1.5, mode="wrap") + 0.08
    od = haem[..., None] * H_OD + np.clip(eosin, 0.05, None)[..., None] * E_OD * 0.6
    rgb = 255.0 * 10 ** (-od) + rng.normal(0, 3, (size, size, 3))
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _tissue_map(rng: np.random.Generator, width: int, height: int, coverage: float) -> np.ndarray:
    """Coarse boolean tissue map (one cell per 64 level-0 px): smooth blobs over ``coverage``."""
    from scipy import ndimage

    shape = (-(-height >> MAP_SHIFT), -(-width >> MAP_SHIFT))
    field = ndimage.gaussian_filter(rng.standard_normal(shape), max(shape) / 14, mode="nearest")
    return field > np.quantile(field, 1 - coverage)


def _level_tiles(level: int, shape: tuple[int, int], texture: np.ndarray, glass: np.ndarray, tissue_map):
    """Yield the level's 256² tiles row-major: texture where the map says tissue, else glass."""
    from core.synth.fields import downsample_area

    f = 2 ** level
    tex = texture if f == 1 else np.clip(downsample_area(texture, f) + 0.5, 0, 255).astype(np.uint8)
    period = tex.shape[0]
    reps = -(-(TILE + period) // period)
    tex, gl = np.tile(tex, (reps, reps, 1)), np.tile(glass, (2, 2, 1))
    h, w = shape
    for y0 in range(0, h, TILE):
        rows = np.minimum(((y0 + np.arange(TILE)) * f) >> MAP_SHIFT, tissue_map.shape[0] - 1)
        for x0 in range(0, w, TILE):
            cols = np.minimum(((x0 + np.arange(TILE)) * f) >> MAP_SHIFT, tissue_map.shape[1] - 1)
            inside = tissue_map[np.ix_(rows, cols)]
            ty, tx = y0 % period, x0 % period
            tile = np.where(inside[..., None], tex[ty:ty + TILE, tx:tx + TILE], gl[:TILE, :TILE])
            yield np.ascontiguousarray(tile)


def build_slide(path: Path, width: int, height: int, mpp: float, *, coverage: float = 0.6,
                seed: int = 0, jpeg_quality: int = 90) -> None:
    """Write the synthetic ``width × height`` slide at ``mpp`` µm/px, level by level, to ``path``."""
    import os

    import tifffile

    rng = np.random.default_rng(seed)
    texture = _texture(rng)
    glass = np.clip(GLASS + rng.normal(0, 1.5, (TILE, TILE, 3)) + 0.5, 0, 255).astype(np.uint8)
    tissue_map = _tissue_map(rng, width, height, coverage)
    tmp = path.with_name(f".{path.name}.partial")
    shape, level = (height, width), 0
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        while True:
            res = 1e4 / (mpp * 2 ** level)  # pixels per centimetre
            tw.write(_level_tiles(level, shape, texture, glass, tissue_map), shape=shape + (3,), dtype=np.uint8,
                     tile=(TILE, TILE), compression="jpeg", compressionargs={"level": jpeg_quality},
                     photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if level == 0 else 1, metadata=None)
            if max(shape) < 512 or min(shape) <= 1:
                break
            shape, level = (-(-shape[0] // 2), -(-shape[1] // 2)), level + 1
    os.replace(tmp, path)


# --- timed readers -----------------------------------------------------------------------


def _naive(path: Path, xy: np.ndarray, size: int, out_px: int) -> tuple[float, list[np.ndarray]]:
    """Level-0 read of the full tile, RGBA → RGB, PIL resize; one tile at a time."""
    import openslide
    from PIL import Image

    tiles = []
    with openslide.OpenSlide(str(path)) as osr:
        t = time.perf_counter()
        for x, y in xy:
            region = osr.read_region((int(x), int(y)), 0, (size, size)).convert("RGB")
            tiles.append(np.asarray(region.resize((out_px, out_px), Image.Resampling.BILINEAR)))
        return time.perf_counter() - t, tiles


def _tiler(path: Path, xy: np.ndarray, size: int, out_px: int) -> tuple[float, list[np.ndarray]]:
    from core.wsi.slide import Slide

    with Slide(path) as slide:
        _ = slide.level_downsamples  # open the handle outside the timed loop
        t = time.perf_counter()
        tiles = [slide.read_region((int(x), int(y)), size, out_px) for x, y in xy]
        return time.perf_counter() - t, tiles


_WORKER: dict = {}


def _worker_init(path: str, size: int, out_px: int) -> None:
    from core.wsi.slide import Slide

    _WORKER.update(slide=Slide(path), size=size, out_px=out_px)
    _ = _WORKER["slide"].level_downsamples


def _worker_read(xy) -> np.ndarray:
    return _WORKER["slide"].read_region((int(xy[0]), int(xy[1])), _WORKER["size"], _WORKER["out_px"])


def _worker_read_only(xy) -> int:
    """The same read, but only a checksum goes back: isolates the cost of shipping tiles."""
    return int(_worker_read(xy)[::16, ::16].sum())


def _tiler_pool(path: Path, xy: np.ndarray, size: int, out_px: int, workers: int):
    """Returns (pool start-up s, read s, tiles, read-only s): each worker opens its own handle."""
    t0 = time.perf_counter()
    # one contiguous block per worker: neighbouring tiles share pyramid JPEG tiles, and a
    # handle decodes each only once (its cache); interleaved chunks would decode them twice
    chunk = -(-len(xy) // workers)
    with mp.get_context("fork").Pool(workers, _worker_init, (str(path), size, out_px)) as pool:
        pool.map(_worker_read, [xy[0]] * workers, chunksize=1)  # make sure every worker is up
        t1 = time.perf_counter()
        tiles = pool.map(_worker_read, list(map(tuple, xy)), chunksize=chunk)
        t2 = time.perf_counter()
        pool.map(_worker_read_only, list(map(tuple, xy)), chunksize=chunk)
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, tiles, t3 - t2


# --- tissue step -------------------------------------------------------------------------


def _grid_xy(width: int, height: int, size: int) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def tissue_step(path: Path, *, tile_um: float = 112.0, mask_mpp: float = 8.0, min_tissue: float = 0.3):
    """Time thumbnail → detect_tissue → tile fractions over the full grid; returns (timings, xy, size)."""
    from core.wsi.slide import Slide
    from core.wsi.tiling import TilingParams, tile_grid
    from core.wsi.tissue import detect_tissue, tile_tissue_fraction

    times = {}
    with Slide(path) as slide:
        w, h = slide.dimensions
        size = int(round(tile_um / slide.mpp))
        t = time.perf_counter()
        thumb = np.asarray(slide.thumbnail(int(max(w, h) / max(mask_mpp / slide.mpp, 1.0))))
        times["thumbnail"] = time.perf_counter() - t
        scale = w / thumb.shape[1]
        t = time.perf_counter()
        tm = detect_tissue(thumb, mpp=slide.mpp * scale)
        times["detect_tissue"] = time.perf_counter() - t
        t = time.perf_counter()
        xy = _grid_xy(w, h, size)
        frac = tile_tissue_fraction(tm.mask, scale, xy, size)
        times["tile_tissue_fraction"] = time.perf_counter() - t
        t = time.perf_counter()
        current = tile_grid(slide, TilingParams(tile_um=tile_um, mask_mpp=mask_mpp, min_tissue=min_tissue))
        times["slides.tile_grid (all of it, end to end)"] = time.perf_counter() - t
    keep = frac >= min_tissue
    info = dict(thumb=thumb.shape[:2], fraction=tm.fraction, n_grid=len(xy), n_tissue=int(keep.sum()),
                n_current=len(current))
    return times, info, xy[keep], size


def _sample(xy: np.ndarray, n: int) -> np.ndarray:
    """``n`` tiles spread evenly over the (row-major) grid; all of them if ``n`` ≥ len."""
    if n <= 0 or n >= len(xy):
        return xy
    return xy[np.unique(np.linspace(0, len(xy) - 1, n).round().astype(int))]


# --- report ------------------------------------------------------------------------------


def _load() -> str:
    import os

    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def _slide_path(root: Path, width: int, height: int, mpp: float, seed: int) -> Path:
    return root / f"bench-{width}x{height}-{mpp:g}mpp-s{seed}-v{VERSION}.tiff"


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=2, default=(20000, 15000), metavar=("W", "H"),
                    help="slide width height, level-0 px")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (0.25 = a 40× scan)")
    ap.add_argument("--max-tiles", type=int, default=0,
                    help="tiles timed per method, spread evenly over the grid (0 = every tissue tile)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench",
                    help="where the synthetic slide is cached")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _ensure_slide(args) -> tuple[Path, str]:
    """The cached synthetic slide for these arguments, built if missing; (path, how)."""
    width, height = args.size
    args.dir.mkdir(parents=True, exist_ok=True)
    path = _slide_path(args.dir, width, height, args.mpp, args.seed)
    if path.exists():
        return path, "reused from cache"
    log.info("building %d × %d px slide at %.3g µm/px in %s …", width, height, args.mpp, path)
    t = time.perf_counter()
    build_slide(path, width, height, args.mpp, seed=args.seed)
    return path, f"built in {time.perf_counter() - t:.1f} s"


def _time_readers(path: Path, xy: np.ndarray, size: int, out_px: int, workers: int, repeat: int) -> dict:
    """Interleaved rounds, fresh handles (so fresh OpenSlide caches) every time."""
    runs = {"naive": [], "tiler": [], "pool": [], "pool_ro": [], "start": []}
    for _ in range(repeat):
        secs, naive_tiles = _naive(path, xy, size, out_px)
        runs["naive"].append(secs)
        secs, tiler_tiles = _tiler(path, xy, size, out_px)
        runs["tiler"].append(secs)
        start, secs, pool_tiles, secs_ro = _tiler_pool(path, xy, size, out_px, workers)
        runs["start"].append(start), runs["pool"].append(secs), runs["pool_ro"].append(secs_ro)
    runs["diff"] = float(np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                                  for a, b in zip(naive_tiles, tiler_tiles)]))
    runs["same"] = all(np.array_equal(a, b) for a, b in zip(tiler_tiles, pool_tiles))
    return runs


def _print_readers(runs: dict, n: int, workers: int, repeat: int) -> None:
    med = {k: float(np.median(runs[k])) for k in ("naive", "tiler", "pool", "pool_ro", "start")}
    print(f"\nmedian of {repeat} interleaved rounds (min–max tiles/s in brackets)")
    print(f"{'method':<58}{'tiles':>6}{'s':>7}{'tiles/s':>9}{'(min–max)':>14}{'× naive':>9}")
    rows = [("naive: OpenSlide level-0 read + RGB + PIL resize, 1 proc", "naive"),
            ("tiler: Slide.read_region (pyramid level + resize), 1 proc", "tiler"),
            (f"tiler: Slide.read_region, Pool({workers}), own handle each", "pool"),
            (f"  same Pool({workers}), tiles not sent back (checksum only)", "pool_ro")]
    for name, key in rows:
        spread = f"({n / max(runs[key]):.0f}–{n / min(runs[key]):.0f})"
        print(f"{name:<58}{n:>6}{med[key]:>7.2f}{n / med[key]:>9.1f}{spread:>14}{med['naive'] / med[key]:>9.2f}")
    print(f"  pool start-up (not in the rows above): {med['start']:.2f} s; pool tiles identical to 1-proc: "
          f"{runs['same']}; mean |naive − tiler| = {runs['diff']:.1f} grey levels; load average {_load()}")


def main(argv=None) -> None:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from core.wsi.slide import Slide

    path, build = _ensure_slide(args)
    with Slide(path) as s:
        (width, height), levels, vendor, mpp = s.dimensions, s.level_count, s.vendor, s.mpp
    times, info, tissue_xy, size = tissue_step(path)
    out_px = 112  # 112 µm at 1.0 µm/px
    xy = _sample(tissue_xy, args.max_tiles)
    log.info("timing %d tiles per method, %d rounds …", len(xy), args.repeat)
    runs = _time_readers(path, xy, size, out_px, args.workers, args.repeat)
    print(f"\nslide: {width} × {height} px at {mpp:g} µm/px ({width * mpp / 1e3:.1f} × {height * mpp / 1e3:.2f} mm), "
          f"{levels} levels, {vendor}, {path.stat().st_size / 1e6:.0f} MB JPEG q90 ({build}): {path}")
    print(f"grid: {info['n_grid']} tiles of {size} px = 112 µm → {out_px} px at 1.0 µm/px; "
          f"{info['n_tissue']} with ≥ 30 % tissue (slides.tile_grid: {info['n_current']}); "
          f"timed {len(xy)} of them, the same tiles for every method")
    _print_readers(runs, len(xy), args.workers, args.repeat)
    print(f"\ntissue step over the whole slide (thumbnail {info['thumb'][1]} × {info['thumb'][0]} px at 8 µm/px, "
          f"tissue fraction {info['fraction']:.1%}):")
    for name, secs in times.items():
        print(f"  {name:<40}{secs * 1e3:>9.1f} ms")


if __name__ == "__main__":
    main()
