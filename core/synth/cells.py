"""Cells of a laid-out section: where they sit, what they are, and what their nuclei look like.

Positions are micrometres (x right, y down, origin top-left). Nuclear sizes are full axis
lengths in µm; ``angle`` is the direction of the major axis in radians, measured from +x
towards +y (image convention).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from core.synth.reference import CELL_TYPES

GLASS, STROMA, TUMOUR, LUMEN, VESSEL, ADIPOSE, LYMPHOID, DUCT = range(8)
T = {t: i for i, t in enumerate(CELL_TYPES)}
NONE = -1


def hex_points(rng: np.random.Generator, width: float, height: float, spacing: float,
               jitter: float = 0.38) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal lattice over ``[0, width) × [0, height)`` (same units as ``spacing``)."""
    dy = spacing * np.sqrt(3) / 2
    rows, cols = int(height / dy) + 1, int(width / spacing) + 2
    y = np.repeat(np.arange(rows) * dy, cols)
    x = np.tile(np.arange(cols) * spacing, rows) - (np.repeat(np.arange(rows) % 2, cols) * spacing / 2)
    x = x + rng.uniform(-jitter, jitter, x.size) * spacing
    y = y + rng.uniform(-jitter, jitter, y.size) * spacing
    keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return x[keep], y[keep]


def _draw(rng, probs: np.ndarray, codes: list[int]) -> np.ndarray:
    """One categorical draw per row of ``probs`` (n × k, rows may sum < 1: the rest is 'no cell')."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None]
    k = (u > cum).sum(axis=1)
    return np.append(np.asarray(codes), NONE)[k]


def _sample(rng, comp, code, spacing_um, g, probs_fn):
    """Lattice points inside compartment ``code`` with types drawn from ``probs_fn(x, y)``."""
    h, w = comp.shape
    x, y = hex_points(rng, w, h, spacing_um * g)
    keep = comp[y.astype(int), x.astype(int)] == code
    x, y = x[keep], y[keep]
    probs, codes = probs_fn(x, y)
    types = _draw(rng, probs, codes)
    ok = types != NONE
    return x[ok] / g, y[ok] / g, types[ok], np.full(ok.sum(), code, np.uint8)


def populate(rng, comp: np.ndarray, params, *, grid_um: float, glands: np.ndarray,
             vessels: np.ndarray, direction: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All nucleated cells (with morphology) and the red cells inside vessel lumens."""
    g = 1.0 / grid_um
    im = params.immune
    n_all = lambda x, p: np.tile(np.asarray(p, float), (len(x), 1))  # noqa: E731
    tumour_dist = _distance_um(comp == TUMOUR, g)

    def stroma_probs(x, y):
        d = tumour_dist[y.astype(int), x.astype(int)]
        p_t = 0.045 * im * (1 + 2.0 * np.exp(-d / 60.0))
        cols = [np.full(len(x), 0.05 + 0.10 * params.stroma), p_t, np.full(len(x), 0.004 + 0.025 * im),
                np.full(len(x), 0.008)]
        return np.column_stack(cols), [T["fibroblast"], T["t_cell"], T["b_plasma"], T["macrophage"]]

    tumour_spacing = {"LumA": 12.0, "LumB": 11.5, "Her2": 13.0, "Basal": 11.0, "Normal": 11.5}[params.subtype]
    p_til = 0.008 + 0.05 * im
    parts = [
        _sample(rng, comp, TUMOUR, tumour_spacing, g, lambda x, y: (
            n_all(x, [p_til, 0.015, 0.004, 1 - p_til - 0.02]),
            [T["t_cell"], T["macrophage"], T["b_plasma"], T["malignant_epithelial"]])),
        _sample(rng, comp, STROMA, 8.0, g, stroma_probs),
        _sample(rng, comp, LYMPHOID, 7.2, g, lambda x, y: (
            n_all(x, [0.58, 0.30, 0.07]), [T["t_cell"], T["b_plasma"], T["macrophage"]])),
        _sample(rng, comp, DUCT, 7.5, g, lambda x, y: (n_all(x, [0.97]), [T["normal_epithelial"]])),
        _sample(rng, comp, ADIPOSE, 30.0, g, lambda x, y: (n_all(x, [0.04]), [T["fibroblast"]])),
    ]
    ex, ey, eang = _endothelium(rng, vessels, comp, g)
    parts.append((ex, ey, np.full(len(ex), T["endothelial"]), np.full(len(ex), VESSEL, np.uint8)))
    x, y, types, where = (np.concatenate(a) for a in zip(*parts))
    cycling = (types == T["malignant_epithelial"]) & (rng.random(len(types)) < params.cycling_frac)
    types[cycling] = T["cycling_malignant"]
    cells = _morphology(rng, x, y, types, params.subtype)
    angle = cells["angle"].to_numpy().copy()
    angle[len(x) - len(ex):] = eang
    cells["angle"] = angle.astype(np.float32)
    _orient(rng, cells, glands, direction, g)
    cells["compartment"] = pd.Categorical.from_codes(where.astype(int), _COMPARTMENT_NAMES)
    return cells, _red_cells(rng, vessels)


