"""What the Slide page's viewer draws, computed without Streamlit: a layer's per-tile values turned
into an overlay image on the slide's tile grid, its colour range (this slide, the slides shown
together, or the whole cohort), the legend, the per-slide summary strip, and the tile under a click.

Coordinates are level-0 px; tiles are ``(x, y)`` top-left on a grid of pitch ``tile_size``.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis import overlay
from core.analysis.spatial import grid_neighbours, morans_i

RANGE_MODES = ("slide", "shown", "cohort")


@dataclass(frozen=True)
class LayerView:
    """One layer on one slide, ready to draw: the overlay PNG as a data URL and its extent."""

    url: str
    width_px: int           # the overlay covers [0, width_px] × [0, height_px] in level-0 px
    height_px: int
    vmin: float
    vmax: float
    n_tiles: int
    x_px: float = 0.0       # where the image's top-left corner lies (a high-resolution run's grid is
    y_px: float = 0.0       # offset by half a tile minus half a step: its cells are the tiles' centres)


def overlay_view(tiles: pd.DataFrame, tile_size: int, width: int, height: int, *, vmin: float, vmax: float,
                 cmap: str = "viridis", tissue_min: float | None = None, categories: int | None = None,
                 step: int | None = None, smooth: bool = False) -> LayerView:
    """The tiles' ``value`` column as an RGBA image, one pixel per grid cell (drawn without
    smoothing, so each tile is a crisp square). ``tissue_min`` hides tiles whose tissue fraction
    (column ``tissue``) is below it; ``categories`` = number of labels for a categorical layer.

    ``step``: a high-resolution run's grid step (level-0 px, ``stride × tile_size``): each tile's
    value fills the central ``step × step`` cell of its tile, so the image has one pixel per step,
    offset by ``(tile_size − step) / 2``. ``smooth``: a Gaussian smoothing of one cell, drawn 4×
    finer (:func:`core.analysis.overlay.smooth_grid`; not for categorical layers)."""
    keep = tiles
    if tissue_min is not None and "tissue" in tiles.columns:
        keep = tiles[tiles["tissue"].fillna(1.0) >= tissue_min]
    xy = keep[["x", "y"]].to_numpy()
    pitch = int(step or tile_size)
    grid = overlay.tile_grid(xy, keep["value"].to_numpy(np.float64), pitch, width, height)
    rows, cols = grid.shape
    if smooth and categories is None:
        grid = overlay.smooth_grid(grid, 1.0, 4)
    rgba = (overlay.colorize_labels(grid, categories) if categories is not None
            else overlay.colorize(grid, vmin, vmax, cmap))
    url = "data:image/png;base64," + base64.b64encode(overlay.png_bytes(rgba)).decode()
    off = (tile_size - pitch) / 2.0
    return LayerView(url, cols * pitch, rows * pitch, float(vmin), float(vmax), int(len(keep)), off, off)


def default_grid_tiles(tiles: pd.DataFrame, tile_size: int) -> pd.DataFrame:
    """The tiles of a high-resolution run that are tiles of the default grid (corners at
    multiples of the tile side): what its stored summaries and Moran's I are computed on."""
    from core.wsi.tiling import default_grid

    if tiles.empty:
        return tiles
    return tiles[default_grid(tiles[["x", "y"]].to_numpy(), tile_size)]


