"""Tissue detection on a slide thumbnail: glass, scanner padding and marker ink are rejected.

The detector works on a small RGB thumbnail (``~1–2k px`` on the long side) and returns a
:class:`TissueMask` with the tissue mask and what was rejected (pen ink, background), so a
page can show why a region is not tiled. Sizes are physical (µm, µm²) when the thumbnail's
µm/px is known and fractions of the thumbnail otherwise.

Tile coordinates are level-0 pixels ``(x, y)`` of the top-left corner; ``mask_scale`` is the
number of level-0 px per mask px.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

# Glass is never this saturated or this dense, whatever Otsu says: bounds on the thresholds.
# JPEG chroma noise and faint colour casts of clean glass stay below S ≈ 0.04; pale eosin is
# S ≈ 0.10–0.20, so a threshold above 0.15 would start cutting tissue, not glass.
_S_FLOOR, _S_CAP = 0.05, 0.15
# Glass brightness varies between scanners more than its saturation (dim glass ≈ 215/255 is
# OD ≈ 0.07), so the density floor sits higher, and at least 0.05 above the brightest 2 % of
# pixels (the glass, when there is any); OD 0.25 (≈ 144/255 grey) is never glass.
_OD_FLOOR, _OD_CAP = 0.08, 0.25
# Otsu runs on log(feature + eps): glass sits near 0 and tissue spans a decade (0.1–0.7), so in
# linear units Otsu splits pale from dark tissue; in log units it splits glass from tissue.
_LOG_EPS = 0.02
# Scanner padding is (near) pure black (0–255 units); JPEG ringing lifts it to ~20 at most.
_PAD_MAX = 25
# OpenSlide composites transparent (unscanned) regions as exact white (255; JPEG: ≥ 254).
_WHITE_MIN = 254


@dataclass(frozen=True)
class TissueMask:
    """Result of :func:`detect_tissue`; every mask is boolean ``(H, W)`` on the thumbnail.

    The three masks partition the thumbnail: ``mask`` is the tissue; ``pen`` marker ink
    (blue, green, black); ``background`` the rest: glass, exact white (unscanned area), black
    scanner padding, and debris dropped by the cleanup. ``threshold`` is the HSV
    saturation threshold used (Otsu, bounded), ``od_threshold`` the optical-density one.
    ``mpp`` is µm per thumbnail px (None if unknown); ``n_objects_removed`` counts objects
    dropped as too small or neutral grey (dust, hairs, debris).
    """

    mask: np.ndarray
    pen: np.ndarray
    background: np.ndarray
    threshold: float
    od_threshold: float
    mpp: float | None = None
    n_objects_removed: int = 0

    @property
    def fraction(self) -> float:
        """Tissue pixels / all thumbnail pixels (padding included in the denominator)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def n_tissue(self) -> int:
        return int(self.mask.sum())

    @property
    def n_pen(self) -> int:
        return int(self.pen.sum())

    @property
    def area_mm2(self) -> float | None:
        """Tissue area in mm², or None when the thumbnail's µm/px is unknown."""
        return None if self.mpp is None else self.n_tissue * self.mpp ** 2 / 1e6


