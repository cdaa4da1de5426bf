"""Moran's I on tile grids: known values for smooth, checkerboard and random fields."""
import numpy as np

from core.analysis.spatial import grid_neighbours, morans_i


def grid(w, h, size=224):
    xs, ys = np.meshgrid(np.arange(w) * size, np.arange(h) * size)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def test_neighbours_of_a_full_grid():
    pairs = grid_neighbours(grid(4, 3), 224)
    assert len(pairs) == 3 * 3 + 4 * 2  # horizontal + vertical edges
    xy = grid(4, 3)
    d = np.abs(xy[pairs[:, 0]] - xy[pairs[:, 1]]).sum(axis=1)
    assert (d == 224).all()


def test_holes_are_not_bridged():
    xy = grid(5, 1)
    keep = np.array([0, 1, 3, 4])  # tile 2 has no tissue
    assert len(grid_neighbours(xy[keep], 224)) == 2


def test_morans_i_signs():
    xy = grid(20, 20)
    pairs = grid_neighbours(xy, 224)
    gx, gy = xy[:, 0] / 224, xy[:, 1] / 224
    smooth = gx + gy
    checker = ((gx + gy) % 2) * 2 - 1
    noise = np.random.default_rng(0).normal(size=len(xy))
    i = morans_i(np.stack([smooth, checker, noise, np.ones(len(xy))], axis=1), pairs)
    assert i[0] > 0.8 and i[1] < -0.95 and abs(i[2]) < 0.1 and np.isnan(i[3])
