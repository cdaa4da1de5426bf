"""Spatial statistics of tile-level predictions on a slide's regular tile grid, and the per-slide summary."""
from __future__ import annotations

import numpy as np


def grid_neighbours(xy: np.ndarray, size: int) -> np.ndarray:
    """Pairs (i, j), i < j, of tiles that share an edge (rook adjacency) on a grid of pitch ``size``."""
    cells = np.round(np.asarray(xy) / size).astype(np.int64)
    if len(cells) == 0:
        return np.zeros((0, 2), np.int64)
    cells -= cells.min(axis=0)
    width = int(cells[:, 0].max()) + 2
    code = cells[:, 1] * width + cells[:, 0]
    order = np.argsort(code)
    sorted_code = code[order]
    pairs = []
    for step in (1, width):  # right and down neighbours
        pos = np.searchsorted(sorted_code, code + step)
        hit = (pos < len(code)) & (sorted_code[np.minimum(pos, len(code) - 1)] == code + step)
        pairs.append(np.stack([np.nonzero(hit)[0], order[pos[hit]]], axis=1))
    return np.concatenate(pairs)


def morans_i(values: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Moran's I per column of ``values`` [N, G] with binary symmetric weights from ``pairs``.

    I = (N / W) · Σ_ij w_ij z_i z_j / Σ_i z_i² (W = Σ w_ij, both directions counted). ≈ 0 for
    spatially random values, → 1 for smooth fields; NaN without neighbours or variance.
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if n < 3 or len(pairs) == 0:
        return np.full(values.shape[1], np.nan)
    z = values - values.mean(axis=0)
    cross = 2.0 * (z[pairs[:, 0]] * z[pairs[:, 1]]).sum(axis=0)
    denom = (z ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (n / (2.0 * len(pairs))) * cross / denom
    return np.where(denom > 0, out, np.nan)


def slide_summary(expression: np.ndarray, xy: np.ndarray, tile_size: int, genes: list[str]):
    """Per gene of one slide: mean, median, 90th percentile and Moran's I of the tile predictions
    (``expression`` [N, G], tiles at level-0 top-left ``xy`` on a grid of pitch ``tile_size``).
    What :meth:`core.store.db.Store.write_run` stores in ``slide_summary``."""
    import pandas as pd

    expression = np.asarray(expression)
    q = np.quantile(expression, [0.5, 0.9], axis=0)
    moran = morans_i(expression, grid_neighbours(xy, tile_size))
    return pd.DataFrame({"gene": list(genes), "mean": expression.mean(axis=0), "median": q[0], "q90": q[1],
                         "morans_i": moran.astype(np.float32)})
