"""Per-patch cell composition from nuclei: segmentation → morphology → classes → weights.

A classical stand-in for HoVer-Net (no weights offline): colour deconvolution, a bounded Otsu
threshold on the hematoxylin optical density (OD), marker watershed, per-nucleus features in
physical units, a nucleus classifier (transparent rules or a small fitted model), and the class
fractions of each patch. Patches are uint8 RGB ``(H, W, 3)``; ``mpp`` is µm per patch pixel;
centroids are patch pixels ``(x, y)``. Speed: 25–35 ms CPU per 224-px patch at 0.5 µm/px
(≈ 30–40 patches/s per core).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

log = logging.getLogger(__name__)

CLASSES = ["neoplastic", "inflammatory", "connective", "epithelial", "other"]
FEATURES = ["area_um2", "diameter_um", "major_um", "minor_um", "eccentricity", "solidity",
            "h_mean", "h_std", "h_rel", "h_core_ratio", "e_ring", "density"]
COLUMNS = FEATURES + ["x", "y"]

# Ruifrok & Johnston (2001) hematoxylin and eosin OD vectors; the third row completes the basis.
_OD_H = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
_OD_E = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])
_UNMIX = np.linalg.inv(np.stack([_OD_H, _OD_E, np.cross(_OD_H, _OD_E)])).astype(np.float32)
# Real stains rarely match those vectors: dense eosin (collagen) leaks ≈ 0.3–0.7 OD into the H
# channel per OD of E (CMU-1: stroma at H ≈ 0.9, E ≈ 0.9). Nuclei carry little E, so subtracting
# 0.4 E costs them little and pushes stroma below the thresholds.
_EOSIN_LEAK = 0.4
# Nuclei are found on that stain minus its local floor (a grey opening by a 16 µm square, wider
# than any nucleus), so glass, stroma and basophilic cytoplasm sit near 0. Otsu on the top-hat
# seeds the dark nuclei; seeds grow down to half of it, which takes in pale (vesicular) nuclei
# touching a seed. The floor keeps a nucleus-free patch empty (noise and stroma fibres stay
# below 0.4 top-hat OD; the rim of even a pale nucleus exceeds 0.5); the cap keeps a patch packed
# with very dark nuclei (OD 4–5 on dark scans) from losing nuclei of ordinary darkness.
_SEED_FLOOR, _SEED_CAP, _GROW_RATIO, _GROW_FLOOR = 0.5, 3.0, 0.5, 0.15
_FLOOR_WINDOW_UM = 16.0
# Objects kept (µm²): < 12 (≈ 3.9 µm across) is debris or a chromatin fragment; > 450 (≈ 24 µm
# across) an unsplit clump. Holes up to 90 µm² are pale nuclear interiors and are filled; larger
# ones are lumens ringed by nuclei.
_MIN_AREA_UM2, _MAX_AREA_UM2, _MAX_HOLE_UM2 = 12.0, 450.0, 90.0
# Watershed markers: maxima of the summed distance maps, one per 3.5 µm window (touching
# lymphocytes sit ≥ 6 µm apart), at least 1 µm deep. Pale maps weigh more than the whole mask,
# so packed vesicular nuclei split at their rims (measured on the synthetic world: recall
# 0.74 → 0.84 at equal precision). A rim is a pixel 0.02 OD above its 1.5 µm neighbourhood.
_MARKER_WINDOW_UM, _MARKER_MIN_DEPTH_UM, _W_MASK, _W_PALE = 3.5, 1.0, 0.5, 1.5
_RIM_SIGMA_UM, _RIM_CONTRAST, _CORE_MIN_UM2 = 1.5, 0.02, 4.0
_CORE_DEPTH_UM, _RING_UM, _DENSITY_UM = 1.5, 2.0, 20.0  # vesicularity rim, cytoplasm ring, neighbourhood


def stain_density(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities (float32 ``(H, W)`` each, natural-log OD)."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    # per-channel sums, not a matmul: a threaded BLAS would spend more on threads than on 3 × 2 MACs
    h = od[..., 0] * _UNMIX[0, 0] + od[..., 1] * _UNMIX[1, 0] + od[..., 2] * _UNMIX[2, 0]
    return h, od[..., 0] * _UNMIX[0, 1] + od[..., 1] * _UNMIX[1, 1] + od[..., 2] * _UNMIX[2, 1]


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of a float array, by a histogram sweep."""
    hist, edges = np.histogram(values, bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * mids)
    mu0, mu1 = m0 / np.maximum(w0, 1), (m0[-1] - m0) / np.maximum(w0[-1] - w0, 1)
    return float(mids[np.argmax((w0 * (w0[-1] - w0) * (mu0 - mu1) ** 2)[:-1])])