def detect_tissue(
    rgb: np.ndarray,
    *,
    mpp: float | None,
    min_object_um2: float = 5_000.0,
    max_hole_um2: float = 10_000.0,
    close_um: float = 16.0,
    open_um: float = 8.0,
    min_object_frac: float = 1e-4,
    max_hole_frac: float = 1e-3,
    remove_pen: bool = True,
) -> TissueMask:
    """Detect tissue on an RGB uint8 thumbnail ``(H, W, 3)`` at ``mpp`` µm per thumbnail px.

    Tissue = saturated (HSV S) or dense (mean optical density) pixels, each threshold by Otsu
    on log values bounded to a range glass never reaches, minus marker ink and black padding;
    then a morphological close (``close_um``) and open (``open_um``), holes smaller than
    ``max_hole_um2`` filled (10,000 µm² ≈ a 100 µm square, under one 112 µm tile: lumens and
    tears; larger holes are glass a tile could land on), pen removed, objects smaller than
    ``min_object_um2`` dropped (5,000 µm² ≈ a 70 µm square: dust and cell clumps go) and
    neutral-grey objects dropped (hairs, dirt, coverslip edges: unstained, so their mean
    saturation is below the tissue threshold).
    With ``mpp=None`` (or ≤ 0) sizes are fractions of the thumbnail: ``min_object_frac`` /
    ``max_hole_frac`` of its area, radii 0.2 % / 0.1 % of its long side.
    """
    rgb = _as_rgb(rgb)
    r, g, b = (np.ascontiguousarray(rgb[..., i]) for i in range(3))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    sat = (mx - mn).astype(np.float32) / np.maximum(mx, 1)
    # mean optical density > t  ⇔  R·G·B < 255³·10^(−3t): a product, no per-pixel log
    prod = r.astype(np.float32) * g * b
    sizes = _sizes_px(rgb.shape[:2], mpp, min_object_um2, max_hole_um2, close_um, open_um,
                      min_object_frac, max_hole_frac)
    padding = _padding(mx)
    pen = _pen_mask((r, g, b), mx, mn, sat, padding, sizes["min_pen"]) if remove_pen else np.zeros_like(padding)
    t_s, t_od = _thresholds(sat, prod, mn, padding | pen)
    candidate = ((sat > t_s) | (prod < 255.0 ** 3 * 10 ** (-3 * t_od))) & ~padding
    mask, n_removed = _clean(candidate & ~pen, pen, sizes, sat, t_s)
    background = ~mask & ~pen
    log.debug("tissue: S>%.3f or OD>%.3f; %.1f%% tissue, %d pen px, %d objects removed",
              t_s, t_od, 100 * mask.mean(), int(pen.sum()), n_removed)
    return TissueMask(mask=mask, pen=pen, background=background, threshold=t_s, od_threshold=t_od,
                      mpp=mpp, n_objects_removed=n_removed)


def _thresholds(sat, prod, mn, excluded, max_samples: int = 250_000) -> tuple[float, float]:
    """Bounded log-Otsu thresholds (saturation, mean OD) from a regular subsample of pixels.

    Padding, pen and exact white (OpenSlide's unscanned area) are left out of the statistics:
    they are not glass of this slide and would pull the split towards them.
    """
    step = max(1, int(np.ceil(np.sqrt(sat.size / max_samples))))
    sub = (slice(None, None, step), slice(None, None, step))
    keep = ~excluded[sub] & (mn[sub] < _WHITE_MIN)
    od = -np.log10(np.maximum(prod[sub][keep], 1.0) / 255.0 ** 3) / 3.0
    # dim glass (scanner illumination) is denser than usual: keep the floor above it
    od_floor = min(max(_OD_FLOOR, float(np.percentile(od, 2)) + 0.05), _OD_CAP) if od.size else _OD_FLOOR
    return (_bounded_log_otsu(sat[sub][keep], _S_FLOOR, _S_CAP),
            _bounded_log_otsu(od, od_floor, _OD_CAP))


