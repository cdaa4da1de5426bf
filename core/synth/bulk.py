"""The demo world's true per-patient bulk expression: its "measured RNA".

Predicted-vs-measured validation (:func:`core.analysis.cohort_stats.validate_cohort`) compares
the slide-level ``mean`` of the tile predictions with a measured matrix. For the demo that
matrix is the truth, in the units the demo model predicts (log1p CP10k over the panel, per tile).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.synth.reference import expected_profiles
from core.synth.truth import tile_truth

log = logging.getLogger(__name__)
_DEMO_CARD = Path("models") / "demo-synthetic" / "card.json"


def _tiling(demo_dir: Path, tiling):
    from core.wsi.tiling import TilingParams

    if tiling is not None:
        return tiling
    card = demo_dir / _DEMO_CARD
    if card.is_file():
        c = json.loads(card.read_text())
        return TilingParams(tile_um=float(c["tile_um"]), mpp=float(c["mpp"]))
    return TilingParams()  # 112 µm at 1 µm/px: what core.demo.ensure_model trains with


def _tiles(path: Path, cells: pd.DataFrame, tiling, mpp: float, width: int, height: int) -> tuple[np.ndarray, int]:
    """The tiles the engine predicts on this slide (tissue detector + grid of :func:`core.wsi.tiling.tile_grid`);
    when the slide cannot be opened, the same grid keeping tiles that hold at least one cell."""
    from core.errors import TesseraError
    from core.wsi.slide import Slide
    from core.wsi.tiling import tile_grid

    try:
        with Slide(path) as slide:
            grid = tile_grid(slide, tiling)
        return grid.xy, grid.size_level0
    except TesseraError as exc:
        log.warning("true bulk: %s (%s); using the tiles that hold cells", path.name, exc)
    size = int(round(tiling.tile_um / mpp))
    gx, gy = np.meshgrid(np.arange(0, width - size + 1, size), np.arange(0, height - size + 1, size))
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    cx, cy = (cells["x_um"].to_numpy() / mpp // size).astype(int), (cells["y_um"].to_numpy() / mpp // size).astype(int)
    occupied = set(zip(cx * size, cy * size))
    return xy[[(x, y) in occupied for x, y in xy]], size


def true_bulk(demo_dir: Path, *, tiling=None) -> pd.DataFrame:
    """Genes × patients (index ``gene``, columns patient barcode): the mean over each patient's tiles
    of the true tile expression.

    Per slide, the tiles are those the engine predicts (same tissue detector and grid, the demo
    model's tiling unless ``tiling`` is given); each tile's truth is
    :func:`~core.synth.truth.tile_truth` — the expected counts of the cells in it under the patient's
    subtype profiles, log1p CP10k over the panel, exactly the model's per-tile training target.
    Tiles without cells are left out (their truth is undefined, not zero). Averaging those per
    slide is what the slide-level ``mean`` statistic does to the predictions, so a perfect model
    would match this matrix exactly; the composition-weighted profile (log of the summed counts)
    would differ from it by the log's curvature (Jensen), which is a model-free bias. Patients with
    several slides get the mean over their slides.
    """
    demo_dir = Path(demo_dir)
    t0 = time.perf_counter()
    manifest = json.loads((demo_dir / "world.json").read_text())
    mpp = float(manifest.get("mpp", 0.5))
    tiling = _tiling(demo_dir, tiling)
    cells = pd.read_parquet(demo_dir / manifest["paths"]["cells"], columns=["slide_file", "x_um", "y_um", "cell_type"])
    by_slide = dict(tuple(cells.groupby("slide_file", observed=True)))
    profiles: dict[str, pd.DataFrame] = {}
    columns, patients = [], []
    for s in manifest["slides"]:
        mine = by_slide.get(Path(s["file"]).name)
        if mine is None or mine.empty:
            log.warning("true bulk: no cells for %s; patient %s left out", s["file"], s["patient"])
            continue
        prof = profiles.setdefault(s["subtype"], expected_profiles(s["subtype"]))
        xy, size = _tiles(demo_dir / s["file"], mine, tiling, mpp, int(s["width"]), int(s["height"]))
        comp, expr = tile_truth(mine, xy, size, mpp, prof)
        occupied = comp.sum(axis=1).to_numpy() > 0
        if not occupied.any():
            log.warning("true bulk: no tile of %s holds cells; patient %s left out", s["file"], s["patient"])
            continue
        columns.append(expr[occupied].mean(axis=0).to_numpy())
        patients.append(s["patient"])
    out = pd.DataFrame(np.array(columns).T if columns else np.zeros((len(manifest["genes"]), 0)),
                       index=pd.Index(manifest["genes"], name="gene"), columns=pd.Index(patients, name="patient"))
    out = out.T.groupby(level=0, sort=False).mean().T.rename_axis(index="gene", columns="patient")
    log.info("true bulk: %d genes × %d patients in %.1f s", *out.shape, time.perf_counter() - t0)
    return out