def legend(vmin: float, vmax: float, cmap: str, *, n: int = 7) -> dict:
    """A colour bar: ``min``/``max`` labels and ``n`` evenly spaced hex colours."""
    lut = overlay.colorize(np.linspace(vmin, vmax, n)[None, :], vmin, vmax, cmap)[0, :, :3]
    return {"min": f"{vmin:.3g}", "max": f"{vmax:.3g}", "stops": ["#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in lut]}


def category_legend(labels: list[str]) -> dict:
    colors = overlay.categorical_colors(len(labels))
    return {"categories": [{"label": lab, "color": "#%02x%02x%02x" % tuple(int(c) for c in col)}
                           for lab, col in zip(labels, colors)]}


def layer_summary(tiles: pd.DataFrame, tile_size: int) -> dict:
    """The summary strip under a slide: n tiles, mean, q90 and Moran's I (rook neighbours on the
    tile grid, :func:`core.analysis.spatial.morans_i`) of the layer's tile values."""
    v = tiles["value"].to_numpy(np.float64)
    if v.size == 0:
        return {"n": 0, "mean": float("nan"), "q90": float("nan"), "morans_i": float("nan")}
    pairs = grid_neighbours(tiles[["x", "y"]].to_numpy(), tile_size)
    moran = float(morans_i(v[:, None], pairs)[0])
    return {"n": int(v.size), "mean": float(v.mean()), "q90": float(np.quantile(v, 0.9)), "morans_i": moran}


def summary_caption(s: dict) -> str:
    if not s["n"]:
        return "no tiles"
    moran = "n/a" if not np.isfinite(s["morans_i"]) else f"{s['morans_i']:.2f}"
    return f"{s['n']} tiles · mean {s['mean']:.2f} · q90 {s['q90']:.2f} · Moran's I {moran}"


def shared_range(value_sets: list[np.ndarray], mode: str = "minmax") -> tuple[float, float]:
    """One colour range over several slides' values (``minmax`` or ``robust`` 2–98 %)."""
    parts = [np.asarray(v, np.float64).ravel() for v in value_sets if v is not None and len(v)]
    return overlay.value_range(np.concatenate(parts) if parts else np.zeros(0), mode)


def tile_at(tiles: pd.DataFrame, x: float, y: float, tile_size: int, step: int | None = None) -> pd.Series | None:
    """The tile whose square contains level-0 point (x, y), or None (background, off the slide).
    With a high-resolution ``step``: the tile whose central ``step`` cell contains it (the cell the
    overlay colours with its value), else any tile containing it."""
    if tiles.empty:
        return None
    if step and step < tile_size:
        off = (tile_size - step) / 2.0
        cx, cy = tiles["x"] + off, tiles["y"] + off
        hit = tiles[(cx <= x) & (x < cx + step) & (cy <= y) & (y < cy + step)]
        if not hit.empty:
            return hit.iloc[0]
    hit = tiles[(tiles["x"] <= x) & (x < tiles["x"] + tile_size) & (tiles["y"] <= y) & (y < tiles["y"] + tile_size)]
    return None if hit.empty else hit.iloc[0]


DOMAIN_LAYER = "domain"


def layer_frame(store, cohort: str, model_key: str, run_key: str, layer: str, tile_um: float
                ) -> tuple[pd.DataFrame, list[str] | None, str | None]:
    """(tiles with tile_idx, x, y, tissue, value; category labels or None; a notice or None, e.g. the
    genes of a signature that the panel lacks) of one layer on one slide.

    ``layer`` is a :mod:`core.analysis.maps` layer (``gene:``, ``sig:``, ``nuclei:``) or
    ``domain``: the cohort's spatial domains (:mod:`core.analysis.domains`), coded 0..k-1 in the
    order of the fit's labels so that a domain has the same colour on every slide."""
    from core.analysis.maps import layer_tiles
    from core.errors import TesseraError

    tiles, _, _ = store.run_expression(model_key, run_key, [])
    labels, notice = None, None
    if layer == DOMAIN_LAYER:
        from core.analysis import domains

        assigned = domains.tile_domains(store, cohort, model_key, run_key)
        if assigned is None:
            raise TesseraError("This cohort has no spatial domains for this model yet: fit them with "
                               f"`python -m core.cli domains fit --cohort {cohort}` (or the button below).")
        titles = domains.domain_titles(store, cohort, model_key)
        code = {lab: i for i, (lab, _) in enumerate(titles)}
        labels = [title for _, title in titles]
        values = tiles.assign(value=[code.get(a, np.nan) for a in assigned])
    else:
        values = layer_tiles(store, model_key, run_key, layer, tile_um)
        notice = values.attrs.get("notice") or None
        values = tiles[["tile_idx", "tissue"]].merge(values, on="tile_idx", how="right")
    return values[["tile_idx", "x", "y", "tissue", "value"]], labels, notice


def cohort_values(store, cohort: str, model_key: str, run_keys: list[str], layer: str, tile_um: float) -> np.ndarray:
    """A layer's tile values over every given slide (for a cohort-wide colour range)."""
    return np.concatenate([layer_frame(store, cohort, model_key, k, layer, tile_um)[0]["value"].to_numpy(np.float64)
                           for k in run_keys]) if run_keys else np.zeros(0)
