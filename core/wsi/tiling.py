"""Cutting a slide into tiles of a fixed physical size: parameters, the tissue-filtered grid, and a
preview of mask and grid. All coordinates are level-0 pixels, ``(x, y)``."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.errors import NoTissueError
from core.vocab import MIN_TISSUE, STRIDES
from core.wsi.slide import Slide
from core.wsi.tissue import TissueMask, _as_rgb


@dataclass(frozen=True)
class TilingParams:
    """How a slide is cut: physical tile size, the model's µm/px, the tissue threshold and the
    stride as a fraction of the tile (1: the default non-overlapping grid; ½ or ¼: a high-resolution
    run of overlapping tiles, HisToSGE-style, with stride⁻² as many tiles)."""

    tile_um: float = 112.0
    mpp: float = 1.0
    min_tissue: float = MIN_TISSUE
    mask_mpp: float = 8.0
    stride: float = 1.0

    def __post_init__(self):
        if self.stride not in STRIDES:
            raise ValueError(f"stride {self.stride!r}: use one of {', '.join(f'{s:g}' for s in STRIDES)} "
                             "(a fraction of the tile)")

    @property
    def out_px(self) -> int:
        return int(round(self.tile_um / self.mpp))

    @property
    def high_res(self) -> bool:
        return self.stride != 1.0

    def key(self) -> str:
        values = asdict(self)
        if not self.high_res:      # the keys of default-grid runs are those from before strides existed
            values.pop("stride")
        payload = json.dumps(values, sort_keys=True).encode()
        return hashlib.blake2b(payload, digest_size=8).hexdigest()


@dataclass(frozen=True)
class TileGrid:
    """Tiles kept on a slide: top-left ``xy`` in level-0 px, square side ``size_level0``."""

    xy: np.ndarray
    size_level0: int
    tissue: np.ndarray
    params: TilingParams

    def __len__(self) -> int:
        return len(self.xy)


def tissue_mask(slide: Slide, *, mask_mpp: float = 8.0):
    """Tissue detection on a thumbnail of about ``mask_mpp`` µm/px.

    Returns ``(TissueMask, thumbnail RGB, level-0 px per mask px)``; see :mod:`core.wsi.tissue`
    (saturation/optical-density Otsu with floors, cleanup, pen-ink and padding rejection).
    """
    from core.wsi.tissue import detect_tissue

    w, h = slide.dimensions
    scale = max(mask_mpp / slide.mpp, 1.0)
    thumb = np.asarray(slide.thumbnail(int(max(w, h) / scale)))
    mask_scale = w / thumb.shape[1]
    return detect_tissue(thumb, mpp=slide.mpp * mask_scale), thumb, mask_scale


def tile_grid(slide: Slide, params: TilingParams, *, tissue=None) -> TileGrid:
    """A grid of ``params.tile_um`` µm tiles keeping those with enough tissue: non-overlapping at
    stride 1; at stride ½ or ¼ the tiles start every ½ or ¼ tile and overlap, and the tiles of the
    default grid are among them (their top-left corners are multiples of the tile side).

    ``tissue`` may be a precomputed ``(TissueMask, thumb, mask_scale)`` from :func:`tissue_mask`.
    """
    from core.wsi.tissue import tile_tissue_fraction

    size = int(round(params.tile_um / slide.mpp))
    step = grid_step(size, params.stride)
    w, h = slide.dimensions
    detected, _, mask_scale = tissue or tissue_mask(slide, mask_mpp=params.mask_mpp)
    gx, gy = np.meshgrid(np.arange(0, w - size + 1, step), np.arange(0, h - size + 1, step))
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    frac = tile_tissue_fraction(detected.mask, mask_scale, xy, size)
    keep = frac >= params.min_tissue
    if not keep.any():
        raise NoTissueError(
            f"{slide.path.name}: no {params.tile_um:g} µm tile has ≥ {params.min_tissue:.0%} tissue "
            f"(tissue covers {detected.fraction:.1%} of the slide). Check the slide, or lower the "
            "tissue threshold."
        )
    return TileGrid(xy=xy[keep], size_level0=size, tissue=frac[keep].astype(np.float32), params=params)


def grid_step(size_level0: int, stride: float) -> int:
    """Level-0 px between neighbouring tiles: the tile side times the stride, rounded so that the
    default grid's corners (multiples of the side) stay on the finer grid when it divides evenly."""
    if stride == 1.0:
        return int(size_level0)
    n = int(round(1.0 / stride))
    return max(1, int(size_level0) // n) if int(size_level0) % n == 0 else max(1, int(round(size_level0 * stride)))


def default_grid(xy: np.ndarray, size_level0: int) -> np.ndarray:
    """Which tiles of a (high-resolution) grid are tiles of the default grid: corners at multiples
    of the tile side. Where none are (a side the stride does not divide), all tiles count."""
    on = (np.asarray(xy) % int(size_level0) == 0).all(axis=1)
    return on if on.any() else np.ones(len(on), bool)


def preview(path: str | Path, params: TilingParams, *, mpp_override: float | None = None,
            max_px: int = 1024) -> tuple[np.ndarray, dict]:
    """The tissue mask and tile grid drawn over a thumbnail of up to ``max_px``, plus figures.

    The mask is computed at ``params.mask_mpp`` as for tiling, then drawn on a sharper thumbnail.
    """
    with Slide(path, mpp_override=mpp_override) as slide:
        detected, thumb, mask_scale = tissue_mask(slide, mask_mpp=params.mask_mpp)
        try:
            grid = tile_grid(slide, params, tissue=(detected, thumb, mask_scale))
        except NoTissueError:
            grid = None
        w, h = slide.dimensions
        display = np.asarray(slide.thumbnail(min(max_px, max(w, h))))
        scale = w / display.shape[1]
        image = render_preview(display, detected, grid=None if grid is None else (grid.xy, grid.size_level0),
                               scale=scale)
        tile_px = int(round(params.tile_um / slide.mpp))
    return image, {"tissue_fraction": detected.fraction, "n_tiles": 0 if grid is None else len(grid),
                   "pen_px": int(detected.pen.sum()), "tile_px": tile_px}


def render_preview(
    thumb_rgb: np.ndarray,
    tissue_mask,
    pen: np.ndarray | None = None,
    grid=None,
    *,
    scale: float = 1.0,
    alpha: float = 0.35,
) -> np.ndarray:
    """The thumbnail with non-tissue greyed, tissue outlined in green, pen red, tiles blue.

    ``tissue_mask`` is a boolean mask or a :class:`TissueMask` (whose ``pen`` is used when
    ``pen`` is None); masks of another size are resized to the thumbnail. ``grid`` is an
    object with ``xy`` (level-0 top-left, ``(N, 2)``) and ``size_level0``, or a tuple
    ``(xy, size_level0)``; ``scale`` is level-0 px per thumbnail px; ``alpha`` how far
    non-tissue is blended towards grey. Returns uint8 RGB of the thumbnail's size.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    thumb = _as_rgb(thumb_rgb)
    if isinstance(tissue_mask, TissueMask):
        pen = tissue_mask.pen if pen is None else pen
        tissue_mask = tissue_mask.mask
    tissue = _fit_mask(tissue_mask, thumb.shape[:2])
    out = thumb.astype(np.float32)
    out[~tissue] = (1 - alpha) * out[~tissue] + alpha * 90.0  # grey out what is not tiled
    if pen is not None:
        ink = _fit_mask(pen, thumb.shape[:2])
        out[ink] = 0.3 * out[ink] + 0.7 * np.array([230, 20, 20], np.float32)
    edge = tissue & ~ndimage.binary_erosion(tissue, iterations=1, border_value=0)
    out[edge] = (0, 200, 60)
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if grid is not None:
        xy, size = (grid.xy, grid.size_level0) if hasattr(grid, "xy") else grid
        draw = ImageDraw.Draw(img)
        side = size / scale
        for x, y in np.asarray(xy, np.float64).reshape(-1, 2) / scale:
            draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(40, 80, 220))
    return np.asarray(img)


def _fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized (nearest) to ``shape`` (rows, cols) if needed."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    from PIL import Image

    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(img) > 127