def _as_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 3 and rgb.shape[2] == 4:  # RGBA: transparent means unscanned → white
        alpha = rgb[..., 3:4].astype(np.float32) / 255.0
        rgb = (rgb[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB thumbnail (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return rgb


def _sizes_px(shape, mpp, min_object_um2, max_hole_um2, close_um, open_um, min_object_frac,
              max_hole_frac) -> dict[str, int]:
    """Morphology radii (px) and area limits (px²) from physical sizes or thumbnail fractions."""
    if mpp is not None and mpp > 0:
        min_obj, max_hole = min_object_um2 / mpp ** 2, max_hole_um2 / mpp ** 2
        close, opening = close_um / mpp, open_um / mpp
    else:
        area, long_side = shape[0] * shape[1], max(shape)
        min_obj, max_hole = min_object_frac * area, max_hole_frac * area
        close, opening = 0.002 * long_side, 0.001 * long_side
    sizes = {"min_object": max(1, round(min_obj)), "max_hole": max(1, round(max_hole)),
             "close": max(1, round(close)), "open": max(1, round(opening))}
    sizes["min_pen"] = max(4, sizes["min_object"] // 2)  # a solid core of ink: half the smallest tissue
    return sizes


def _padding(mx: np.ndarray) -> np.ndarray:
    """Near-black regions touching the image border: scanner padding, not ink or tissue."""
    dark = mx <= _PAD_MAX
    if not (dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any()):
        return np.zeros_like(dark)
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    padding = np.isin(labels, border[border > 0])
    return _morph(padding, 1, "dilate") if padding.any() else padding


def _pen_mask(rgb, mx, mn, sat, padding, min_px: int, max_px: int = 1_000_000) -> np.ndarray:
    """:func:`_pen`, on every other pixel when the thumbnail exceeds ``max_px`` (strokes are
    coarse; the halo covers the 2 px steps), then back to full size."""
    if mx.size <= max_px:
        return _pen(rgb, mx, mn, sat, padding, min_px)
    sub = (slice(None, None, 2), slice(None, None, 2))
    pen = _pen(tuple(c[sub] for c in rgb), mx[sub], mn[sub], sat[sub], padding[sub], max(4, min_px // 4))
    if not pen.any():
        return np.zeros_like(padding)
    return np.repeat(np.repeat(pen, 2, axis=0), 2, axis=1)[: mx.shape[0], : mx.shape[1]] & ~padding


def _pen(rgb, mx, mn, sat, padding, min_px: int) -> np.ndarray:
    """Marker ink (blue, green, black) by hysteresis: solid cores of unambiguous ink colour
    (``min_px`` px or more) grown into connected ink-like pixels, e.g. the stroke over tissue.

    Strong (seed) rules, with why (0–255 units):
    * blue: B largest, S ≥ 0.45, and either G ≥ R (hue ≤ 240°) with B − R ≥ 51, or
      B − max(R, G) ≥ 90. Ink is cyan-blue to blue and strongly saturated. Haematoxylin is
      blue-violet with R ≥ G (its OD vector is 0.65, 0.70, 0.29: red passes more than green)
      and B at most ~75 above max(R, G); blue-grey IHC counterstain is S ≈ 0.05–0.20.
    * green: hue 0.20–0.50 (72°–180°), S ≥ 0.20, V ≥ 0.15. H&E has no green at all (eosin is
      hue ≈ 0.9–1.0, DAB brown ≈ 0.05–0.12) so a mild saturation suffices; glass is S < 0.05.
    * black: V ≤ 0.25 and S ≤ 0.35, not padding. Dark nuclei and folds at thumbnail scale are
      V ≥ 0.2 but saturated purple (S ≈ 0.6); ink is dark and neutral.
    Seeds must survive a 3×3 opening: noise makes scattered pixels of dense haematoxylin pass
    the blue rule, never solid patches. Weak (grown) rules: ink over tissue takes the tissue's
    red, so blue needs only B − max(R, G) ≥ 30 with S ≥ 0.40; green, G largest with S ≥ 0.12;
    dark, V ≤ 0.31 with S ≤ 0.45. Purple nuclei (B − max(R, G) ≈ 15) are never weak ink.
    Misses: ink entirely inside tissue with no solid core; black ink over dark purple tissue.
    """
    r, g, b = (c.astype(np.int16) for c in rgb)
    d = (mx - mn).astype(np.int16)
    b_max, g_max = (b >= r) & (b >= g), (g >= r) & (g >= b)
    b_excess = b - np.maximum(r, g)
    blue = b_max & (sat >= 0.45) & (((g >= r) & (b - r >= 51)) | (b_excess >= 90))
    # hue in [0.20, 0.50] ⇔ G is the largest channel and (B − R) ≥ −0.8·(max − min)
    green = g_max & (10 * (b - r) >= -8 * d) & (sat >= 0.20) & (mx >= 38)
    black = (mx <= 64) & (sat <= 0.35)
    seeds = _morph(_morph(blue | green | black, 1, "erode"), 1, "dilate") & ~padding
    if not seeds.any():
        return seeds
    seeds = _drop_small(seeds, min_px)
    weak = (b_max & (sat >= 0.40) & (b_excess >= 30)) | (g_max & (sat >= 0.12)) | ((mx <= 80) & (sat <= 0.45))
    weak = (weak | blue | green | black | seeds) & ~padding
    labels, n = ndimage.label(weak, structure=np.ones((3, 3), bool))
    inked = np.zeros(n + 1, bool)
    inked[labels[seeds]] = True
    inked[0] = False
    pen = inked[labels]
    if pen.any():  # ink edges blend with glass/tissue into a paler halo: take it too
        pen = _morph(pen, 2, "dilate") & ~padding
    return pen


def _bounded_log_otsu(values: np.ndarray, floor: float, cap: float) -> float:
    """Otsu threshold of log(values + eps), back in linear units and clipped to [floor, cap]."""
    if values.size < 2:
        return cap
    logs = np.log(values.astype(np.float32) + _LOG_EPS)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-6:  # constant image: nothing to split
        return cap
    counts, edges = np.histogram(logs, bins=256, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    t = float(np.exp(edges[1:][np.argmax(between)]) - _LOG_EPS)
    return float(np.clip(t, floor, cap))


def _morph(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Dilate or erode by ``radius`` px: alternating 3×3 cross and square steps (≈ an octagon).

    Each step is a few shifted whole-array OR / AND operations (~30× faster than ``ndimage``
    at these radii); pixels beyond the image edge are ignored, not counted as tissue or glass.
    """
    fn = np.logical_or if op == "dilate" else np.logical_and
    out = np.array(mask, dtype=bool, copy=True)
    for i in range(radius):
        if i % 2:  # square: separable, one axis after the other
            out = _shift_step(_shift_step(out, fn, 0), fn, 1)
        else:  # cross: both axes from the same source
            out = _shift_step(out, fn, 0, 1)
    return out


def _shift_step(mask: np.ndarray, fn, *axes: int) -> np.ndarray:
    """Combine ``mask`` with its ±1 px shifts along ``axes`` using ``fn`` (OR / AND)."""
    out = mask.copy()
    for axis in axes:
        head, tail = [slice(None)] * 2, [slice(None)] * 2
        head[axis], tail[axis] = slice(1, None), slice(None, -1)
        fn(out[tuple(head)], mask[tuple(tail)], out=out[tuple(head)])
        fn(out[tuple(tail)], mask[tuple(head)], out=out[tuple(tail)])
    return out


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove 8-connected objects smaller than ``min_px`` pixels (indexing only ``mask``'s
    pixels: pen candidates are sparse)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    on = labels[mask]
    small = np.bincount(on, minlength=n + 1) < min_px
    out = mask.copy()
    out[mask] = ~small[on]
    return out


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill enclosed background regions smaller than ``max_px`` (lumens, tears, bubbles)."""
    holes = ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def _clean(candidate, pen, sizes: dict[str, int], sat: np.ndarray, t_s: float) -> tuple[np.ndarray, int]:
    """Close, open, fill small holes, cut the pen out, drop small and neutral-grey objects.

    An object whose candidate pixels average a saturation below ``t_s`` was found by
    density alone: grey debris, not stained tissue.
    """
    mask = _morph(_morph(candidate, sizes["close"], "dilate"), sizes["close"], "erode")
    mask = _morph(_morph(mask, sizes["open"], "erode"), sizes["open"], "dilate")
    mask = _fill_small_holes(mask, sizes["max_hole"]) & ~pen
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask, 0
    size = np.bincount(labels.ravel(), minlength=n + 1)
    inside = candidate & mask
    # Σ (S − t_s) over an object's candidate pixels ≤ 0  ⇔  their mean saturation ≤ t_s
    excess = np.bincount(labels[inside], weights=sat[inside] - t_s, minlength=n + 1)
    drop = (size < sizes["min_object"]) | (excess <= 0)
    drop[0] = False
    if not drop.any():
        return mask, 0
    return mask & ~drop[labels], int(drop.sum())


def tile_tissue_fraction(mask: np.ndarray, mask_scale: float, xy: np.ndarray, size_level0: int) -> np.ndarray:
    """Exact tissue area fraction of each square tile's footprint on ``mask``.

    ``xy`` is ``(N, 2)`` level-0 top-left corners, ``size_level0`` the side in level-0 px,
    ``mask_scale`` level-0 px per mask px. The footprint ``[x/s, (x+size)/s)`` has fractional
    edges; the integral image is bilinear inside a mask pixel, so interpolating it gives the
    exact covered area. Parts of a tile outside the mask count as background.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = np.asarray(mask, bool).cumsum(0, dtype=np.float64).cumsum(1)
    side = size_level0 / mask_scale
    x0, y0 = xy[:, 0] / mask_scale, xy[:, 1] / mask_scale
    x1, y1 = x0 + side, y0 + side
    area = _at(integral, x1, y1) - _at(integral, x0, y1) - _at(integral, x1, y0) + _at(integral, x0, y0)
    return (area / (side * side)).astype(np.float32) if side > 0 else np.zeros(len(xy), np.float32)


def _at(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integral image at fractional mask coordinates (bilinear; clamped to the mask)."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x, y = np.clip(x, 0, w), np.clip(y, 0, h)
    i, j = np.minimum(x.astype(np.int64), max(w - 1, 0)), np.minimum(y.astype(np.int64), max(h - 1, 0))
    a, b = x - i, y - j
    i1, j1 = np.minimum(i + 1, w), np.minimum(j + 1, h)
    return ((1 - a) * (1 - b) * integral[j, i] + a * (1 - b) * integral[j, i1]
            + (1 - a) * b * integral[j1, i] + a * b * integral[j1, i1])
