"""Cells and high-resolution runs: what they cost, side by side in one run.

``python -m benchmarks.cells_bench [--slides 6] [--repeats 5] [--json FILE]``

On the demo cohort (built first when absent; a copy of its store, so nothing is written to it):

- the engine end to end (``predict_slides``, ``force=True``, the settings' workers and device) on
  the same ``--slides`` slides at stride 1, ½ and ¼ and with ``cells=True``: tiles/s, cells/s and
  the time for a 10k-tile slide extrapolated from each (10k default-grid tiles are 40k tiles at
  ½ and 160k at ¼);
- the Slide page's cell layer for one slide with a cells run, through the functions the page
  calls (``cell_view.load_cells`` then ``cell_view.cell_view``): cold (a fresh store handle, the
  first call) and warm, median of ``--repeats``. Target ≤ 300 ms.

Figures on a shared machine vary by ±30 % between runs: read the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TARGET_LAYER_MS = 300.0
TILES_10K = 10_000


def engine_rows(settings, model, n_slides: int) -> list[dict]:
    from core.engine.access import StoreAccess
    from core.engine.plan import usable_slides
    from core.engine.predict import predict_slides
    from core.store.db import Store

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "tessera.duckdb"
        shutil.copy2(settings.store_path, store_path)
        with StoreAccess(store_path).open(wait_s=5.0, or_read_only=True) as st:
            pairs = usable_slides(st, "demo")[:n_slides]
        configs = [("stride 1 (default grid)", 1.0, False), ("stride ½", 0.5, False), ("stride ¼", 0.25, False),
                   ("cells (stride 1)", 1.0, True)]
        for name, stride, cells in configs:
            started = time.perf_counter()
            results = predict_slides(store_path, pairs, model, tiling=model.tiling(stride=stride), device=settings.device,
                                     batch_size=settings.batch_size, workers=settings.workers, force=True, cells=cells)
            wall = time.perf_counter() - started
            tiles = sum(r.n_tiles for r in results)
            n_cells = 0
            if cells:
                with Store(store_path, read_only=True) as s:
                    n_cells = sum(len(s.run_cells(r.run_key, ["x"])) for r in results if getattr(r, "run_key", None))
            per_10k = TILES_10K / (stride * stride) / (tiles / wall)
            rows.append({"config": name, "stride": stride, "cells": cells, "slides": len(results), "tiles": tiles,
                         "wall_s": round(wall, 2), "tiles_per_s": round(tiles / wall, 1),
                         "cells_per_s": round(n_cells / wall, 1) if cells else None, "n_cells": n_cells or None,
                         "slide_10k_min": round(per_10k / 60, 2)})
    return rows


def layer_row(settings, repeats: int) -> dict:
    from core.analysis import cell_view
    from core.store.db import Store

    with Store(settings.store_path, read_only=True) as s:
        key = s.model_coverage("demo")["model_key"].iloc[-1]
        runs = s.cohort_runs("demo", key)
        row = next(r for r in runs.itertuples() if isinstance(r.run_key, str) and s.has_cells(r.run_key))

    def once() -> float:
        t = time.perf_counter()
        with Store(settings.store_path, read_only=True) as s:
            cells, types = cell_view.load_cells(s, key, row.run_key)
        cell_view.cell_view(cells, len(types), int(row.width), int(row.height), float(row.mpp))
        return (time.perf_counter() - t) * 1000

    cold = once()
    warm = [once() for _ in range(repeats)]
    with Store(settings.store_path, read_only=True) as s:
        n = len(cell_view.load_cells(s, key, row.run_key)[0])
    return {"slide": row.slide_name, "cells": n, "cold_ms": round(cold, 1), "warm_median_ms": round(statistics.median(warm), 1),
            "target_ms": TARGET_LAYER_MS, "met": statistics.median(warm) <= TARGET_LAYER_MS and cold <= TARGET_LAYER_MS}


def main(argv=None) -> int:
    from core.config import load_settings
    from core.demo import build_demo
    from core.engine.modelhub import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = load_settings()
    if not Path(settings.store_path).is_file():
        build_demo(settings)
    model = load_model(settings.default_model, settings.model_dirs)
    rows = engine_rows(settings, model, max(1, args.slides))
    layer = layer_row(settings, max(1, args.repeats))
    base = rows[0]["tiles_per_s"]
    print(f"## Cells and high-resolution runs ({args.slides} demo slides, {settings.workers} workers, {settings.device})\n")
    print("| config | tiles | wall s | tiles/s | × default tiles/s | cells/s | 10k-tile slide (min) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['tiles']} | {r['wall_s']} | {r['tiles_per_s']} | {r['tiles_per_s'] / base:.2f} | "
              f"{r['cells_per_s'] if r['cells_per_s'] is not None else '–'} | {r['slide_10k_min']} |")
    print(f"\ncell layer of {layer['slide']} ({layer['cells']} cells): cold {layer['cold_ms']} ms, warm median "
          f"{layer['warm_median_ms']} ms (target ≤ {TARGET_LAYER_MS:g} ms: {'met' if layer['met'] else 'MISSED'})")
    if args.json:
        args.json.write_text(json.dumps({"engine": rows, "cell_layer": layer}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
