"""The Slide page's cell layer, computed without Streamlit: a cells run's cells rasterised into one
RGBA overlay image (each cell its filled nucleus ellipse, or only its outline), coloured by cell
type (one colour per type) or by a gene's per-cell value (a colour map), and the cell-type
composition of the slide or of one tile.

Coordinates are level-0 px. The image covers ``[0, width_px] × [0, height_px]`` of the slide at
``scale`` level-0 px per image px: the slide's own resolution for slides up to ``max_px`` on the
long side, coarser beyond (so the image stays at most ``max_px``).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis import overlay

CELL_LAYER_TYPE = "cells:type"
CELL_LAYER_GENE = "cells:gene"          # ``cells:gene:<SYMBOL>`` once a gene is picked
MAX_PX = 4096
MIN_RADIUS_PX = 1.5                     # a cell is never drawn smaller than this (image px)


@dataclass(frozen=True)
class CellView:
    """A cell layer ready to draw: the overlay PNG as a data URL and where it lies on the slide."""

    url: str
    width_px: int            # level-0 px covered by the image
    height_px: int
    scale: float             # level-0 px per image px
    n_cells: int


def cell_gene(layer: str) -> str | None:
    """``cells:gene:ERBB2`` → ``ERBB2``; None for the type layer (or any other layer)."""
    prefix = CELL_LAYER_GENE + ":"
    return (layer[len(prefix):] or None) if layer.startswith(prefix) else None


def is_cell_layer(layer: str) -> bool:
    return layer == CELL_LAYER_TYPE or layer.startswith(CELL_LAYER_GENE)


def load_cells(store, model_key: str, run_key: str, gene: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(cells: tile_idx, x, y, major_um, minor_um, angle, type (int code), value (the gene's
    per-cell value, or NaN); the run's cell-type names) — only what the layer draws."""
    from core.analysis.cell_layers import run_cells

    cells = run_cells(store, model_key, run_key, [gene] if gene else [],
                      columns=["x", "y", "major_um", "minor_um", "angle"])
    f = cells.frame
    out = pd.DataFrame({"tile_idx": f["tile_idx"].to_numpy(np.int32), "x": f["x"].to_numpy(np.float32),
                        "y": f["y"].to_numpy(np.float32), "major_um": f["major_um"].to_numpy(np.float32),
                        "minor_um": f["minor_um"].to_numpy(np.float32), "angle": f["angle"].to_numpy(np.float32),
                        "type": f["cell_type"].cat.codes.to_numpy(np.int16),
                        "value": (f[f"gene:{gene}"].to_numpy(np.float32) if gene
                                  else np.full(len(f), np.nan, np.float32))})
    return out, list(cells.cell_types)


def image_scale(width: int, height: int, max_px: int = MAX_PX) -> float:
    """Level-0 px per image px: 1 (the slide's own resolution) unless that exceeds ``max_px``."""
    return max(1.0, max(int(width), int(height)) / float(max_px))


def type_colors(n_types: int) -> np.ndarray:
    """[n, 3] uint8: one colour per cell type (the categorical palette of the domain layer)."""
    return overlay.categorical_colors(n_types)


def cell_palette(cells: pd.DataFrame, n_types: int, *, by: str = "type", vmin: float = 0.0, vmax: float = 1.0,
                 cmap: str = "viridis", alpha: int = 235) -> tuple[np.ndarray, np.ndarray]:
    """(palette index per cell, uint8 [n]; the RGBA palette, uint8 [256, 4]). Index 0 is
    transparent (no cell, or a cell with no value); by type, type ``t`` is index ``t + 1``; by
    value, the colour map's 255 steps over [vmin, vmax] are indices 1..255 (values clipped)."""
    palette = np.zeros((256, 4), np.uint8)
    if by == "type":
        k = max(min(n_types, 255), 1)
        palette[1:k + 1, :3] = type_colors(k)
        palette[1:k + 1, 3] = alpha
        index = (np.clip(cells["type"].to_numpy(np.int64), 0, k - 1) + 1).astype(np.uint8)
        return index, palette
    lut = overlay.colorize(np.linspace(vmin, vmax, 255)[None, :], vmin, vmax, cmap)[0]
    palette[1:, :3], palette[1:, 3] = lut[:, :3], alpha
    v = cells["value"].to_numpy(np.float64)
    span = (vmax - vmin) or 1e-6
    index = np.zeros(len(v), np.uint8)
    ok = np.isfinite(v)
    index[ok] = 1 + np.clip(np.rint((v[ok] - vmin) / span * 254), 0, 254).astype(np.uint8)
    return index, palette


