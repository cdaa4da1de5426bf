"""Cells of one tile: every nucleus found as a record (centroid, outline ellipse, morphology and
nucleus-class probabilities), ready for typing against a reference (:mod:`core.analysis.cells`).

A cell here is its nucleus (as in GHIST's nucleus-anchored cells): the outline is the nucleus's
moment ellipse (major/minor axes and orientation), which QuPath and the viewer draw as a polygon.
Records are float32 rows of :data:`CELL_FIELDS`; ``cx, cy`` are in the tile's level-0 pixels
(offsets from the tile's top-left corner), sizes in µm. The loader workers call
:func:`detect_cells` on every tile of a ``--cells`` run, while the model runs on earlier batches.
"""
from __future__ import annotations

import numpy as np

from core.wsi.nuclei import CLASSES, segment_nuclei

# µm/px at which nuclei are segmented for cells: sharper than the model's 1 µm/px of the demo
# model (measured on the demo truth in benchmarks.nuclei_bench), read as a second, sharper crop.
CELL_MPP = 0.5
MORPHOLOGY = ["area_um2", "major_um", "minor_um", "eccentricity", "solidity", "h_mean", "h_rel",
              "h_core_ratio", "e_ring", "density"]
CELL_FIELDS = ["cx", "cy", "angle", *MORPHOLOGY, *(f"p_{c}" for c in CLASSES)]
_F = {name: i for i, name in enumerate(CELL_FIELDS)}
_P0 = _F[f"p_{CLASSES[0]}"]


def field(records: np.ndarray, name: str) -> np.ndarray:
    """One column of cell records by name."""
    return records[:, _F[name]]


def class_probs(records: np.ndarray) -> np.ndarray:
    """``(n, len(CLASSES))`` nucleus-class probabilities of cell records."""
    return records[:, _P0:_P0 + len(CLASSES)]


def orientation(labels: np.ndarray, n: int) -> np.ndarray:
    """Angle (radians, image axes: x right, y down) of each label's major axis, labels 1..n."""
    idx = np.flatnonzero(labels)
    if n == 0 or idx.size == 0:
        return np.zeros(n)
    lab = labels.ravel()[idx]
    width = labels.shape[1]
    x, y = (idx % width).astype(np.float64), (idx // width).astype(np.float64)
    count = np.maximum(np.bincount(lab, minlength=n + 1)[1:], 1)
    cx, cy = np.bincount(lab, x, n + 1)[1:] / count, np.bincount(lab, y, n + 1)[1:] / count
    dx, dy = x - np.r_[0, cx][lab], y - np.r_[0, cy][lab]
    mxx = np.bincount(lab, dx * dx, n + 1)[1:] / count
    myy = np.bincount(lab, dy * dy, n + 1)[1:] / count
    mxy = np.bincount(lab, dx * dy, n + 1)[1:] / count
    return 0.5 * np.arctan2(2 * mxy, mxx - myy)


def detect_cells(rgb: np.ndarray, *, mpp: float, scale: float = 1.0, classifier=None) -> np.ndarray:
    """Cell records (float32 ``(n, len(CELL_FIELDS))``) of a uint8 RGB patch at ``mpp`` µm/px.

    ``scale``: level-0 px per patch px, so ``cx, cy`` come out in level-0 px from the patch's
    corner. ``classifier``: a :class:`core.wsi.nuclei_classes.NucleusClassifier` (the rules when
    None). Nuclei touching nothing but the patch edge are kept: the tiles of a cells run do not
    overlap, so each nucleus is counted once, by the tile holding its centroid.
    """
    from core.wsi.nuclei_classes import NucleusClassifier

    labels, feats = segment_nuclei(rgb, mpp=mpp)
    n = len(feats)
    out = np.zeros((n, len(CELL_FIELDS)), np.float32)
    if n == 0:
        return out
    out[:, _F["cx"]] = feats["x"].to_numpy() * scale
    out[:, _F["cy"]] = feats["y"].to_numpy() * scale
    out[:, _F["angle"]] = orientation(labels, n)
    for name in MORPHOLOGY:
        out[:, _F[name]] = feats[name].to_numpy()
    out[:, _P0:_P0 + len(CLASSES)] = (classifier or NucleusClassifier()).predict_proba(feats)
    return out


def class_counts(records: np.ndarray) -> np.ndarray:
    """Nuclei per class (argmax of the class probabilities), int16 ``(len(CLASSES),)``."""
    if len(records) == 0:
        return np.zeros(len(CLASSES), np.int16)
    return np.bincount(class_probs(records).argmax(axis=1), minlength=len(CLASSES)).astype(np.int16)


def ellipse_polygon(cx, cy, major, minor, angle, *, vertices: int = 16) -> np.ndarray:
    """Outline polygons ``(n, vertices, 2)`` of ellipses (axes as full lengths, same unit as the
    centres), counter-clockwise in image axes; the ring is not closed."""
    cx, cy, major, minor, angle = (np.atleast_1d(np.asarray(v, np.float64)) for v in (cx, cy, major, minor, angle))
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    a, b = major[:, None] / 2, minor[:, None] / 2
    ca, sa = np.cos(angle)[:, None], np.sin(angle)[:, None]
    ex, ey = a * np.cos(t), b * np.sin(t)
    return np.stack([cx[:, None] + ex * ca - ey * sa, cy[:, None] + ex * sa + ey * ca], axis=-1)
