"""`make bench`: throughput figures measured side by side in one run, printed as a table.

E1  raw forward of the demo model on in-memory uint8 tiles (eager PyTorch, channels-last)
E2  the engine end to end on a synthetic slide (read, tissue mask, model, DuckDB write)
E3  a naive loop: read one tile at level 0, resize, predict it alone
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _model():
    import torch

    from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
    from core.modelhub import load_model

    root = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    genes = [f"G{i}" for i in range(100)]
    head = ReferenceInformedHead(HeadConfig(1280, 100, 8), torch.rand(8, 100))
    save_checkpoint(root / "bench", head, ModelCard("bench", genes, [f"T{i}" for i in range(8)],
                                                     "efficientnet_lite0", 112.0, 1.0, 112))
    return load_model("bench", [root]), root


def _slide(root: Path, width: int, height: int) -> Path:
    from core.synth.tiff import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal([200, 130, 190], 25, size=(height, width, 3)), 0, 255).astype(np.uint8)
    path = root / "bench.tiff"
    write_pyramidal_tiff(path, rgb, mpp=0.5)
    return path


def main(argv=None) -> None:
    import torch

    from core.predict import predict_slide
    from core.slides import Slide, tile_grid
    from core.store import Store

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, nargs=2, default=(4480, 4480), help="slide width height (level-0 px)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, root = _model()
    slide_path = _slide(root, *args.size)
    module = model.module.to(memory_format=torch.channels_last).eval()
    x = torch.randint(0, 255, (args.batch_size, 112, 112, 3), dtype=torch.uint8)
    with torch.inference_mode():
        module(x)
        t = time.perf_counter()
        for _ in range(5):
            module(x)
        raw = 5 * args.batch_size / (time.perf_counter() - t)
    with Store(root / "bench.duckdb") as store:
        result = predict_slide(slide_path, model, store, device="cpu", batch_size=args.batch_size, workers=1)
    engine = result.tiles_per_s
    with Slide(slide_path) as s:
        grid = tile_grid(s, model.tiling())
        n = min(64, len(grid))
        t = time.perf_counter()
        with torch.inference_mode():
            for xy in grid.xy[:n]:
                region = s.osr.read_region(tuple(int(v) for v in xy), 0, (grid.size_level0,) * 2).convert("RGB")
                tile = np.array(region.resize((112, 112)))
                module(torch.from_numpy(tile[None]))
        naive = n / (time.perf_counter() - t)
    print(f"{'figure':<52}{'tiles/s':>10}{'ratio':>10}")
    print(f"{'E1 raw forward (eager, channels-last, in memory)':<52}{raw:>10.1f}{1.0:>10.2f}")
    print(f"{'E2 engine end to end (' + str(result.n_tiles) + ' tiles)':<52}{engine:>10.1f}{engine / raw:>10.2f}")
    print(f"{'E3 naive per-tile read+predict loop':<52}{naive:>10.1f}{naive / raw:>10.2f}")


if __name__ == "__main__":
    main()
