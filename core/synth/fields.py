"""Cheap random fields and resampling helpers shared by the tissue layout and the renderer.

All arrays are indexed ``[row, col]`` = ``[y, x]``. Every function is vectorised: there is
no Python loop over pixels anywhere, only over a handful of axes or octaves.
"""
from __future__ import annotations

import contextlib

import numpy as np
from scipy import ndimage


def single_threaded_blas():
    """Context manager limiting BLAS to one thread: our matrix products are thin, and a
    multi-threaded OpenBLAS is several times slower on them than one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional dependency: only a speed matter
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def upsample_linear(a: np.ndarray, factor: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinear upsampling of a 2-D float array by an integer ``factor`` along both axes.

    Sample ``i`` of the input sits at output position ``i * factor``; the output is cropped or
    edge-padded to ``shape`` (rows, cols) when given.
    """
    a = np.asarray(a, np.float32)
    if factor >= 4 and a.ndim == 2:  # small input: two thin matrix products beat element-wise passes
        rows, cols = shape if shape is not None else (a.shape[0] * factor, a.shape[1] * factor)
        return (_interp_matrix(rows, a.shape[0], factor) @ a) @ _interp_matrix(cols, a.shape[1], factor).T
    out = _up_axis(_up_axis(a, factor, 0), factor, 1)
    if shape is not None:
        out = _fit(out, shape)
    return out


def _interp_matrix(n_out: int, n_in: int, factor: int) -> np.ndarray:
    """Linear-interpolation weights (n_out × n_in); positions past the last sample are clamped."""
    pos = np.minimum(np.arange(n_out, dtype=np.float64) / factor, n_in - 1)
    i0 = np.minimum(pos.astype(int), max(n_in - 2, 0))
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - w
    if n_in > 1:
        m[np.arange(n_out), i0 + 1] += w
    return m


def _up_axis(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    if f == 1:
        return a
    a = np.moveaxis(a, axis, 0)
    w = (np.arange(f, dtype=np.float32) / f).reshape((1, f) + (1,) * (a.ndim - 1))
    lo, hi = a[:-1, None], a[1:, None]
    mid = (lo + (hi - lo) * w).reshape((-1,) + a.shape[1:])
    out = np.concatenate([mid, np.repeat(a[-1:], f, axis=0)], axis=0)
    return np.moveaxis(out, 0, axis)


def _fit(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop (or edge-pad) the first two axes of ``a`` to ``shape``."""
    a = a[: shape[0], : shape[1]]
    pad = [(0, shape[0] - a.shape[0]), (0, shape[1] - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    return a


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ~``scale`` px.

    Built on a coarse lattice (spacing ``scale / 3``) and bilinearly upsampled, so the cost is
    dominated by the final resolution, not by the correlation length.
    """
    if scale <= 48:  # fine-grained: one filtered periodic tile, repeated (period ≫ scale)
        tile = 256
        t = ndimage.gaussian_filter(rng.standard_normal((tile, tile)).astype(np.float32), scale / 2.0, mode="wrap")
        t = (t - t.mean()) / (t.std() + 1e-6)
        reps = (-(-shape[0] // tile), -(-shape[1] // tile))
        return np.tile(t, reps)[: shape[0], : shape[1]]
    step = max(1, int(round(scale / 3.0)))
    coarse = (shape[0] // step + 3, shape[1] // step + 3)
    base = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 1.0, mode="wrap")
    field = upsample_linear(base, step, shape)
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def noise_strip(rng: np.random.Generator, cols: int, sigma: float, tile: int = 512) -> np.ndarray:
    """A ``tile``×``cols`` strip of smoothed unit-variance noise, made from one periodic tile.

    A ``tile``² patch is filtered with wrap-around boundaries and tiled horizontally, so the strip
    costs one small filter. The renderer re-uses the strip for every band of rows; the period
    (``tile`` px) is far larger than any nucleus, so the repetition is not visible.
    """
    t = rng.standard_normal((tile, tile)).astype(np.float32)
    if sigma > 0:
        t = ndimage.gaussian_filter(t, sigma, mode="wrap")
    t -= t.mean()
    t /= t.std() + 1e-6
    return np.ascontiguousarray(np.tile(t, (1, -(-cols // tile)))[:, :cols])


def blur121(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 binomial blur (σ ≈ 0.7 px) along both axes, edges replicated."""
    b = np.empty_like(a)
    b[1:-1] = (a[:-2] + 2 * a[1:-1] + a[2:]) * 0.25
    b[0], b[-1] = a[0], a[-1]
    c = np.empty_like(b)
    c[:, 1:-1] = (b[:, :-2] + 2 * b[:, 1:-1] + b[:, 2:]) * 0.25
    c[:, 0], c[:, -1] = b[:, 0], b[:, -1]
    return c


def downsample_area(a: np.ndarray, factor: int) -> np.ndarray:
    """Area-average downsampling by an integer factor (edge-padded to a multiple of it)."""
    h, w = a.shape[:2]
    H, W = -(-h // factor) * factor, -(-w // factor) * factor
    if (H, W) != (h, w):
        a = np.pad(a, [(0, H - h), (0, W - w)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    if factor == 2 and a.dtype == np.uint8:  # fast path for image pyramids: integer sums
        s = a[0::2, 0::2].astype(np.uint16)
        s += a[1::2, 0::2]
        s += a[0::2, 1::2]
        s += a[1::2, 1::2]
        return s.astype(np.float32) * np.float32(0.25)
    blocks = a.reshape((H // factor, factor, W // factor, factor) + a.shape[2:])
    return blocks.mean(axis=(1, 3), dtype=np.float32)
