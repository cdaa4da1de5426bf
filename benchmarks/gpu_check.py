"""The GPU path in one prepared run: ``python -m benchmarks.gpu_check --device cuda --out "$OUT"``.

Made for a GPU machine lent for minutes, without a package registry (``make gpu-bundle`` builds
what it lacks; the README's "On a GPU server" gives the one device command). ``--device cpu``
runs the same steps on a tiny world, in ``make test``, so the script cannot rot.

1. **Slides**: synthetic H&E-coloured pyramidal JPEG TIFFs at 0.25 µm/px (like
   ``benchmarks/run.py``), written in parallel, enough for ``--tiles`` tiles (default 100k). Each
   slide tiles its own random 1,024-px texture, so slides differ (own fingerprints) and are
   cheap to make.
2. **R3**, decode + resize alone: the engine's tile read (:meth:`core.wsi.slide.Slide.read_region`,
   OpenSlide) in 1, 8 and 15 processes (``--workers``), tiles/s. The best is the decode limit.
3. **Correctness**: the shipped model's outputs on the engine's fixed verification batch
   (:func:`models.runtime.verification_batch` plus real tiles of the slides), on the device at
   each precision, against fp32 on the CPU: max |Δ| per output, and the expression's Pearson r,
   against the tolerances in :data:`TOLERANCE`.
4. **R1**, the raw forward (:class:`models.runtime.TorchRuntime`, channels-last, uint8 tiles in,
   outputs back on the host) at bf16 and fp16 with the engine's automatic batch size
   (:func:`core.engine.loop.auto_batch_size`), tiles/s.
5. **GPU decode** (CUDA only): the slides' raw JPEG tile bytes read with tifffile, decoded in
   batches by ``torchvision.io.decode_jpeg(..., device="cuda")``; checked against the CPU decode
   and reported in region-equivalents/s (the tiles a 112-µm region covers). A measurement only:
   the engine does not decode on the GPU (yet).
6. **E**, the engine end to end (:func:`core.engine.predict.predict_slides`: plan, loader
   workers, model, spool, ingest into DuckDB) with ``--device`` and the best R3 worker count,
   with GPU utilisation sampled by ``nvidia-smi`` while it runs.

One table (tiles/s, E/R1, E against the decode limit, GPU utilisation, a 1,100-slide × 10k-tile
cohort extrapolated from E) is printed and written to ``OUT/gpu_check.md``; the same as JSON to
``OUT/gpu_check.json``. Targets: E ≥ 0.8 × min(R1, decode limit); that cohort in ≤ 1 h.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = "breast-her2st"
MPP = 0.25
COHORT_SLIDES, COHORT_TILES = 1100, 10_000
# max |Δ| of the expression (log1p units, values 0-5) and its Pearson r against fp32 on the CPU
TOLERANCE = {"fp32": {"max_abs": 1e-3, "r": 0.99999}, "bf16": {"max_abs": 0.25, "r": 0.995},
             "fp16": {"max_abs": 0.05, "r": 0.999}}


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- 1. slides ----------------------------------------------------------------------------------
def _write_slide(job: tuple[str, int, int]) -> str:
    from core.synth.tiff import write_pyramidal_tiff

    path, seed, side = job
    rng = np.random.default_rng(seed)
    block = np.clip(rng.normal([200, 130, 190], 25, size=(1024, 1024, 3)), 0, 255).astype(np.uint8)
    reps = math.ceil(side / 1024)
    rgb = np.tile(block, (reps, reps, 1))[:side, :side]
    write_pyramidal_tiff(path, np.ascontiguousarray(rgb), mpp=MPP)
    return path


def make_slides(root: Path, n_tiles: int, side: int, tile_level0: int, workers: int) -> list[Path]:
    per_slide = (side // tile_level0) ** 2
    n = max(1, math.ceil(n_tiles / per_slide))
    jobs = [(str(root / f"gpu-check-{i:03d}.tiff"), 1000 + i, side) for i in range(n)]
    with mp.get_context("fork").Pool(min(workers, n)) as pool:
        pool.map(_write_slide, jobs, chunksize=1)
    return [Path(j[0]) for j in jobs]


# -- 2. R3: decode + resize alone ----------------------------------------------------------------
def _read_share(job) -> int:
    from core.wsi.slide import Slide

    items, size_level0, px = job
    n, opened = 0, {}
    try:
        for path, x, y in items:
            if path not in opened:
                opened[path] = Slide(path)
            opened[path].read_region((x, y), size_level0, px)
            n += 1
    finally:
        for s in opened.values():
            s.close()
    return n


def decode_rate(items: list, size_level0: int, px: int, workers: int) -> float:
    shares = [items[i::workers] for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_read_share, [(s[:4], size_level0, px) for s in shares])        # warm: imports, first opens
        t = time.perf_counter()
        n = sum(pool.map(_read_share, [(s, size_level0, px) for s in shares]))
        return n / (time.perf_counter() - t)


# -- 3. correctness, 4. R1 -------------------------------------------------------------------------
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.sqrt((a @ a) * (b @ b)) + 1e-12))


def correctness(reference: dict, got: dict, precision: str) -> dict:
    diff = {k: float(np.abs(got[k] - reference[k]).max()) for k in reference}
    r = _pearson(reference["expression"], got["expression"])
    tol = TOLERANCE[precision]
    return {"max_abs": diff, "expression_r": r, "tolerance": tol,
            "ok": diff["expression"] <= tol["max_abs"] and r >= tol["r"]}


def raw_rate(runtime, batch, seconds: float) -> float:
    runtime(batch)
    runtime(batch)                                  # warm: cuDNN autotune, allocator
    n, t = 0, time.perf_counter()
    while True:
        runtime(batch)                              # outputs come back to the host: synchronised
        n += len(batch)
        if time.perf_counter() - t >= seconds:
            return n / (time.perf_counter() - t)


# -- 5. GPU decode ---------------------------------------------------------------------------------
def gpu_decode(slides: list[Path], level: int, read_px: int, seconds: float) -> dict:
    """Raw JPEG tiles of ``level`` (the pyramid level the engine reads, ``read_px`` across a
    region), decoded on the GPU in batches of 256, against the CPU decode of the same bytes."""
    import tifffile
    import torch
    from torchvision.io import decode_jpeg

    with tifffile.TiffFile(slides[0]) as tif:
        page = tif.pages[level]
        tables = page.jpegtables
        tw = page.tilewidth
        blobs = []
        with open(slides[0], "rb") as fh:
            for off, count in list(zip(page.dataoffsets, page.databytecounts))[:2048]:
                fh.seek(off)
                blobs.append(fh.read(count))
    if tables is not None:            # abbreviated streams: splice the tables in after SOI
        blobs = [b[:2] + tables[2:-2] + b[2:] for b in blobs]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    cpu = torch.stack([decode_jpeg(d) for d in data[:16]])
    gpu = torch.stack(decode_jpeg(data[:16], device="cuda")).cpu()
    max_diff = int((cpu.int() - gpu.int()).abs().max())
    decode_jpeg(data[:256], device="cuda")
    torch.cuda.synchronize()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for i in range(0, len(data), 256):
            decode_jpeg(data[i:i + 256], device="cuda")
            n += len(data[i:i + 256])
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t)
    span = read_px / tw                   # TIFF tiles a region covers, on average over its offsets
    per_region = (span + 1) ** 2 if read_px % tw else span ** 2
    return {"tile_px": tw, "level": level, "jpeg_tiles_per_s": rate, "tiles_per_region": per_region,
            "regions_per_s": rate / per_region, "max_abs_diff_vs_cpu_decode": max_diff}


# -- 6. E ----------------------------------------------------------------------------------------
class GpuUtilisation:
    """``nvidia-smi`` sampled every 0.5 s while the engine runs (None where it is missing)."""

    def __init__(self, enabled: bool):
        self.samples: list[float] = []
        self.proc = None
        if enabled and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait(timeout=5)
        busy = self.samples[2:] or self.samples     # the first samples precede the model's start
        return float(np.mean(busy)) if busy else None


# -- the run ---------------------------------------------------------------------------------------
def run(args, res: dict) -> dict:
    """Fills ``res`` step by step (so a failure still leaves what was measured) and returns it."""
    import torch

    from core.config import load_settings
    from core.engine.loop import auto_batch_size, resolve_device
    from core.engine.modelhub import load_model
    from core.engine.predict import predict_slides
    from core.wsi.slide import Slide
    from core.wsi.tiling import tile_grid
    from models.runtime import TorchRuntime, verification_batch

    started = time.perf_counter()
    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="tessera-gpu-check-", dir=args.work))
    os.environ.setdefault("TESSERA_CACHE_DIR", str(root / "cache"))
    model = load_model(args.model, load_settings().model_dirs)
    tiling = model.tiling()
    px = int(model.card.get("input_px") or tiling.out_px)
    tile_level0 = int(round(tiling.tile_um / MPP))
    res.update({"device": str(device), "model": model.key, "input_px": px, "tile_um": tiling.tile_um,
                "slide_mpp": MPP, "cpu_count": os.cpu_count(), "torch": torch.__version__})

    _log(f"writing slides for {args.tiles:,} tiles ({args.slide_px} px side, {tile_level0}-px tiles at level 0)")
    t = time.perf_counter()
    slides = make_slides(root, args.tiles, args.slide_px, tile_level0, max(args.workers))
    res["slides"] = {"n": len(slides), "side_px": args.slide_px, "seconds": time.perf_counter() - t}
    items = []
    with Slide(slides[0]) as s:
        grid = tile_grid(s, tiling)
        size_level0 = grid.size_level0
        read_level = s.osr.get_best_level_for_downsample(size_level0 / px + 1e-6)      # as read_region picks
        read_px = int(round(size_level0 / s.level_downsamples[read_level]))
    for p in slides:
        items += [(str(p), int(x), int(y)) for x, y in grid.xy]
    res["slides"]["tiles"] = len(items)
    _log(f"{len(slides)} slides, {len(items):,} tiles in {res['slides']['seconds']:.0f} s")

    # R3 before CUDA is touched (the pools fork)
    rng = np.random.default_rng(0)
    res["r3"] = {}
    for w in args.workers:
        sample = [items[i] for i in rng.choice(len(items), min(len(items), args.decode_tiles * w), replace=False)]
        res["r3"][str(w)] = decode_rate(sample, size_level0, px, w)
        _log(f"R3 decode + resize, {w} worker(s): {res['r3'][str(w)]:.0f} tiles/s")
    best_w = int(max(res["r3"], key=res["r3"].get))
    if device.type == "cuda":       # only now: CUDA is initialised after the pools above have forked
        res["gpu"] = torch.cuda.get_device_name(device)
    decode_limit = res["r3"][str(best_w)]

    # correctness: a fixed batch (synthetic + real tiles), fp32 on the CPU as the reference
    with Slide(slides[0]) as s:
        real = np.stack([s.read_region(tuple(xy), size_level0, px) for xy in grid.xy[:10]])
    batch = torch.cat([verification_batch(px), torch.from_numpy(real)])
    reference = TorchRuntime(model.module, torch.device("cpu"))(batch)
    precisions = ["bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    res["correctness"], res["r1"] = {}, {}
    x = None
    for prec in precisions:
        runtime = TorchRuntime(model.module, device, amp="off" if prec == "fp32" else prec)
        res["correctness"][prec] = correctness(reference, runtime(batch), prec)
        c = res["correctness"][prec]
        _log(f"correctness {prec}: expression max |Δ| {c['max_abs']['expression']:.2e}, r {c['expression_r']:.6f} "
             f"({'ok' if c['ok'] else 'FAILED'})")
        bs = args.batch_size or auto_batch_size(runtime, device, px)
        if x is None or len(x) != bs:
            x = torch.randint(0, 255, (bs, px, px, 3), dtype=torch.uint8)
            if device.type == "cuda":
                x = x.pin_memory()
        res["r1"][prec] = {"batch_size": bs, "tiles_per_s": raw_rate(runtime, x, args.raw_seconds)}
        _log(f"R1 raw forward {prec}, batch {bs}: {res['r1'][prec]['tiles_per_s']:.0f} tiles/s")
    r1_best = max(v["tiles_per_s"] for v in res["r1"].values())

    if device.type == "cuda" and not args.no_gpu_decode:
        try:
            res["gpu_decode"] = gpu_decode(slides, read_level, read_px, args.raw_seconds)
            g = res["gpu_decode"]
            _log(f"GPU decode: {g['jpeg_tiles_per_s']:.0f} JPEG tiles/s = {g['regions_per_s']:.0f} regions/s "
                 f"(max |Δ| vs CPU {g['max_abs_diff_vs_cpu_decode']})")
        except Exception as exc:       # a measurement: report it, do not lose the rest of the run
            res["gpu_decode"] = {"error": f"{type(exc).__name__}: {exc}"}
            _log(f"GPU decode failed: {res['gpu_decode']['error']}")

    _log(f"E: the engine on {len(slides)} slides, {best_w} loader workers, device {device}")
    util = GpuUtilisation(device.type == "cuda")
    t = time.perf_counter()
    try:
        results = predict_slides(root / "gpu-check.duckdb", [(p, None) for p in slides], model,
                                 device=str(device), batch_size=args.batch_size, workers=best_w, runtime="torch",
                                 ingest_wait_s=60.0)
        e_s = time.perf_counter() - t
    finally:
        utilisation = util.stop()
    bad = [r for r in results if r.status != "computed"]
    if bad:
        raise RuntimeError(f"{len(bad)} slide(s) did not compute: {bad[0].slide_name}: {bad[0].status} {bad[0].message}")
    n = sum(r.n_tiles for r in results)
    e_rate = n / e_s
    res["e"] = {"tiles": n, "seconds": e_s, "tiles_per_s": e_rate, "workers": best_w,
                "gpu_utilisation_pct": utilisation}
    limit = min(r1_best, decode_limit)
    res["summary"] = {"r1_best": r1_best, "decode_limit": decode_limit, "e_over_r1": e_rate / r1_best,
                      "e_over_decode_limit": e_rate / decode_limit, "e_over_limit": e_rate / limit,
                      "limited_by": "decode" if decode_limit < r1_best else "model",
                      "cohort_hours": COHORT_SLIDES * COHORT_TILES / e_rate / 3600,
                      "target_e_ok": e_rate >= 0.8 * limit, "correct": all(c["ok"] for c in res["correctness"].values())}
    res["summary"]["target_cohort_ok"] = res["summary"]["cohort_hours"] <= 1.0
    res["seconds_total"] = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    return res


def table(res: dict) -> str:
    s = res["summary"]
    gpu = res.get("gpu", "")
    lines = [f"## GPU check · {res['device']} {gpu} · {res['model']} · {res['input_px']} px · "
             f"{res['cpu_count']} CPUs · torch {res['torch']}", "",
             "| figure | tiles/s | note |", "|---|---|---|"]
    for prec, r in res["r1"].items():
        c = res["correctness"][prec]
        layout = ", channels-last" if res["device"].startswith("cuda") else ""
        lines.append(f"| R1 raw forward, {prec}{layout}, batch {r['batch_size']} | {r['tiles_per_s']:.0f} | "
                     f"vs CPU fp32: expression max abs diff {c['max_abs']['expression']:.2e}, r {c['expression_r']:.5f} "
                     f"({'within' if c['ok'] else 'OUTSIDE'} {c['tolerance']['max_abs']:g} / {c['tolerance']['r']:g}) |")
    for w, v in res["r3"].items():
        lines.append(f"| R3 decode + resize, {w} worker(s) | {v:.0f} | OpenSlide read_region |")
    g = res.get("gpu_decode")
    if g and "error" not in g:
        lines.append(f"| GPU JPEG decode (torchvision, {g['tile_px']}-px tiles) | {g['regions_per_s']:.0f} | "
                     f"{g['jpeg_tiles_per_s']:.0f} JPEG tiles/s, {g['tiles_per_region']:.1f} per region; "
                     f"max abs diff vs CPU decode {g['max_abs_diff_vs_cpu_decode']} |")
    elif g:
        lines.append(f"| GPU JPEG decode | — | failed: {g['error']} |")
    e = res["e"]
    util = "n/a" if e["gpu_utilisation_pct"] is None else f"{e['gpu_utilisation_pct']:.0f} %"
    lines.append(f"| E engine end to end into DuckDB, {e['workers']} workers | {e['tiles_per_s']:.0f} | "
                 f"{e['tiles']:,} tiles in {e['seconds']:.0f} s; GPU utilisation {util} |")
    lines += ["", f"- E / R1 = {s['e_over_r1']:.2f}; E / decode limit = {s['e_over_decode_limit']:.2f}; limited by "
                  f"{s['limited_by']}; E / min(R1, decode) = {s['e_over_limit']:.2f} "
                  f"(target ≥ 0.80: {'met' if s['target_e_ok'] else 'MISSED'})",
              f"- {COHORT_SLIDES:,} slides × {COHORT_TILES:,} tiles at E: {s['cohort_hours']:.2f} h "
              f"(target ≤ 1 h: {'met' if s['target_cohort_ok'] else 'MISSED'})",
              f"- outputs within tolerance at every precision: {'yes' if s['correct'] else 'NO'}",
              f"- total {res['seconds_total']:.0f} s (slides {res['slides']['seconds']:.0f} s: {res['slides']['n']} "
              f"of {res['slides']['side_px']} px, {res['slides']['tiles']:,} tiles)"]
    return "\n".join(lines)


def _workers(text: str) -> list[int]:
    try:
        out = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers takes counts like 1,8,15, not {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("--workers needs counts of at least 1")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the tiny-world run in make test)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--tiles", type=int, default=None, help="tiles to write (default 100k on cuda, 200 on cpu)")
    ap.add_argument("--slide-px", type=int, default=None, help="slide side at level 0 (default 13,440; cpu 2,240)")
    ap.add_argument("--workers", type=_workers, default=None, help="loader worker counts for R3 (default 1,8,15)")
    ap.add_argument("--decode-tiles", type=int, default=None, help="tiles read per worker in R3")
    ap.add_argument("--raw-seconds", type=float, default=None, help="seconds per R1 measurement")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's automatic batch size")
    ap.add_argument("--no-gpu-decode", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the slides (default: the system's temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.md ($OUT)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.tiles = args.tiles or (100_000 if cuda else 200)
    args.slide_px = args.slide_px or (13_440 if cuda else 2_240)
    args.workers = args.workers or ([1, 8, 15] if cuda else [1, 2])
    args.decode_tiles = args.decode_tiles or (1500 if cuda else 40)
    args.raw_seconds = args.raw_seconds or (10.0 if cuda else 2.0)
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"])
    res: dict = {}
    try:
        run(args, res)
    except Exception as exc:       # one line to act on; the traceback and what was measured go to --out
        import traceback

        print(f"gpu_check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check_error.txt").write_text(traceback.format_exc())
            (args.out / "gpu_check_partial.json").write_text(json.dumps(res, indent=1, default=str))
        return 1
    text = table(res)
    print(text, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
        (args.out / "gpu_check.md").write_text(text + "\n")
    return 0 if res["summary"]["correct"] else 3


if __name__ == "__main__":
    sys.exit(main())
