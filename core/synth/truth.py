"""Ground truth per tile: true cell-type composition and expected expression.

Used to check predictions against what the synthetic world really contains.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.synth.reference import CELL_TYPES


def cells_in_tiles(cells: pd.DataFrame, tiles_xy: np.ndarray, tile_size_px: int, mpp: float) -> sp.csr_matrix:
    """Membership matrix (tiles × cells, 0/1): cell centre inside ``[x, x+size) × [y, y+size)``.

    ``tiles_xy`` are top-left corners (x, y) in level-0 px; ``mpp`` is level-0 µm/px, so a cell
    at ``x_um`` sits at ``x_um / mpp`` px. Tiles may overlap; a cell can belong to several.
    """
    tiles_xy = np.asarray(tiles_xy, dtype=np.float64).reshape(-1, 2)
    px = cells["x_um"].to_numpy(np.float64) / mpp
    py = cells["y_um"].to_numpy(np.float64) / mpp
    if len(tiles_xy) == 0 or len(px) == 0:
        return sp.csr_matrix((len(tiles_xy), len(px)))
    order = np.argsort(px, kind="stable")
    sx = px[order]
    lo = np.searchsorted(sx, tiles_xy[:, 0], side="left")
    hi = np.searchsorted(sx, tiles_xy[:, 0] + tile_size_px, side="left")
    counts = hi - lo
    tile_idx = np.repeat(np.arange(len(tiles_xy)), counts)
    # cells whose x falls in each tile's column band, then keep those whose y also fits
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cell_idx = order[np.repeat(lo, counts) + offsets]
    y0 = tiles_xy[tile_idx, 1]
    inside = (py[cell_idx] >= y0) & (py[cell_idx] < y0 + tile_size_px)
    data = np.ones(int(inside.sum()), np.float64)
    return sp.csr_matrix((data, (tile_idx[inside], cell_idx[inside])), shape=(len(tiles_xy), len(px)))


def tile_truth(cells: pd.DataFrame, tiles_xy: np.ndarray, tile_size_px: int, mpp: float,
               profiles: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-tile composition fractions (N × CELL_TYPES) and expected expression (N × genes).

    Expression is the sum of the ``profiles`` rows (cell types × genes, expected counts per
    cell, e.g. :func:`~core.synth.reference.expected_profiles`) of the cells in the tile,
    library-size normalised to 1e4 and log1p-transformed. Tiles without cells get all-zero
    fractions and zero expression. Row order follows ``tiles_xy``.
    """
    member = cells_in_tiles(cells, tiles_xy, tile_size_px, mpp)
    codes = pd.Categorical(cells["cell_type"].astype(str), categories=CELL_TYPES).codes
    if (codes < 0).any():
        raise ValueError(f"cells has unknown cell types; expected a subset of {CELL_TYPES}")
    onehot = sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)),
                           shape=(len(codes), len(CELL_TYPES)))
    counts = np.asarray((member @ onehot).todense())
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    prof = profiles.reindex(CELL_TYPES).fillna(0.0)
    expr = counts @ prof.to_numpy(np.float64)
    lib = expr.sum(axis=1, keepdims=True)
    expr = np.log1p(np.divide(expr, lib, out=np.zeros_like(expr), where=lib > 0) * 1e4)
    index = pd.RangeIndex(len(counts), name="tile")
    return (pd.DataFrame(fractions, index=index, columns=CELL_TYPES),
            pd.DataFrame(expr, index=index, columns=list(profiles.columns)))