def rasterize(cells: pd.DataFrame, index: np.ndarray, width: float, height: float, mpp: float, *,
              scale: float | None = None, outline: bool = False, vertices: int = 16,
              origin: tuple[float, float] = (0.0, 0.0)):
    """(PIL palette image, scale): every cell's nucleus ellipse (axes ``major_um``/``minor_um``
    at ``angle``, at least :data:`MIN_RADIUS_PX` image px) drawn at its centroid in its palette
    ``index``, filled or (``outline``) as its outline only. Later cells draw over earlier ones;
    index 0 (transparent) where there is no cell. The image covers the level-0 region of
    ``width`` × ``height`` px from ``origin`` (one tile of :class:`CellPyramid`, or the slide)."""
    from PIL import Image, ImageDraw

    from core.wsi.cells import ellipse_polygon

    scale = float(scale or image_scale(width, height))
    w, h = int(np.ceil(width / scale)), int(np.ceil(height / scale))
    img = Image.new("P", (w, h), 0)
    keep = np.asarray(index) > 0
    if not keep.any():
        return img, scale
    sub = cells[keep]
    to_px = 1.0 / (float(mpp) * scale)                 # image px per µm
    major = np.maximum(np.nan_to_num(sub["major_um"].to_numpy(np.float64)) * to_px, 2 * MIN_RADIUS_PX)
    minor = np.clip(np.nan_to_num(sub["minor_um"].to_numpy(np.float64)) * to_px, 2 * MIN_RADIUS_PX, major)
    rings = ellipse_polygon((sub["x"].to_numpy(np.float64) - origin[0]) / scale,
                            (sub["y"].to_numpy(np.float64) - origin[1]) / scale,
                            major, minor, np.nan_to_num(sub["angle"].to_numpy(np.float64)), vertices=vertices)
    draw = ImageDraw.Draw(img)
    shape = draw.polygon
    for ring, c in zip(rings.reshape(len(rings), -1).tolist(), np.asarray(index)[keep].tolist()):
        if outline:
            shape(ring, outline=c)
        else:
            shape(ring, fill=c)
    return img, scale


def to_rgba(img, palette: np.ndarray) -> np.ndarray:
    """The palette image as an RGBA uint8 array (for tests and figure exports)."""
    return np.asarray(palette)[np.asarray(img)]


def png_bytes(img, palette: np.ndarray) -> bytes:
    """A palette PNG (one byte a pixel, alpha per palette entry): a quarter of RGBA's size and
    encoding time, which keeps the layer's load within its budget (benchmarks/cells_view_bench.py)."""
    import io

    img = img.copy()
    img.putpalette(np.asarray(palette)[:, :3].ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1, transparency=bytes(np.asarray(palette)[:, 3].tolist()))
    return buf.getvalue()


def cell_view(cells: pd.DataFrame, n_types: int, width: int, height: int, mpp: float, *, by: str = "type",
              vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis", outline: bool = False,
              max_px: int = MAX_PX) -> CellView:
    """The cell layer as a PNG data URL placed over the slide (see :func:`rasterize`)."""
    index, palette = cell_palette(cells, n_types, by=by, vmin=vmin, vmax=vmax, cmap=cmap)
    img, scale = rasterize(cells, index, width, height, mpp, scale=image_scale(width, height, max_px),
                           outline=outline)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(img, palette)).decode()
    return CellView(url, int(round(img.width * scale)), int(round(img.height * scale)), scale, int(len(cells)))


