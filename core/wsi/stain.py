"""H&E stain handling for tiles: optical density, Macenko stain vectors and normalisation,
Reinhard colour transfer, and HED stain-jitter augmentation.

Tiles are RGB arrays ``[H, W, 3]`` or batches ``[N, H, W, 3]`` (uint8 or any numeric dtype on
the 0–255 scale); results that are images come back as uint8 of the same shape.

Optical density (Beer–Lambert, natural log) uses ``I0 = 255`` with a +1 guard on both sides,
``OD = -ln((I + 1) / (I0 + 1))``, so pure white (255) is exactly OD 0, black (0) is finite
(ln 256 ≈ 5.55), and :func:`from_od` inverts it exactly — the same convention as
:func:`core.wsi.nuclei.stain_density`. Stain matrices are ``2 × 3``: row 0 haematoxylin, row 1
eosin, each a unit OD vector over (R, G, B); a pixel's OD is modelled as ``c @ stains``.

Speed (best of 30, one 224 × 224 tile, one CPU core of a loaded 2-core box): optical density
0.1 ms, :func:`concentrations` 0.2 ms, :func:`macenko_stains` ≈ 3 ms,
:meth:`MacenkoNormalizer.transform` ≈ 4–5 ms, :func:`stain_jitter` ≈ 2–3 ms, :func:`reinhard`
≈ 6.5 ms (skimage's LAB conversions, in float32, dominate).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "I0", "REFERENCE_STAINS", "REFERENCE_MAX_CONC", "HED_STAINS", "MIN_TISSUE_PIXELS",
    "StainError", "optical_density", "from_od", "macenko_stains", "concentrations",
    "MacenkoNormalizer", "lab_stats", "reinhard", "stain_jitter",
]

I0 = 255.0  # transmitted (glass) intensity

# Reference H&E OD matrix and 99th-percentile concentrations: the defaults of Mitko Veta's
# reference MATLAB implementation of Macenko et al. (ISBI 2009), ``normalizeStaining.m``
# (github.com/mitkovetta/staining-normalization, 2013: ``HERef``, ``maxCRef``), reused by most
# ports (torchstain, cuCIM, …). They are not printed in the paper itself. Veta computed them with
# natural-log OD and I0 = 240; here I0 = 255 (+1 guard), which shifts concentrations by a few
# hundredths — immaterial for a default target.
REFERENCE_STAINS = np.array([[0.5626, 0.7201, 0.4062],    # haematoxylin (R, G, B OD)
                             [0.2159, 0.8012, 0.5581]])   # eosin
REFERENCE_STAINS = REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=1, keepdims=True)
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])           # H, E

# Ruifrok & Johnston (2001) haematoxylin, eosin and DAB OD vectors, as ``skimage.color.rgb_from_hed``
# (rows H, E, D). ``stain_jitter`` deconvolves with this matrix (not with skimage's rgb2hed, which
# clips negative concentrations to 0 and so does not round-trip).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_STAINS = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(HED_STAINS)

MIN_TISSUE_PIXELS = 100      # fewer tissue pixels than this and macenko_stains gives up
_MIN_STAIN_ANGLE = np.deg2rad(3.0)   # H and E closer than this: a one-stain tile, not H&E
_JITTER_FADE_OD = 0.30       # stain_jitter's additive shift fades in (squared) over max-channel OD 0 → 0.3


class StainError(ValueError):
    """Stain vectors cannot be estimated from this tile (too little tissue, or only one stain).

    Callers fall back to :data:`REFERENCE_STAINS` (``MacenkoNormalizer.transform`` does so unless
    told not to).
    """


def _rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB array [..., 3] (tile [H, W, 3] or batch [N, H, W, 3]), "
                         f"got shape {arr.shape}")
    return arr


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer–Lambert optical density ``-ln((I + 1) / (I0 + 1))``, float32 of the same shape.

    ``I0 = 255``; the +1 keeps black finite and maps white (255) to exactly 0.
    """
    arr = _rgb(rgb).astype(np.float32)
    arr += 1.0
    arr *= np.float32(1.0 / (I0 + 1.0))
    np.log(arr, out=arr)
    np.negative(arr, out=arr)
    return arr


