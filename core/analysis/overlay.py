"""Tile values as images: the grid of a slide's tiles (one cell per tile) and its colour mapping.

Used by the viewer's heatmap layer, the compare view and the figure exports, so that every view of
a layer draws the same colours for the same values. Coordinates are level-0 px, ``(x, y)`` top-left
of each tile; tiles sit on a regular grid of pitch ``tile_size``.
"""
from __future__ import annotations

import numpy as np

# Colour maps offered in the UI (matplotlib's, perceptually uniform first); categorical layers use tab20.
COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "RdBu_r", "coolwarm")


def grid_shape(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of the tile grid that covers a ``width`` × ``height`` level-0 slide."""
    return int(np.ceil(height / tile_size)), int(np.ceil(width / tile_size))


def tile_grid(xy: np.ndarray, values: np.ndarray, tile_size: int, width: int, height: int) -> np.ndarray:
    """A float grid [rows, cols] with each tile's value in its cell and NaN where no tile was kept."""
    rows, cols = grid_shape(width, height, tile_size)
    grid = np.full((rows, cols), np.nan, np.float32)
    xy = np.asarray(xy)
    if len(xy):
        r = np.clip((xy[:, 1] // tile_size).astype(np.int64), 0, rows - 1)
        c = np.clip((xy[:, 0] // tile_size).astype(np.int64), 0, cols - 1)
        grid[r, c] = np.asarray(values, np.float32)
    return grid


def value_range(values: np.ndarray, mode: str = "minmax") -> tuple[float, float]:
    """A colour range for ``values``: ``minmax`` or ``robust`` (2nd–98th percentile); never empty."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = (np.percentile(v, [2, 98]) if mode == "robust" else (v.min(), v.max()))
    if not hi > lo:
        hi = lo + 1e-6
    return float(lo), float(hi)


def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    if cmap not in COLORMAPS and cmap != "tab20":
        raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def colorize(grid: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis", *, alpha: int = 255) -> np.ndarray:
    """RGBA uint8 image of a float grid: NaN cells transparent, values clipped to [vmin, vmax]."""
    lut = _lut(cmap)
    g = np.asarray(grid, np.float64)
    finite = np.isfinite(g)
    scaled = np.zeros(g.shape, np.int64)
    span = (vmax - vmin) or 1e-6
    scaled[finite] = np.clip(np.rint((g[finite] - vmin) / span * 255), 0, 255).astype(np.int64)
    out = np.zeros(g.shape + (4,), np.uint8)
    out[..., :3] = lut[scaled]
    out[..., 3] = np.where(finite, alpha, 0)
    return out


def categorical_colors(n: int) -> np.ndarray:
    """[n, 3] uint8 distinct colours (tab20, cycled) for categorical layers such as domains."""
    lut = _lut("tab20")
    return lut[(np.arange(n) * 256 // 20 + 6) % 256] if n else np.zeros((0, 3), np.uint8)


def colorize_labels(grid: np.ndarray, n_labels: int, *, alpha: int = 255) -> np.ndarray:
    """RGBA image of an integer-valued grid (labels 0..n-1, NaN = no tile)."""
    colors = categorical_colors(max(n_labels, 1))
    g = np.asarray(grid, np.float64)
    finite = np.isfinite(g)
    out = np.zeros(g.shape + (4,), np.uint8)
    idx = np.where(finite, g, 0).astype(np.int64) % max(n_labels, 1)
    out[..., :3] = colors[idx]
    out[..., 3] = np.where(finite, alpha, 0)
    return out


def smooth_grid(grid: np.ndarray, sigma: float = 1.0, upsample: int = 4) -> np.ndarray:
    """A NaN-aware Gaussian smoothing (``sigma`` in grid cells) of a tile grid, upsampled
    ``upsample``× bilinearly so that the viewer's crisp drawing looks smooth; cells outside the
    kept tiles stay NaN (the tissue outline is kept at the grid's resolution)."""
    from scipy import ndimage

    g = np.asarray(grid, np.float64)
    finite = np.isfinite(g)
    if not finite.any():
        return np.repeat(np.repeat(g, upsample, 0), upsample, 1).astype(np.float32)
    v = ndimage.gaussian_filter(np.where(finite, g, 0.0), sigma, mode="constant") if sigma > 0 else np.where(finite, g, 0.0)
    w = ndimage.gaussian_filter(finite.astype(np.float64), sigma, mode="constant") if sigma > 0 else finite.astype(np.float64)
    if upsample > 1:
        shape = (g.shape[0] * upsample, g.shape[1] * upsample)
        v = _resize(v, shape)
        w = _resize(w, shape)
        finite = np.repeat(np.repeat(finite, upsample, 0), upsample, 1)
    out = np.full(v.shape, np.nan, np.float32)
    ok = finite & (w > 1e-6)
    out[ok] = (v[ok] / w[ok]).astype(np.float32)
    return out


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with pixel centres aligned (as an image resize)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((shape[1], shape[0]), Image.BILINEAR),
                      np.float64)


def png_bytes(rgba: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()