def _grow1(mask: np.ndarray) -> np.ndarray:
    """``mask`` dilated by one pixel (4-connected)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def nuclei_mask(s: np.ndarray, *, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(all nuclei, dark nuclei) boolean masks from the smoothed nuclear stain ``s`` (OD)."""
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import remove_small_holes

    size = max(3, int(round(_FLOOR_WINDOW_UM / mpp)) | 1)
    tophat = s - ndimage.maximum_filter(ndimage.minimum_filter(s, size), size)
    seed = float(np.clip(_otsu(tophat.ravel()), _SEED_FLOOR, _SEED_CAP))
    mask = apply_hysteresis_threshold(tophat, max(_GROW_FLOOR, _GROW_RATIO * seed), seed)
    mask = remove_small_holes(mask, max_size=int(_MAX_HOLE_UM2 / mpp ** 2))
    if mpp < 0.8:  # shave one-pixel spurs and bridges (at coarser scans they are real detail)
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    return mask, mask & (tophat > seed)


def _distance(mask: np.ndarray) -> np.ndarray:
    """Octagonal distance to the background (px; within 6 % of Euclidean, 5× faster than EDT)."""
    chess = ndimage.distance_transform_cdt(mask, "chessboard")
    return (chess + ndimage.distance_transform_cdt(mask, "taxicab")).astype(np.float32) * np.float32(0.5)


def vesicle_cores(ridge: np.ndarray, mask: np.ndarray, *, mpp: float) -> np.ndarray:
    """Pale interiors of vesicular nuclei: non-``ridge`` regions enclosed by a ridge (the dark
    membrane), of a nuclear interior's size (4–90 µm²), touching ``mask``. Bool ``(H, W)``."""
    labels, n = ndimage.label(~ridge)
    area = np.bincount(labels.ravel(), minlength=n + 1) * mpp ** 2
    ok = (area >= _CORE_MIN_UM2) & (area <= _MAX_HOLE_UM2)
    ok[np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]]] = False  # open to the patch edge
    ok &= np.bincount(labels[_grow1(mask)], minlength=n + 1) > 0
    ok[0] = False
    return ok[labels]


