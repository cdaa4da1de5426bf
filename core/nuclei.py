"""Per-patch cell composition from segmented nuclei: segmentation → morphology → classes → weights.

A classical stand-in for HoVer-Net (no weights offline): colour deconvolution, a bounded Otsu
threshold on the hematoxylin optical density, distance-transform watershed, then per-nucleus
features in physical units, a nucleus classifier (transparent rules, or a small fitted model)
and the class fractions of each patch. Patches are uint8 RGB ``(H, W, 3)``; ``mpp`` is µm per
patch pixel; centroids are patch pixels ``(x, y)``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import ndimage

log = logging.getLogger(__name__)

CLASSES = ["neoplastic", "inflammatory", "connective", "epithelial", "other"]

# Ruifrok & Johnston (2001) hematoxylin and eosin OD vectors; the third row completes the basis.
_OD_H = np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286])
_OD_E = np.array([0.072, 0.990, 0.105]) / np.linalg.norm([0.072, 0.990, 0.105])
_UNMIX = np.linalg.inv(np.stack([_OD_H, _OD_E, np.cross(_OD_H, _OD_E)])).astype(np.float32)

# Nuclei are found on the hematoxylin OD minus its local floor (a grey opening by a square
# wider than any nucleus), so glass, stroma and the H cast of basophilic cytoplasm sit near 0.
# Otsu on that top-hat lands between background and dark nuclei when the patch has only those,
# but between pale (vesicular) and dark nuclei when it has both; hence a hysteresis pair: seeds
# above Otsu, grown down to half of it. The bounds keep a nucleus-free patch empty: sensor noise
# and stroma fibres stay < 0.4 top-hat OD, the dark rim of even pale nuclei exceeds 0.6; the cap
# stops a patch packed with very dark lymphocytes from dropping the paler tumour nuclei.
_SEED_FLOOR, _SEED_CAP, _GROW_RATIO, _GROW_FLOOR = 0.5, 1.5, 0.5, 0.2
_FLOOR_WINDOW_UM = 16.0
# Nuclear areas kept (µm²): < 12 µm² (≈ 3.9 µm across) is debris or a fragment of chromatin;
# > 450 µm² (≈ 24 µm across) is an unsplit clump or a dark stroma patch, not one nucleus.
_MIN_AREA_UM2, _MAX_AREA_UM2 = 12.0, 450.0
# Holes inside a nucleus (vesicular chromatin) are filled up to this size; larger holes are
# gland lumens ringed by touching nuclei and stay empty.
_MAX_HOLE_UM2 = 90.0
# Watershed markers: maxima of the smoothed distance transform, at most one per window of this
# width (µm) and at least this deep (µm). Touching lymphocytes sit ≥ 6 µm apart centre to
# centre, so a 4.5 µm window still splits them while one spindle nucleus keeps one marker.
_MARKER_WINDOW_UM, _MARKER_MIN_DEPTH_UM = 4.5, 1.0
_RING_UM = 2.0        # width of the cytoplasm ring around each nucleus
_DENSITY_UM = 20.0    # neighbourhood radius for the local density feature

FEATURES = ["area_um2", "diameter_um", "major_um", "minor_um", "eccentricity", "solidity",
            "h_mean", "h_std", "h_core_ratio", "e_ring", "density"]
COLUMNS = FEATURES + ["x", "y"]


def stain_density(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities (float32 ``(H, W)`` each, OD units, ln base)."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _UNMIX
    return conc[:, 0].reshape(rgb.shape[:2]), conc[:, 1].reshape(rgb.shape[:2])


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of a 1-D float array (NaN-free), by a histogram sweep."""
    hist, edges = np.histogram(values, bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(mids[np.argmax(between[:-1])])


def nuclei_mask(h: np.ndarray, *, mpp: float) -> tuple[np.ndarray, float]:
    """Foreground of nuclei from the smoothed hematoxylin OD; returns (mask, seed threshold, OD)."""
    from skimage.filters import apply_hysteresis_threshold
    from skimage.morphology import remove_small_holes

    size = max(3, int(round(_FLOOR_WINDOW_UM / mpp)) | 1)
    tophat = h - ndimage.maximum_filter(ndimage.minimum_filter(h, size), size)
    seed = float(np.clip(_otsu(tophat.ravel()), _SEED_FLOOR, _SEED_CAP))
    mask = apply_hysteresis_threshold(tophat, max(_GROW_RATIO * seed, _GROW_FLOOR), seed)
    mask = remove_small_holes(mask, max_size=int(_MAX_HOLE_UM2 / mpp ** 2))
    if mpp < 0.8:  # shave one-pixel spurs and bridges (at coarser scans they are real detail)
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    return mask, seed


def split_nuclei(mask: np.ndarray, *, mpp: float) -> np.ndarray:
    """Watershed of the distance transform from its local maxima; int32 labels (0 = background)."""
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(mask).astype(np.float32)
    dist = ndimage.gaussian_filter(dist, 0.5 / mpp)
    window = max(3, int(round(_MARKER_WINDOW_UM / mpp)) | 1)
    peaks = (dist == ndimage.maximum_filter(dist, window)) & (dist > _MARKER_MIN_DEPTH_UM / mpp)
    markers, _ = ndimage.label(peaks, np.ones((3, 3), bool))  # a flat-topped maximum is one marker
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def segment_nuclei(rgb: np.ndarray, *, mpp: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment nuclei of an RGB uint8 patch at ``mpp`` µm/px.

    Returns ``(labels, features)``: labels int32 ``(H, W)`` (0 = background, 1..n = nuclei,
    matching the feature rows in order) and a DataFrame with :data:`COLUMNS` (µm, µm², OD,
    neighbours within 20 µm, centroid x, y in patch px).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB patch (H, W, 3), got {rgb.dtype} {rgb.shape}")
    h, e = stain_density(rgb[..., :3])
    h_s = ndimage.gaussian_filter(h, 0.5 / mpp)
    mask, _ = nuclei_mask(h_s, mpp=mpp)
    labels = split_nuclei(mask, mpp=mpp)
    labels = _size_filter(labels, mpp)
    return labels, _features(labels, h, e, mpp)


def _size_filter(labels: np.ndarray, mpp: float) -> np.ndarray:
    """Drop objects outside the nuclear area range and renumber 1..n in raster order."""
    area = np.bincount(labels.ravel()) * mpp ** 2
    keep = (area >= _MIN_AREA_UM2) & (area <= _MAX_AREA_UM2)
    keep[0] = False
    lut = np.zeros(len(area), np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1)
    return lut[labels]


def _moments(labels: np.ndarray, n: int, mpp: float) -> dict:
    """Area, centroid and ellipse axes per label from pixel moments (skimage's axis convention)."""
    idx = labels.ravel()
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    area = np.bincount(idx, minlength=n + 1)[1:].astype(np.float64)
    cx = np.bincount(idx, xx.ravel(), n + 1)[1:] / area
    cy = np.bincount(idx, yy.ravel(), n + 1)[1:] / area
    dx, dy = xx.ravel() - np.r_[0, cx][idx], yy.ravel() - np.r_[0, cy][idx]
    mxx = np.bincount(idx, dx * dx, n + 1)[1:] / area + 1 / 12  # + pixel's own extent
    myy = np.bincount(idx, dy * dy, n + 1)[1:] / area + 1 / 12
    mxy = np.bincount(idx, dx * dy, n + 1)[1:] / area
    root = np.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    l1, l2 = (mxx + myy) / 2 + root, np.maximum((mxx + myy) / 2 - root, 1e-9)
    return {"area_um2": area * mpp ** 2, "diameter_um": 2 * np.sqrt(area / np.pi) * mpp,
            "major_um": 4 * np.sqrt(l1) * mpp, "minor_um": 4 * np.sqrt(l2) * mpp,
            "eccentricity": np.sqrt(1 - l2 / l1), "x": cx, "y": cy}


def _solidity(labels: np.ndarray, n: int) -> np.ndarray:
    """Area / convex-hull area per label (hull over pixel corners, so a square pixel is solid)."""
    from scipy.spatial import ConvexHull, QhullError

    out = np.ones(n)
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
        if sl is None:
            continue
        own = labels[sl] == i + 1
        edge = own & ~ndimage.binary_erosion(own)  # the hull only needs the boundary pixels
        pts = (np.argwhere(edge)[:, None, :] + corners[None]).reshape(-1, 2)
        try:
            out[i] = own.sum() / ConvexHull(pts).volume
        except QhullError:  # degenerate (a one-pixel-wide line): solid by convention
            pass
    return np.minimum(out, 1.0)


def _core_ratio(labels: np.ndarray, h: np.ndarray, n: int) -> np.ndarray:
    """Mean H in each nucleus's inner half (by depth) over the mean H of its outer half.

    Vesicular nuclei (dark rim, pale centre) score < 1; solid hyperchromatic nuclei ≈ 1.
    """
    fg = labels > 0
    border = np.zeros_like(fg)
    border[1:] |= labels[1:] != labels[:-1]
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    depth = ndimage.distance_transform_edt(fg & ~border)
    deepest = np.r_[0.0, ndimage.maximum(depth, labels, np.arange(1, n + 1))]
    core = fg & (depth > 0.5 * deepest[labels])
    idx = labels.ravel()
    w_core = core.ravel().astype(np.float64)
    h_core = np.bincount(idx, h.ravel() * w_core, n + 1)[1:] / np.maximum(np.bincount(idx, w_core, n + 1)[1:], 1)
    w_out = (fg & ~core).ravel().astype(np.float64)
    h_out = np.bincount(idx, h.ravel() * w_out, n + 1)[1:] / np.maximum(np.bincount(idx, w_out, n + 1)[1:], 1)
    return h_core / np.maximum(h_out, 1e-3)


def _ring_eosin(labels: np.ndarray, e: np.ndarray, n: int, mpp: float) -> np.ndarray:
    """Mean eosin OD in a ring of ``_RING_UM`` around each nucleus (its cytoplasm or stroma)."""
    from skimage.segmentation import expand_labels

    grown = expand_labels(labels, _RING_UM / mpp)
    ring = np.where(labels == 0, grown, 0).ravel()
    total = np.bincount(ring, e.ravel(), n + 1)[1:]
    count = np.bincount(ring, minlength=n + 1)[1:]
    fallback = float(e[labels == 0].mean()) if (labels == 0).any() else 0.0  # packed nuclei: no ring
    return np.where(count > 0, total / np.maximum(count, 1), fallback)


def _density(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], mpp: float) -> np.ndarray:
    """Neighbours within ``_DENSITY_UM``, divided by the share of that disc inside the patch."""
    from scipy.spatial import cKDTree

    if len(x) == 0:
        return np.zeros(0)
    r = _DENSITY_UM / mpp
    pts = np.column_stack([x, y])
    count = cKDTree(pts).query_ball_point(pts, r, return_length=True) - 1
    g = np.linspace(-r, r, 15)
    gx, gy = np.meshgrid(g, g)
    disc = np.column_stack([gx.ravel(), gy.ravel()])[(gx.ravel() ** 2 + gy.ravel() ** 2) <= r * r]
    px, py = x[:, None] + disc[None, :, 0], y[:, None] + disc[None, :, 1]
    inside = ((px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])).mean(axis=1)
    return count / np.maximum(inside, 0.25)


def _features(labels: np.ndarray, h: np.ndarray, e: np.ndarray, mpp: float) -> pd.DataFrame:
    """Per-nucleus feature table (rows in label order 1..n); see :data:`COLUMNS` for units."""
    n = int(labels.max())
    if n == 0:
        return pd.DataFrame({c: np.zeros(0) for c in COLUMNS})
    f = _moments(labels, n, mpp)
    idx = labels.ravel()
    area_px = np.bincount(idx, minlength=n + 1)[1:]
    h_sum = np.bincount(idx, h.ravel(), n + 1)[1:]
    h_sq = np.bincount(idx, h.ravel().astype(np.float64) ** 2, n + 1)[1:]
    f["h_mean"] = h_sum / area_px
    f["h_std"] = np.sqrt(np.maximum(h_sq / area_px - f["h_mean"] ** 2, 0))
    f["solidity"] = _solidity(labels, n)
    f["h_core_ratio"] = _core_ratio(labels, h, n)
    f["e_ring"] = _ring_eosin(labels, e, n, mpp)
    f["density"] = _density(f["x"], f["y"], labels.shape, mpp)
    return pd.DataFrame({c: np.asarray(f[c], np.float64) for c in COLUMNS})
