"""`make bench` P1: engine throughput, measured side by side in one run, printed as a table.

Model: the shipped ``breast-her2st`` (EfficientNet-Lite0 tokens + fusion head, 224-px tiles of
112 µm at 0.5 µm/px). Slides: synthetic H&E-coloured pyramidal TIFFs at 0.25 µm/px (tiles are
read from level 1, as on a 40× scan).

R1  fastest raw forward on in-memory uint8 tiles: ONNX Runtime (verified against PyTorch)
R2  raw forward, eager PyTorch (channels-last) — for reference
R3  tile reading alone (OpenSlide read_region + resize, one process)
E   the engine end to end: plan (fingerprint, tissue mask, grid), read in a loader worker,
    model, spool chunks, ingest into DuckDB
N   a naive loop: read one tile at level 0, resize, predict it alone (eager)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _slides(root: Path, n: int, size: int) -> list[Path]:
    from core.synth.tiff import write_pyramidal_tiff

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        rgb = np.clip(rng.normal([200, 130, 190], 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
        path = root / f"bench-{i}.tiff"
        write_pyramidal_tiff(path, rgb, mpp=0.25)
        paths.append(path)
    return paths


def _rate(fn, n_items: int, repeats: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * n_items / (time.perf_counter() - t)


def main(argv=None) -> None:
    import torch

    from core.config import load_settings
    from core.engine.modelhub import load_model
    from core.engine.loop import resolve_device
    from core.engine.predict import predict_slides
    from core.wsi.slide import Slide
    from core.wsi.tiling import tile_grid
    from models.runtime import TorchRuntime, create_runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="breast-her2st")
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--size", type=int, default=13440,
                    help="slide side (level-0 px at 0.25 µm/px): 13,440 px = 3.4 mm, 900 tiles of 112 µm; "
                         "TCGA diagnostic slides hold 5-20k tissue tiles, so per-slide costs weigh less there")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    os.environ.setdefault("TESSERA_CACHE_DIR", str(root / "cache"))
    model = load_model(args.model, load_settings().model_dirs)
    px = int(model.card["input_px"])
    slides = _slides(root, args.slides, args.size)
    x = torch.randint(0, 255, (args.batch_size, px, px, 3), dtype=torch.uint8)

    device = resolve_device("cpu")
    onnx = create_runtime(model.module, device=device, input_px=px, kind="onnx", cache_dir=root / "cache" / "onnx",
                          version=f"{model.model_id}-{model.version}")
    raw_before = _rate(lambda: onnx(x), args.batch_size, repeats=5)
    eager = TorchRuntime(model.module, device)
    raw_eager = _rate(lambda: eager(x), args.batch_size, repeats=1)

    with Slide(slides[0]) as s:
        grid = tile_grid(s, model.tiling())
        reads = grid.xy[:256]
        read_rate = _rate(lambda: [s.read_region(tuple(xy), grid.size_level0, px) for xy in reads], len(reads), 1)

    t = time.perf_counter()
    results = predict_slides(root / "bench.duckdb", [(p, None) for p in slides], model, device="cpu",
                             batch_size=args.batch_size, runtime="onnx")
    engine_s = time.perf_counter() - t
    n_tiles = sum(r.n_tiles for r in results)
    engine = n_tiles / engine_s

    raw_after = _rate(lambda: onnx(x), args.batch_size, repeats=5)
    raw_onnx = max(raw_before, raw_after)   # the fastest raw forward is the reference

    with Slide(slides[0]) as s, torch.inference_mode():
        n = 32
        t = time.perf_counter()
        for xy in grid.xy[:n]:
            region = s.osr.read_region(tuple(int(v) for v in xy), 0, (grid.size_level0,) * 2).convert("RGB")
            tile = np.array(region.resize((px, px)))
            model.module(torch.from_numpy(tile[None]))
        naive = n / (time.perf_counter() - t)

    rows = [(f"R1 raw forward, ONNX Runtime (in memory; best of {raw_before:.0f} before, {raw_after:.0f} after E)",
             raw_onnx),
            ("R2 raw forward, eager PyTorch (in memory)", raw_eager),
            ("R3 tile reading alone (1 process)", read_rate),
            (f"E  engine end to end ({n_tiles} tiles, {len(slides)} slides)", engine),
            ("N  naive per-tile read + predict loop", naive)]
    print(f"P1 · model {model.key} · {px} px tiles · {threads} CPU threads · batch {args.batch_size}")
    print(f"{'figure':<72}{'tiles/s':>10}{'× R1':>8}")
    for name, value in rows:
        print(f"{name:<72}{value:>10.1f}{value / raw_onnx:>8.2f}")
    print(f"engine / raw ONNX = {engine / raw_onnx:.2f} (target ≥ 0.80); "
          f"ONNX max |Δ| vs PyTorch = {getattr(onnx, 'verified_difference', float('nan')):.1e}")


if __name__ == "__main__":
    main()