_COMPARTMENT_NAMES = ["glass", "stroma", "tumour", "lumen", "vessel", "adipose", "lymphoid", "duct"]


def _distance_um(mask: np.ndarray, g: float) -> np.ndarray:
    """Distance (µm) to the nearest ``mask`` pixel, on an 8× coarser lattice, nearest-upsampled."""
    if not mask.any():
        return np.full(mask.shape, 1e6, np.float32)
    coarse = ndimage.distance_transform_edt(~mask[::8, ::8]).astype(np.float32) * 8 / g
    return np.repeat(np.repeat(coarse, 8, 0), 8, 1)[: mask.shape[0], : mask.shape[1]]


def _endothelium(rng, vessels: np.ndarray, comp: np.ndarray, g: float):
    """Flat endothelial nuclei lining every vessel, major axis tangent to the wall."""
    if len(vessels) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    vx, vy, rx, ry, va = vessels.T
    perim = np.pi * (3 * (rx + ry) - np.sqrt((3 * rx + ry) * (rx + 3 * ry)))
    n = np.maximum(2, (perim / 13.0).astype(int))
    idx = np.repeat(np.arange(len(vessels)), n)
    k = np.arange(idx.size) - np.repeat(np.cumsum(n) - n, n)
    t = 2 * np.pi * (k + rng.uniform(-0.3, 0.3, idx.size)) / n[idx] + rng.uniform(0, 6.3, len(vessels))[idx]
    a, b = rx[idx] + 1.2, ry[idx] + 1.2
    lx, ly = a * np.cos(t), b * np.sin(t)
    c, s = np.cos(va[idx]), np.sin(va[idx])
    x, y = vx[idx] + lx * c - ly * s, vy[idx] + lx * s + ly * c
    tx, ty = -a * np.sin(t), b * np.cos(t)
    ang = np.arctan2(tx * s + ty * c, tx * c - ty * s)
    h, w = comp.shape
    ok = (x >= 0) & (y >= 0) & (x < w / g) & (y < h / g)
    ok[ok] &= comp[(y[ok] * g).astype(int), (x[ok] * g).astype(int)] != GLASS
    return x[ok], y[ok], ang[ok]


def _red_cells(rng, vessels: np.ndarray) -> pd.DataFrame:
    """Erythrocytes (≈7 µm discs) scattered in vessel lumens."""
    cols = ["x_um", "y_um", "major_um", "minor_um", "angle"]
    if len(vessels) == 0:
        return pd.DataFrame(columns=cols, dtype=np.float32)
    vx, vy, rx, ry, va = vessels.T
    n = rng.poisson(rng.uniform(0.05, 0.9, len(vessels)) * np.pi * rx * ry / 45.0)
    idx = np.repeat(np.arange(len(vessels)), n)
    r, t = 0.8 * np.sqrt(rng.random(idx.size)), rng.uniform(0, 2 * np.pi, idx.size)
    lx, ly = np.maximum(rx[idx] - 3, 0.5) * r * np.cos(t), np.maximum(ry[idx] - 3, 0.5) * r * np.sin(t)
    c, s = np.cos(va[idx]), np.sin(va[idx])
    major = rng.uniform(6.5, 7.8, idx.size)
    return pd.DataFrame({"x_um": vx[idx] + lx * c - ly * s, "y_um": vy[idx] + lx * s + ly * c,
                         "major_um": major, "minor_um": major * rng.uniform(0.55, 1.0, idx.size),
                         "angle": rng.uniform(0, np.pi, idx.size)}).astype(np.float32)