def from_od(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_density`: ``(I0 + 1) · exp(-OD) − 1``, rounded, clipped, uint8."""
    od = np.asarray(od, dtype=np.float32)
    out = np.exp(-od)
    out *= np.float32(I0 + 1.0)
    out -= 1.0
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out).astype(np.uint8)


# Internally pixels are planar, ``[channels, P]`` contiguous rows: numpy reduces and masks along
# a long contiguous axis many times faster than along a trailing axis of length 3.
def _planes(rgb: np.ndarray) -> np.ndarray:
    """OD as ``[3, P]`` float32."""
    return np.ascontiguousarray(optical_density(rgb).reshape(-1, 3).T)


def _mix(m: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """``m @ planes`` in float32 (``m`` k × j, ``planes`` [j, P])."""
    return np.asarray(m, dtype=np.float32) @ planes


def _pixels(planes: np.ndarray, shape: tuple) -> np.ndarray:
    """``[k, P]`` back to ``shape[:-1] + (k,)``."""
    return planes.T.reshape(*shape[:-1], planes.shape[0])


def _tissue(od: np.ndarray, beta: float) -> np.ndarray:
    # Tissue = OD above beta in at least one channel. Veta's implementation keeps only pixels above
    # beta in *every* channel; that drops pale pure-eosin pixels (red OD ≈ 0.2 × concentration)
    # and drags the E estimate towards H.
    return (od[0] > beta) | (od[1] > beta) | (od[2] > beta)


def _stains_from_od(od: np.ndarray, beta: float, alpha: float, min_pixels: int) -> np.ndarray:
    """Macenko on OD planes ``[3, P]``."""
    x = np.compress(_tissue(od, beta), od, axis=1).astype(np.float64)
    n = x.shape[1]
    if n < min_pixels:
        raise StainError(f"only {n} tissue pixels (OD > {beta} in some channel); Macenko needs "
                         f"at least {min_pixels} — use the reference stain matrix instead")
    mean = x.mean(axis=1)
    cov = (x @ x.T - n * np.outer(mean, mean)) / max(n - 1, 1)
    _, vecs = np.linalg.eigh(cov)            # ascending eigenvalues
    plane = vecs[:, [2, 1]]                  # the two largest, as columns
    # Fix eigenvector signs: the principal one points into the positive OD octant, so every tissue
    # pixel projects to an angle in (-pi/2, pi/2) and the percentiles never straddle ±pi.
    if plane[:, 0].sum() < 0:
        plane[:, 0] = -plane[:, 0]
    if plane[0, 1] < 0:                      # arbitrary but deterministic
        plane[:, 1] = -plane[:, 1]
    proj = plane.T @ x
    phi = np.arctan2(proj[1], proj[0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    if hi - lo < _MIN_STAIN_ANGLE:
        raise StainError(f"the tissue shows a single stain direction (spread {np.rad2deg(hi - lo):.1f}° "
                         f"< {np.rad2deg(_MIN_STAIN_ANGLE):.0f}°); use the reference stain matrix instead")
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # H first: haematoxylin (blue-purple) absorbs red light far more than eosin (pink) does, so the
    # vector with the larger red OD component is H (Veta's rule, vMin(1) > vMax(1)).
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)
    stains = np.stack([h, e])
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def macenko_stains(rgb: np.ndarray, *, beta: float = 0.15, alpha: float = 1.0,
                   min_pixels: int = MIN_TISSUE_PIXELS) -> np.ndarray:
    """2 × 3 stain matrix (rows H, E; unit OD vectors) by Macenko et al. 2009.

    M. Macenko, M. Niethammer, J. S. Marron, D. Borland, J. T. Woosley, X. Guan, C. Schmitt,
    N. E. Thomas, "A method for normalizing histology slides for quantitative analysis",
    IEEE ISBI 2009, pp. 1107–1110, doi:10.1109/ISBI.2009.5193250. Steps: OD of every pixel; keep
    tissue pixels (OD > ``beta`` in at least one channel); the plane of the two largest
    eigenvectors of their OD covariance; the angle of each pixel's projection in that plane; the
    robust extremes at the ``alpha`` and ``100 − alpha`` percentiles, mapped back to OD vectors.

    Order rule: the vector with the larger **red** OD component is haematoxylin (it absorbs red;
    eosin barely does), the other eosin.

    A batch ``[N, H, W, 3]`` is pooled into one estimate. Raises :class:`StainError` when fewer
    than ``min_pixels`` tissue pixels remain or the two extremes are nearly collinear (< 3°);
    callers then fall back to :data:`REFERENCE_STAINS`.
    """
    return _stains_from_od(_planes(rgb), beta, alpha, min_pixels)


def _unmix(stains: np.ndarray) -> np.ndarray:
    stains = np.asarray(stains, dtype=np.float64)
    if stains.shape != (2, 3):
        raise ValueError(f"stain matrix must be 2 × 3 (rows H, E), got {stains.shape}")
    return np.linalg.pinv(stains)            # 3 × 2: least-squares solution of od = c @ stains


def concentrations(rgb: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``c`` with ``OD ≈ c @ stains``: float32 ``[..., 2]`` (H, E).

    Not clipped: glass gives ≈ 0, noise may go slightly negative.
    """
    arr = _rgb(rgb)
    return _pixels(_mix(_unmix(stains).T, _planes(arr)), arr.shape)


def _max_conc(conc: np.ndarray, beta: float, percentile: float) -> np.ndarray:
    """Per-stain ``percentile`` of the concentrations over tissue (H + E concentration > beta).

    Veta's implementation takes the percentile over every pixel, so a tile that is mostly glass
    gets a low "maximum" and is over-darkened; over tissue only, it does not depend on how much
    glass the tile shows.
    """
    tissue = conc[0] + conc[1] > beta
    if not tissue.any():
        tissue[:] = True
    return np.array([np.percentile(np.compress(tissue, row), percentile) for row in conc])


class MacenkoNormalizer:
    """Macenko stain normalisation: unmix with the tile's own stains, rescale each stain's
    99th-percentile concentration to the target's, rebuild with the target's stain matrix.

    The default target (no :meth:`fit`) is :data:`REFERENCE_STAINS` with
    :data:`REFERENCE_MAX_CONC` — the defaults of Veta's reference implementation of Macenko et al.
    (``normalizeStaining.m``, github.com/mitkovetta/staining-normalization; see the module
    constants). The OD component outside the H–E plane is dropped, as in the method.
    """

    def __init__(self, *, beta: float = 0.15, alpha: float = 1.0, percentile: float = 99.0,
                 min_pixels: int = MIN_TISSUE_PIXELS):
        self.beta, self.alpha, self.percentile, self.min_pixels = beta, alpha, percentile, min_pixels
        self.stains = REFERENCE_STAINS.copy()
        self.max_conc = REFERENCE_MAX_CONC.copy()

    def fit(self, target_rgb: np.ndarray) -> "MacenkoNormalizer":
        """Target stains and max concentrations from a tile (or a batch, pooled). Raises StainError."""
        od = _planes(target_rgb)
        self.stains = _stains_from_od(od, self.beta, self.alpha, self.min_pixels)
        self.max_conc = _max_conc(_mix(_unmix(self.stains).T, od), self.beta, self.percentile)
        return self

    def _one(self, tile: np.ndarray, fallback: bool) -> np.ndarray:
        od = _planes(tile)
        try:
            stains = _stains_from_od(od, self.beta, self.alpha, self.min_pixels)
        except StainError:
            if not fallback:
                raise
            # too little tissue to estimate anything: unmix with the reference stains, keep the
            # concentrations as they are (no percentile to match on a near-empty tile) and the
            # off-plane residual too, so glass stays glass; with the default target: identity
            conc = _mix(_unmix(REFERENCE_STAINS).T, od)
            od += _mix((self.stains - REFERENCE_STAINS).T, conc)
            return from_od(_pixels(od, tile.shape))
        conc = _mix(_unmix(stains).T, od)
        src = _max_conc(conc, self.beta, self.percentile)
        scale = np.where(src > 1e-6, self.max_conc / np.maximum(src, 1e-6), 1.0)
        return from_od(_pixels(_mix((scale[:, None] * self.stains).T, conc), tile.shape))

    def transform(self, rgb: np.ndarray, *, fallback: bool = True) -> np.ndarray:
        """Normalised uint8 tile(s), same shape. A batch ``[N, H, W, 3]`` is normalised tile by tile.

        A tile whose stains cannot be estimated (:class:`StainError`) is unmixed with
        :data:`REFERENCE_STAINS` and re-rendered unscaled with the target stains; with
        ``fallback=False`` the error propagates.
        """
        arr = _rgb(rgb)
        if arr.ndim == 4:
            return np.stack([self._one(t, fallback) for t in arr]) if len(arr) else arr.astype(np.uint8)
        if arr.ndim != 3:
            raise ValueError(f"expected a tile [H, W, 3] or a batch [N, H, W, 3], got shape {arr.shape}")
        return self._one(arr, fallback)


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a tile in CIE L*a*b* (skimage.color, D65)."""
    from skimage.color import rgb2lab

    return _lab_moments(rgb2lab(_rgb(rgb).astype(np.float32) / np.float32(255.0)))


def _lab_moments(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    planes = np.ascontiguousarray(lab.reshape(-1, 3).T, dtype=np.float64)
    return planes.mean(axis=1), planes.std(axis=1)


def _reinhard_one(tile: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb, rgb2lab

    # float32 throughout: skimage's conversions run ≈ 3× faster than in float64
    lab = rgb2lab(tile.astype(np.float32) / np.float32(255.0))
    m, s = _lab_moments(lab)
    gain = stds / np.maximum(s, 1e-6)
    lab = lab * gain.astype(np.float32) + (means - m * gain).astype(np.float32)
    rgb = lab2rgb(lab) * np.float32(255.0)
    return np.rint(np.clip(rgb, 0, 255)).astype(np.uint8)


def reinhard(rgb: np.ndarray, target_means, target_stds) -> np.ndarray:
    """Reinhard colour transfer in L*a*b*: each channel's mean and std set to the target's.

    E. Reinhard, M. Ashikhmin, B. Gooch, P. Shirley, "Color transfer between images", IEEE Computer
    Graphics and Applications 21(5):34–41, 2001 (which used the lαβ space; here CIE L*a*b* from
    skimage.color). Statistics are over all pixels of each tile; get the target's with
    :func:`lab_stats`. A batch is matched tile by tile. Out-of-gamut colours are clipped.
    """
    arr = _rgb(rgb)
    means = np.asarray(target_means, dtype=np.float64).reshape(3)
    stds = np.asarray(target_stds, dtype=np.float64).reshape(3)
    if arr.ndim == 4:
        return np.stack([_reinhard_one(t, means, stds) for t in arr]) if len(arr) else arr.astype(np.uint8)
    if arr.ndim != 3:
        raise ValueError(f"expected a tile [H, W, 3] or a batch [N, H, W, 3], got shape {arr.shape}")
    return _reinhard_one(arr, means, stds)


def stain_jitter(rgb: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.05,
                 bias: float = 0.05) -> np.ndarray:
    """HED stain augmentation after Tellez et al. 2018; uint8 of the input's shape.

    D. Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a
    reference to train distilled stain-invariant convolutional networks", IEEE Trans. Med.
    Imaging 37(9):2126–2136, 2018: colour-deconvolve into H, E, D; per channel ``c' = α c + β``
    with ``α ~ U(1 − sigma, 1 + sigma)`` and ``β ~ U(−bias, bias)``; recompose.

    Deconvolution: Ruifrok & Johnston's H/E/DAB matrix (:data:`HED_STAINS`, the one behind
    ``skimage.color.rgb2hed``) applied to this module's OD — not skimage's rgb2hed/hed2rgb, whose
    clipping at 0 would make zero jitter lossy. So ``sigma = bias = 0`` is the identity up to
    rounding.

    Background stays white: the additive ``β`` is weighted by ``min(1, OD_max / 0.3)²`` (``OD_max``
    the pixel's largest channel OD: glass at 240 gets ≈ 0.05, tissue darker than ≈ 190 gets 1),
    and ``α`` scales near-zero concentrations by near nothing; pure white stays exactly white.

    ``rng`` is a :class:`numpy.random.Generator`; each tile draws 6 numbers (α then β, H/E/D), so a
    batch ``[N, H, W, 3]`` gets a different draw per tile and equals N single-tile calls on the
    same generator.
    """
    arr = _rgb(rgb)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a tile [H, W, 3] or a batch [N, H, W, 3], got shape {arr.shape}")
    batch = arr if arr.ndim == 4 else arr[None]
    n = len(batch)
    u = rng.uniform(0.0, 1.0, size=(n, 2, 3))
    a = (1.0 - sigma + 2.0 * sigma * u[:, 0]).astype(np.float32)
    b = (-bias + 2.0 * bias * u[:, 1]).astype(np.float32)
    out = np.empty(batch.shape, np.uint8)
    for i, tile in enumerate(batch):
        od = _planes(tile)
        conc = _mix(_HED_FROM_RGB.T, od)                     # [3, P]: H, E, D
        weight = np.maximum(np.maximum(od[0], od[1]), od[2])
        weight *= np.float32(1.0 / _JITTER_FADE_OD)
        np.minimum(weight, 1.0, out=weight)
        weight *= weight
        conc *= a[i][:, None]
        conc += b[i][:, None] * weight
        out[i] = from_od(_pixels(_mix(HED_STAINS.T, conc), tile.shape))
    return out if arr.ndim == 4 else out[0]