class CellPyramid:
    """The cell layer drawn tile by tile at any zoom (the renderer of a
    :class:`core.viewer.overlays.OverlayLayer`), for slides whose whole-slide image would be
    coarser than their own resolution (:func:`image_scale` > 1): at full zoom every nucleus is
    drawn at the slide's resolution, as on small slides. A tile draws the cells whose ellipse can
    reach it (centroid within the largest half-axis, or the minimum radius, of its region)."""

    def __init__(self, cells: pd.DataFrame, n_types: int, mpp: float, *, by: str = "type", vmin: float = 0.0,
                 vmax: float = 1.0, cmap: str = "viridis", outline: bool = False):
        order = np.argsort(cells["x"].to_numpy(np.float64), kind="stable")
        self.cells = cells.iloc[order].reset_index(drop=True)
        self.index, self.palette = cell_palette(self.cells, n_types, by=by, vmin=vmin, vmax=vmax, cmap=cmap)
        self.x = self.cells["x"].to_numpy(np.float64)
        self.y = self.cells["y"].to_numpy(np.float64)
        self.mpp, self.outline = float(mpp), bool(outline)
        major = np.nan_to_num(self.cells["major_um"].to_numpy(np.float64))
        self.reach_um = float(major.max() / 2) if len(major) else 0.0

    def render(self, x0: float, y0: float, w0: float, h0: float, scale: float) -> bytes:
        """PNG of the level-0 region ``[x0, x0 + w0) × [y0, y0 + h0)`` at ``scale`` level-0 px per px."""
        margin = max(self.reach_um / self.mpp, 2 * MIN_RADIUS_PX * scale) + scale
        lo, hi = np.searchsorted(self.x, [x0 - margin, x0 + w0 + margin])
        rows = np.arange(lo, hi)
        rows = rows[(self.y[rows] >= y0 - margin) & (self.y[rows] <= y0 + h0 + margin)]
        img, _ = rasterize(self.cells.iloc[rows], self.index[rows], w0, h0, self.mpp, scale=scale,
                           outline=self.outline, origin=(x0, y0))
        return png_bytes(img, self.palette)


def type_legend(types: list[str]) -> dict:
    """One legend chip per cell type, in the colours the layer draws."""
    return {"categories": [{"label": t.replace("_", " "), "color": "#%02x%02x%02x" % tuple(int(c) for c in col)}
                           for t, col in zip(types, type_colors(len(types)))]}


def composition(cells: pd.DataFrame, types: list[str], tile_idx: int | None = None) -> pd.DataFrame:
    """Cell-type fractions: one row per type (``cell type``, ``slide`` fraction, ``slide n``) and,
    with ``tile_idx``, the tile's (``tile``, ``tile n``). Fractions sum to 1 (0 with no cells)."""
    def counts(codes: np.ndarray) -> np.ndarray:
        return np.bincount(codes.astype(np.int64), minlength=len(types))[:len(types)]

    codes = cells["type"].to_numpy()
    n = counts(codes)
    out = pd.DataFrame({"cell type": [t.replace("_", " ") for t in types],
                        "slide": n / max(n.sum(), 1), "slide n": n})
    if tile_idx is not None:
        m = counts(codes[cells["tile_idx"].to_numpy() == int(tile_idx)])
        out["tile"], out["tile n"] = m / max(m.sum(), 1), m
    return out


def tile_values(tiles: pd.DataFrame, cells: pd.DataFrame, *, by: str = "type") -> pd.DataFrame:
    """Per-tile values of a cell layer (for the clicked tile's panel): ``value`` = the tile's
    number of cells (``by="type"``) or the mean of its cells' values (``by="value"``)."""
    grouped = cells.groupby("tile_idx")
    per = grouped.size() if by == "type" else grouped["value"].mean()
    out = tiles[["tile_idx", "x", "y", "tissue"]].copy()
    out["value"] = out["tile_idx"].map(per).astype(np.float64)
    if by == "type":
        out["value"] = out["value"].fillna(0.0)
    return out


def summary_caption(cells: pd.DataFrame, types: list[str], mpp: float, width: int, height: int) -> str:
    if not len(cells):
        return "no cells"
    comp = composition(cells, types)
    top = comp.sort_values("slide", ascending=False).iloc[0]
    scale = image_scale(width, height, MAX_PX)
    drawn = (f"drawn at {scale * mpp:.2g} µm/px" if scale <= 1 else
             f"drawn tile by tile, at {mpp:.2g} µm/px at full zoom")
    return f"{len(cells):,} cells · most common {top['cell type']} ({top['slide']:.0%}) · {drawn}"