# type → (major µm low, high), minor/major ratio (low, high), darkness (low, high)
_SHAPE = {
    "malignant_epithelial": ((10.0, 14.0), (0.65, 0.92), (0.62, 0.80)),
    "cycling_malignant": ((11.5, 15.5), (0.68, 0.92), (0.88, 1.05)),
    "normal_epithelial": ((7.0, 9.0), (0.65, 0.85), (0.80, 0.95)),
    "fibroblast": ((11.0, 17.0), (0.13, 0.2), (0.8, 0.95)),
    "endothelial": ((10.0, 15.0), (0.18, 0.26), (0.75, 0.90)),
    "t_cell": ((6.0, 7.2), (0.85, 1.0), (1.00, 1.15)),
    "b_plasma": ((7.0, 8.5), (0.82, 0.98), (0.90, 1.02)),
    "macrophage": ((9.0, 12.0), (0.55, 0.75), (0.62, 0.76)),
}
_GRADE = {"LumA": 0.92, "LumB": 1.0, "Her2": 1.18, "Basal": 1.08, "Normal": 0.9}


def _morphology(rng, x, y, types, subtype: str) -> pd.DataFrame:
    """Nuclear size, shape, orientation and darkness by type; a few cycling cells in mitosis."""
    n = len(types)
    major, ratio, dark = np.zeros(n), np.zeros(n), np.zeros(n)
    for name, ((m0, m1), (r0, r1), (d0, d1)) in _SHAPE.items():
        sel = types == T[name]
        major[sel] = rng.uniform(m0, m1, sel.sum())
        ratio[sel] = rng.uniform(r0, r1, sel.sum())
        dark[sel] = rng.uniform(d0, d1, sel.sum())
    malignant = (types == T["malignant_epithelial"]) | (types == T["cycling_malignant"])
    grade = _GRADE[subtype]
    # pleomorphism: size spread grows with grade (Her2 / Basal nuclei vary the most)
    major[malignant] *= grade * np.exp(rng.normal(0, 0.06 + 0.25 * (grade - 0.9), malignant.sum()))
    mitotic = (types == T["cycling_malignant"]) & (rng.random(n) < 0.05)
    major[mitotic] = rng.uniform(8.0, 11.0, mitotic.sum())
    ratio[mitotic] = rng.uniform(0.3, 0.45, mitotic.sum())
    dark[mitotic] = rng.uniform(1.25, 1.4, mitotic.sum())
    return pd.DataFrame({
        "x_um": x.astype(np.float32), "y_um": y.astype(np.float32),
        "cell_type": pd.Categorical.from_codes(types.astype(int), CELL_TYPES),
        "major_um": major.astype(np.float32), "minor_um": (major * ratio).astype(np.float32),
        "angle": rng.uniform(0, np.pi, n).astype(np.float32), "darkness": dark.astype(np.float32),
        "mitotic": mitotic,
    })


def _orient(rng, cells: pd.DataFrame, glands: np.ndarray, direction: np.ndarray, g: float) -> None:
    """Spindle cells follow the collagen; gland cells point their long axis at the lumen."""
    x, y = cells["x_um"].to_numpy() * g, cells["y_um"].to_numpy() * g
    angle = cells["angle"].to_numpy().copy()
    types = cells["cell_type"].cat.codes.to_numpy()
    spindle = types == T["fibroblast"]
    h, w = direction.shape
    xi = np.clip(x[spindle].astype(int), 0, w - 1)
    yi = np.clip(y[spindle].astype(int), 0, h - 1)
    angle[spindle] = direction[yi, xi] + rng.normal(0, 0.15, spindle.sum())
    malignant = (types == T["malignant_epithelial"]) | (types == T["cycling_malignant"])
    if len(glands) and malignant.any():
        d, k = cKDTree(glands[:, :2]).query(np.column_stack([x[malignant], y[malignant]]) / g)
        inside = d < glands[k, 2]
        dx = x[malignant] / g - glands[k, 0]
        dy = y[malignant] / g - glands[k, 1]
        radial = np.arctan2(dy, dx)
        angle[malignant] = np.where(inside, radial, angle[malignant])
    cells["angle"] = angle.astype(np.float32)