def split_nuclei(s: np.ndarray, mask: np.ndarray, dark: np.ndarray, *, mpp: float) -> np.ndarray:
    """Marker watershed of summed distance maps; int32 labels (0 = background).

    ``dist(mask)`` gives one hill per isolated nucleus, ``dist(dark)`` a peak on each dark
    nucleus of a packed cluster, ``dist(mask − ridges)`` a peak in each pale interior of packed
    vesicular nuclei. Enclosed interiors (:func:`vesicle_cores`) are markers of their own.
    """
    from skimage.segmentation import watershed

    ridge = s > ndimage.gaussian_filter(s, _RIM_SIGMA_UM / mpp) + _RIM_CONTRAST
    cores = vesicle_cores(ridge, mask, mpp=mpp)
    mask = mask | cores
    dist = _W_MASK * _distance(mask) + _distance(dark) + _W_PALE * _distance(mask & ~ridge)
    dist = ndimage.gaussian_filter(dist, 0.5 / mpp)
    window = max(3, int(round(_MARKER_WINDOW_UM / mpp)) | 1)
    peaks = (dist == ndimage.maximum_filter(dist, window)) & (dist > _MARKER_MIN_DEPTH_UM / mpp)
    if cores.any():
        peaks &= ~ndimage.maximum_filter(cores, 2 * window + 1)
    markers, _ = ndimage.label(peaks | cores, np.ones((3, 3), bool))  # a flat maximum is one marker
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def segment_nuclei(rgb: np.ndarray, *, mpp: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment the nuclei of a uint8 RGB patch at ``mpp`` µm/px.

    Returns ``(labels, features)``: int32 labels ``(H, W)`` (0 = background, 1..n = nuclei in
    the order of the feature rows) and a DataFrame with :data:`COLUMNS`: area µm², equivalent
    diameter and axes µm, eccentricity, solidity, mean/std hematoxylin OD, ``h_rel`` (mean H /
    the patch's median nucleus), ``h_core_ratio`` (H deeper than 1.5 µm / H of the rim; < 1 is
    vesicular), ``e_ring`` (mean eosin OD in a 2 µm ring: cytoplasm), ``density`` (neighbours
    within 20 µm, corrected for the disc's share inside the patch), centroid ``x, y`` (px).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB patch (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if not mpp or mpp <= 0:
        raise ValueError(f"mpp must be a positive µm/px, got {mpp!r}")
    h, e = stain_density(rgb[..., :3])
    s = ndimage.gaussian_filter(h - _EOSIN_LEAK * np.maximum(e, 0), 0.5 / mpp)
    mask, dark = nuclei_mask(s, mpp=mpp)
    labels = split_nuclei(s, mask, dark, mpp=mpp)
    area = np.bincount(labels.ravel()) * mpp ** 2
    keep = (area >= _MIN_AREA_UM2) & (area <= _MAX_AREA_UM2)
    keep[0] = False
    lut = np.zeros(len(area), np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1)
    labels = lut[labels]
    return labels, _features(labels, h, e, mpp)


def _group_mean(lab: np.ndarray, values: np.ndarray, n: int, fallback: float) -> np.ndarray:
    """Mean of ``values`` per label 1..n (``fallback`` where a label has no pixels)."""
    count = np.bincount(lab, minlength=n + 1)[1:]
    return np.where(count > 0, np.bincount(lab, values, n + 1)[1:] / np.maximum(count, 1), fallback)


def _moments(idx: np.ndarray, lab: np.ndarray, width: int, n: int, mpp: float) -> dict:
    """Area, centroid, equivalent ellipse (skimage's axis convention, pixels as unit squares)."""
    x, y = (idx % width).astype(np.float64), (idx // width).astype(np.float64)
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    cx, cy = np.bincount(lab, x, n + 1)[1:] / area, np.bincount(lab, y, n + 1)[1:] / area
    dx, dy = x - np.r_[0, cx][lab], y - np.r_[0, cy][lab]
    mxx, myy = _group_mean(lab, dx * dx, n, 0) + 1 / 12, _group_mean(lab, dy * dy, n, 0) + 1 / 12
    mxy = _group_mean(lab, dx * dy, n, 0)
    root = np.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    l1, l2 = (mxx + myy) / 2 + root, np.maximum((mxx + myy) / 2 - root, 1e-9)
    return {"area_um2": area * mpp ** 2, "diameter_um": 2 * np.sqrt(area / np.pi) * mpp,
            "major_um": 4 * np.sqrt(l1) * mpp, "minor_um": 4 * np.sqrt(l2) * mpp,
            "eccentricity": np.sqrt(1 - l2 / l1), "x": cx, "y": cy, "area_px": area}


def _solidity(labels: np.ndarray, area_px: np.ndarray, k: int = 32) -> np.ndarray:
    """Area / convex-hull area per label, the hull over pixel squares, as the circumscribed
    ``k``-gon of support lines (a disc's comes out 0.3 % large): vectorised, no per-nucleus loop."""
    edge = ndimage.minimum_filter(labels, 3, mode="constant") != labels  # outline and patch-edge pixels:
    edge |= ndimage.maximum_filter(labels, 3) != labels                   # all the hull needs
    edge &= labels > 0
    ys, xs = np.nonzero(edge)
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")
    starts = np.searchsorted(lab[order], np.arange(1, len(area_px) + 1))
    theta = np.arange(k) * (2 * np.pi / k)
    nx, ny = np.cos(theta), np.sin(theta)
    proj = xs[order, None] * nx + ys[order, None] * ny
    sup = np.maximum.reduceat(proj, starts, axis=0) + 0.5 * (np.abs(nx) + np.abs(ny))
    sup1, nx1, ny1 = np.roll(sup, -1, axis=1), np.roll(nx, -1), np.roll(ny, -1)
    det = np.sin(2 * np.pi / k)
    vx, vy = (sup * ny1 - sup1 * ny) / det, (sup1 * nx - sup * nx1) / det
    vx, vy = vx - vx.mean(axis=1, keepdims=True), vy - vy.mean(axis=1, keepdims=True)
    hull = 0.5 * np.abs(np.sum(vx * np.roll(vy, -1, axis=1) - np.roll(vx, -1, axis=1) * vy, axis=1))
    return np.minimum(area_px / np.maximum(hull, 1.0), 1.0)


def _core_ratio(labels: np.ndarray, h: np.ndarray, n: int, mpp: float) -> np.ndarray:
    """Mean H deeper than ``_CORE_DEPTH_UM`` in each nucleus / mean H of its rim (1 if no core)."""
    size = 2 * max(1, int(round(_CORE_DEPTH_UM / mpp))) + 1
    core = (ndimage.minimum_filter(labels, size) == labels) & (ndimage.maximum_filter(labels, size) == labels)
    core &= labels > 0
    rim = (labels > 0) & ~core
    ratio = _group_mean(labels[core], h[core].astype(np.float64), n, np.nan) / np.maximum(
        _group_mean(labels[rim], h[rim].astype(np.float64), n, np.nan), 1e-3)
    return np.where(np.isfinite(ratio), ratio, 1.0)


def _ring_eosin(labels: np.ndarray, e: np.ndarray, n: int, mpp: float) -> np.ndarray:
    """Mean eosin OD in a ``_RING_UM`` ring around each nucleus (ties go to the higher label)."""
    grown = ndimage.maximum_filter(labels, 2 * max(1, int(round(_RING_UM / mpp))) + 1)
    ring = (grown > 0) & (labels == 0)
    fallback = float(e[labels == 0].mean()) if (labels == 0).any() else 0.0  # packed: no ring
    return _group_mean(grown[ring], e[ring].astype(np.float64), n, fallback)


def _density(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], mpp: float) -> np.ndarray:
    """Neighbours within ``_DENSITY_UM``, divided by the share of that disc inside the patch."""
    from scipy.spatial import cKDTree

    r = _DENSITY_UM / mpp
    pts = np.column_stack([x, y])
    count = cKDTree(pts).query_ball_point(pts, r, return_length=True) - 1
    gx, gy = (v.ravel() for v in np.meshgrid(np.linspace(-r, r, 11), np.linspace(-r, r, 11)))
    keep = gx ** 2 + gy ** 2 <= r * r
    px, py = x[:, None] + gx[keep], y[:, None] + gy[keep]
    inside = ((px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])).mean(axis=1)
    return count / np.maximum(inside, 0.25)


def _features(labels: np.ndarray, h: np.ndarray, e: np.ndarray, mpp: float) -> pd.DataFrame:
    """Per-nucleus feature table (rows in label order 1..n); see :func:`segment_nuclei`."""
    n = int(labels.max())
    if n == 0:
        return pd.DataFrame({c: np.zeros(0) for c in COLUMNS})
    idx = np.flatnonzero(labels)
    lab = labels.ravel()[idx]
    f = _moments(idx, lab, labels.shape[1], n, mpp)
    hv = h.ravel()[idx].astype(np.float64)
    f["h_mean"] = _group_mean(lab, hv, n, 0.0)
    f["h_std"] = np.sqrt(np.maximum(_group_mean(lab, hv * hv, n, 0.0) - f["h_mean"] ** 2, 0))
    f["h_rel"] = f["h_mean"] / max(float(np.median(f["h_mean"])), 1e-3)
    f["solidity"] = _solidity(labels, f["area_px"])
    f["h_core_ratio"] = _core_ratio(labels, h, n, mpp)
    f["e_ring"] = _ring_eosin(labels, e, n, mpp)
    f["density"] = _density(f["x"], f["y"], labels.shape, mpp)
    return pd.DataFrame({c: np.asarray(f[c], np.float64) for c in COLUMNS})


# --- classes ------------------------------------------------------------------------------
# Rule thresholds from nuclear sizes in breast H&E (lymphocyte ≈ 5–7 µm, plasma cell ≈ 7–8 µm,
# carcinoma nuclei ≥ 1.5× a lymphocyte, fibroblast / endothelial nuclei spindle-shaped, ≤ 5 µm
# wide); masks run ≈ 1 µm wider than the nucleus (blur), hence the margins. Checked, not fitted,
# on the synthetic world. First match wins, in this order:
_RULE_MIN_AREA_UM2 = 16.0  # other: a fragment (the smallest lymphocyte nucleus is ≈ 4.5 µm across)
_RULE_PALE_REL = 0.6       # other: < 0.6× the patch's median nuclear H is cytoplasm or stroma
_RULE_SPINDLE = 0.88, 6.5  # connective: eccentricity ≥ 0.88 (axis ratio ≤ 0.47) and minor ≤ 6.5 µm
_RULE_SMALL_UM = 9.5       # inflammatory only up to this ⌀ (a plasma cell + 1 µm halo + 1 µm slack)
_RULE_DARK_REL = 1.2       # inflammatory: condensed chromatin, ≥ 1.2× the patch's median nuclear H
_RULE_ROUND_ECC = 0.85     # inflammatory: round (axis ratio ≥ 0.53), core ratio ≥ 1 (solid)
_RULE_VESICULAR = 0.9      # neoplastic: ⌀ > 9.5 µm, or core/rim H < 0.9 (open chromatin, thick membrane)
_RULE_EVEN_CORE = 1.2      # epithelial: medium, not dark, evenly filled (core/rim ≥ 1.2); else neoplastic
_LOG_FEATURES = ("area_um2", "diameter_um", "major_um", "minor_um", "h_std", "density")


def rule_classes(features: pd.DataFrame) -> np.ndarray:
    """The transparent default: a class index (into :data:`CLASSES`) per nucleus (see _RULE_*)."""
    col = lambda name: features[name].to_numpy()  # noqa: E731
    d, ecc, rel, core = col("diameter_um"), col("eccentricity"), col("h_rel"), col("h_core_ratio")
    conds = [col("area_um2") < _RULE_MIN_AREA_UM2, rel < _RULE_PALE_REL,
             (ecc >= _RULE_SPINDLE[0]) & (col("minor_um") <= _RULE_SPINDLE[1]),
             (d <= _RULE_SMALL_UM) & (rel >= _RULE_DARK_REL) & (ecc < _RULE_ROUND_ECC) & (core >= 1.0),
             (d > _RULE_SMALL_UM) | (core < _RULE_VESICULAR), (rel < _RULE_DARK_REL) & (core >= _RULE_EVEN_CORE)]
    other, conn, infl, neo, epi = 4, 2, 1, 0, 3
    return np.select(conds, [other, other, conn, infl, neo, epi], neo).astype(np.int64)


def _design(features: pd.DataFrame) -> np.ndarray:
    """Model inputs: :data:`FEATURES`, sizes and counts on a log scale (they are right-skewed)."""
    x = features[FEATURES].to_numpy(np.float64).copy()
    for name in _LOG_FEATURES:
        x[:, FEATURES.index(name)] = np.log1p(np.maximum(x[:, FEATURES.index(name)], 0))
    return x


class NucleusClassifier:
    """Nucleus features → :data:`CLASSES`: the rules (``kind='rules'``) or a fitted model.

    A fitted model is a standardiser and dense layers (``'logistic'``: one; ``'mlp'``: one
    hidden ReLU layer) kept as plain numbers: saved as JSON, predicted with numpy alone.
    """

    classes = CLASSES

    def __init__(self, kind: str = "rules", params: dict | None = None):
        if kind not in ("rules", "logistic", "mlp") or (kind != "rules" and not params):
            raise ValueError(f"kind {kind!r}: use 'rules', or fit() a 'logistic' or 'mlp' model")
        self.kind, self.params = kind, params or {}

    def __repr__(self) -> str:
        return f"NucleusClassifier(kind={self.kind!r})"

    def fit(self, features_list, labels_list, *, kind: str = "mlp", hidden: int = 32, seed: int = 0):
        """Fit on per-patch feature tables and their labels (class names or indices); returns self."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        x = _design(pd.concat(list(features_list), ignore_index=True))
        y = np.concatenate([_as_index(lab) for lab in labels_list])
        if len(x) != len(y) or len(np.unique(y)) < 2:
            raise ValueError(f"need one label per nucleus and ≥ 2 classes; got {len(x)} nuclei, {len(y)} labels")
        mean, std = x.mean(axis=0), x.std(axis=0)
        scale = np.where(std > 1e-9, std, 1.0)
        if kind not in ("logistic", "mlp"):
            raise ValueError(f"cannot fit kind {kind!r}: use 'logistic' or 'mlp'")
        model = (LogisticRegression(max_iter=2000) if kind == "logistic" else
                 MLPClassifier((hidden,), alpha=1e-3, learning_rate_init=3e-3, max_iter=500, early_stopping=True,
                               n_iter_no_change=20, random_state=seed)).fit((x - mean) / scale, y)
        layers = ([(model.coef_.T, model.intercept_)] if kind == "logistic"
                  else list(zip(model.coefs_, model.intercepts_)))
        if layers[-1][0].shape[1] == 1:  # binary: sklearn keeps one logit; softmax needs two
            w, b = layers[-1]
            layers[-1] = (np.hstack([-w / 2, w / 2]), np.r_[-b / 2, b / 2])
        self.kind = kind
        self.params = {"mean": mean.tolist(), "scale": scale.tolist(), "classes": model.classes_.tolist(),
                       "layers": [{"w": np.asarray(w).tolist(), "b": np.asarray(b).tolist()} for w, b in layers]}
        log.info("nuclei: fitted a %s classifier on %d nuclei %s", kind, len(y),
                 {CLASSES[c]: int((y == c).sum()) for c in np.unique(y)})
        return self

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Class probabilities ``(n, len(CLASSES))``; one-hot for the rules."""
        out = np.zeros((len(features), len(CLASSES)))
        if len(features) == 0:
            return out
        if self.kind == "rules":
            out[np.arange(len(features)), rule_classes(features)] = 1.0
            return out
        p = self.params
        a = (_design(features) - np.asarray(p["mean"])) / np.asarray(p["scale"])
        for i, layer in enumerate(p["layers"]):
            a = a @ np.asarray(layer["w"]) + np.asarray(layer["b"])
            a = np.maximum(a, 0) if i < len(p["layers"]) - 1 else np.exp(a - a.max(axis=1, keepdims=True))
        out[:, p["classes"]] = a / a.sum(axis=1, keepdims=True)
        return out

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Class index per nucleus (into :data:`CLASSES`)."""
        if self.kind == "rules":
            return rule_classes(features) if len(features) else np.zeros(0, np.int64)
        return self.predict_proba(features).argmax(axis=1)

    def save(self, path) -> None:
        """Write the classifier as JSON (plain numbers, no pickle)."""
        Path(path).write_text(json.dumps({"format": "tessera.nuclei.classifier", "version": 1, "classes": CLASSES,
                                          "features": FEATURES, "kind": self.kind, "params": self.params}))

    @classmethod
    def load(cls, path) -> "NucleusClassifier":
        """Read a classifier written by :meth:`save`; refuses other class or feature lists."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "tessera.nuclei.classifier" or doc.get("classes") != CLASSES \
                or doc.get("features") != FEATURES:
            raise ValueError(f"{path}: not a nucleus classifier for these classes and features")
        return cls(doc["kind"], doc["params"])


def label_nuclei(labels: np.ndarray, features: pd.DataFrame, truth_xy: np.ndarray, truth_classes, *,
                 mpp: float, radius_um: float = 4.0) -> np.ndarray:
    """Training labels from annotated cell centres ``truth_xy`` ``(m, 2)`` (patch px, x, y).

    Each nucleus takes the class of the centre nearest its centroid among those inside its
    mask or within ``radius_um``; a nucleus with none (debris, red cell, fragment) is "other".
    """
    out = np.full(len(features), CLASSES.index("other"), np.int64)
    truth_xy, cls = np.asarray(truth_xy, np.float64).reshape(-1, 2), _as_index(truth_classes)
    if len(features) == 0 or len(truth_xy) == 0:
        return out
    tx = np.clip(truth_xy[:, 0].astype(int), 0, labels.shape[1] - 1)
    ty = np.clip(truth_xy[:, 1].astype(int), 0, labels.shape[0] - 1)
    fx, fy = features["x"].to_numpy()[:, None], features["y"].to_numpy()[:, None]
    d = np.hypot(fx - truth_xy[:, 0], fy - truth_xy[:, 1])
    ok = (d <= radius_um / mpp) | (labels[ty, tx][None, :] == np.arange(1, len(features) + 1)[:, None])
    d = np.where(ok, d, np.inf)
    has = np.isfinite(d.min(axis=1))
    out[has] = cls[d[has].argmin(axis=1)]
    return out


def _as_index(labels) -> np.ndarray:
    """Class names or indices → int64 indices into :data:`CLASSES`."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    lookup = {c: i for i, c in enumerate(CLASSES)}
    unknown = sorted({str(v) for v in arr} - set(lookup))
    if unknown:
        raise ValueError(f"unknown nucleus classes {unknown}; expected some of {CLASSES}")
    return np.array([lookup[str(v)] for v in arr], np.int64)


# --- composition ----------------------------------------------------------------------------
_RULES = NucleusClassifier()


def _counts(patches, mpp: float, classifier: NucleusClassifier | None) -> np.ndarray:
    """Nuclei per class ``(N, len(CLASSES))`` of a sequence of patches."""
    out = np.zeros((len(patches), len(CLASSES)), np.int64)
    for i, rgb in enumerate(patches):
        out[i] = np.bincount((classifier or _RULES).predict(segment_nuclei(rgb, mpp=mpp)[1]), minlength=len(CLASSES))
    return out


def _fractions(counts: np.ndarray) -> np.ndarray:
    """Rows of counts → rows of fractions; an all-zero row → uniform."""
    total = counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1), 1.0 / counts.shape[1])


def composition(rgb: np.ndarray, *, mpp: float, classifier: NucleusClassifier | None = None,
                return_count: bool = False):
    """Class fractions ``(len(CLASSES),)`` (sum 1) of one patch's nuclei at ``mpp`` µm/px.

    No nuclei → uniform; ``return_count=True`` returns ``(fractions, n_nuclei)`` so a caller can
    tell that fallback (0 nuclei) from an estimate. ``classifier=None`` uses the rules.
    """
    counts = _counts([rgb], mpp, classifier)
    return (_fractions(counts)[0], int(counts.sum())) if return_count else _fractions(counts)[0]


def compositions(patches, *, mpp: float, classifier: NucleusClassifier | None = None, workers: int = 1,
                 chunk: int = 32, return_counts: bool = False):
    """Class fractions ``(N, len(CLASSES))`` of many patches (``(N, H, W, 3)`` array or a list).

    ``workers > 1`` spreads chunks of ``chunk`` patches over a process pool. Rows without
    nuclei are uniform (logged); ``return_counts=True`` also returns the per-class nucleus
    counts ``(N, len(CLASSES))``, whose zero rows mark that fallback.
    """
    jobs = [patches[i:i + chunk] for i in range(0, len(patches), chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork is fast but unsafe once threads exist (e.g. inside Streamlit): spawn there
        method = "fork" if threading.active_count() == 1 and os.name == "posix" else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            parts = list(pool.map(_counts, jobs, [mpp] * len(jobs), [classifier] * len(jobs)))
    else:
        parts = [_counts(job, mpp, classifier) for job in jobs]
    counts = np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.int64)
    if (empty := int((counts.sum(axis=1) == 0).sum())):
        log.info("nuclei: %d of %d patches without nuclei got the uniform composition", empty, len(counts))
    return (_fractions(counts), counts) if return_counts else _fractions(counts)


# --- class fractions → reference cell types -------------------------------------------------
# "other" maps to nothing: its share is dropped and the rest renormalised.
XENIUM_BREAST_MAPPING = {
    "neoplastic": ["Malignant"], "inflammatory": ["T", "B", "Plasma", "Macrophage", "Myeloid"],
    "connective": ["Fibroblast", "Endothelial"], "epithelial": ["Epithelial"],
}
SYNTH_MAPPING = {  # core.synth.reference.CELL_TYPES
    "neoplastic": ["malignant_epithelial", "cycling_malignant"], "inflammatory": ["t_cell", "b_plasma", "macrophage"],
    "connective": ["fibroblast", "endothelial"], "epithelial": ["normal_epithelial"],
}


def map_to_reference(fractions: np.ndarray, class_names, reference_types, mapping: dict | None = None, *,
                     priors: dict | None = None, empty: np.ndarray | None = None) -> np.ndarray:
    """Class fractions ``(N, C)`` or ``(C,)`` → weights over ``reference_types`` (rows sum 1).

    Each class's share is split over the types ``mapping[class]`` lists (default
    :data:`XENIUM_BREAST_MAPPING`) — evenly, or in proportion to ``priors[type]`` (e.g. each
    type's share of the reference; then every type of a class split in two or more must have
    one). Unmapped classes are dropped and the rest renormalised. Rows flagged in ``empty``
    (patches without nuclei: zero rows of the counts of :func:`compositions`) and rows left
    with no weight are uniform over the reference types — SciSt's no-cell fallback.
    """
    mapping = XENIUM_BREAST_MAPPING if mapping is None else mapping
    frac = np.atleast_2d(np.asarray(fractions, np.float64))
    class_names, reference_types = list(class_names), list(reference_types)
    if frac.shape[1] != len(class_names):
        raise ValueError(f"fractions have {frac.shape[1]} columns but there are {len(class_names)} class names")
    split = np.zeros((len(class_names), len(reference_types)))
    for i, name in enumerate(class_names):
        targets = [t for t in mapping.get(name, []) if t in reference_types]
        if priors is not None and len(targets) > 1 and not set(targets) <= set(priors):
            raise ValueError(f"priors lack {sorted(set(targets) - set(priors))} (class {name!r})")
        w = np.array([max(float((priors or {}).get(t, 1.0)), 0.0) for t in targets])
        if targets and w.sum() > 0:
            split[i, [reference_types.index(t) for t in targets]] = w / w.sum()
    weights = frac @ split
    total = weights.sum(axis=1, keepdims=True)
    flat = (total <= 0) | (np.zeros_like(total, bool) if empty is None else np.reshape(empty, (-1, 1)))
    out = np.where(flat, 1.0 / len(reference_types), weights / np.where(total > 0, total, 1.0))
    return out[0] if np.ndim(fractions) == 1 else out
