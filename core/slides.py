"""Whole-slide images: a lazy OpenSlide handle, the µm/px chain, tissue mask and tile grid.

All coordinates are level-0 pixels, ``(x, y)``, unless a name says otherwise.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from core.errors import MissingMppError, NoTissueError, SlideOpenError

log = logging.getLogger(__name__)

_RES_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def mpp_from_properties(props: dict) -> tuple[float | None, str]:
    """Resolve µm/px from slide properties; returns (mpp, source) or (None, "unknown").

    Order: ``openslide.mpp-x`` (OpenSlide's own reading, set for Aperio/Hamamatsu/generic TIFF
    with a metric resolution unit), ``aperio.MPP``, then TIFF resolution + unit.
    """
    for key in ("openslide.mpp-x", "aperio.MPP"):
        try:
            value = float(props[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value, key
    try:
        res = float(props["tiff.XResolution"])
        unit = str(props.get("tiff.ResolutionUnit", "")).lower()
        if res > 0 and unit in _RES_UNIT_UM:
            return _RES_UNIT_UM[unit] / res, "tiff.XResolution"
    except (KeyError, TypeError, ValueError):
        pass
    return None, "unknown"


class Slide:
    """A whole-slide image opened lazily with OpenSlide; use as a context manager.

    ``mpp`` is level-0 µm/px from the metadata chain or ``mpp_override``; if neither is known,
    accessing it raises :class:`MissingMppError` saying how to set it.
    """

    def __init__(self, path: str | Path, *, mpp_override: float | None = None):
        self.path = Path(path)
        self._mpp_override = mpp_override
        self._osr = None

    @property
    def osr(self):
        if self._osr is None:
            import openslide

            if not self.path.is_file():
                raise SlideOpenError(f"Slide file not found: {self.path}")
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
                raise SlideOpenError(
                    f"OpenSlide cannot open {self.path.name}: {exc}. Supported: SVS, NDPI, MRXS, "
                    "SCN, BIF, VMS, generic tiled TIFF."
                ) from exc
        return self._osr

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            w, h = self.dimensions
            mpp = self._mpp_or_none()
            return (f"Slide({self.path.name!r}, {w}x{h} px, levels={self.level_count}, "
                    f"mpp={mpp if mpp else 'unknown'}, vendor={self.vendor})")
        except Exception:  # repr must never raise
            return f"Slide({self.path.name!r}, unopened)"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.osr.dimensions

    @property
    def level_count(self) -> int:
        return self.osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.osr.level_downsamples

    @property
    def vendor(self) -> str:
        return self.osr.properties.get("openslide.vendor", "unknown")

    @cached_property
    def _meta_mpp(self) -> tuple[float | None, str]:
        return mpp_from_properties(dict(self.osr.properties))

    def _mpp_or_none(self) -> float | None:
        return self._mpp_override or self._meta_mpp[0]

    @property
    def mpp_source(self) -> str:
        return "override" if self._mpp_override else self._meta_mpp[1]

    @property
    def mpp(self) -> float:
        mpp = self._mpp_or_none()
        if mpp is None:
            raise MissingMppError(
                f"{self.path.name}: the pixel size (µm/px) is not in the slide metadata. "
                "Set it with an --mpp override file (CSV 'slide,mpp') or on the Slide page."
            )
        return mpp

    def read_region(self, xy: tuple[int, int], size_level0: int, out_px: int) -> np.ndarray:
        """Read a square of ``size_level0`` level-0 px at top-left ``xy``, resized to ``out_px``.

        Reads from the coarsest pyramid level that still has at least ``out_px`` pixels across
        the region, so a 40× scan and a 20× scan give the same physical tile.
        """
        from PIL import Image

        downsample = size_level0 / out_px
        level = self.osr.get_best_level_for_downsample(downsample + 1e-6)
        level_ds = self.level_downsamples[level]
        read_px = max(1, int(round(size_level0 / level_ds)))
        region = self.osr.read_region((int(xy[0]), int(xy[1])), level, (read_px, read_px))
        region = _flatten_rgba(region)
        if read_px != out_px:
            region = region.resize((out_px, out_px), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(region)

    def thumbnail(self, max_px: int = 1024):
        """An RGB PIL thumbnail whose long side is at most ``max_px``."""
        return _flatten_rgba(self.osr.get_thumbnail((max_px, max_px)))


def _flatten_rgba(img):
    """Composite RGBA (transparent outside the scanned area) onto white glass, return RGB."""
    from PIL import Image

    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


@dataclass(frozen=True)
class TilingParams:
    """How a slide is cut: physical tile size, the model's µm/px and the tissue threshold."""

    tile_um: float = 112.0
    mpp: float = 1.0
    min_tissue: float = 0.3
    mask_mpp: float = 8.0

    @property
    def out_px(self) -> int:
        return int(round(self.tile_um / self.mpp))

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
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


def tissue_mask(slide: Slide, *, mask_mpp: float = 8.0) -> tuple[np.ndarray, float]:
    """Boolean tissue mask on a thumbnail; returns (mask, level-0 px per mask px).

    Tissue = saturated (Otsu on HSV saturation) and not near-white glass, cleaned with a
    morphological close/open and hole filling. Pen marks and debris are handled in issue 3.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    w, h = slide.dimensions
    scale = max(mask_mpp / slide.mpp, 1.0)
    thumb = slide.thumbnail(int(max(w, h) / scale))
    rgb = np.asarray(thumb).astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    try:
        thr = max(threshold_otsu(sat), 0.05)
    except ValueError:  # constant image
        thr = 1.0
    mask = (sat > thr) & (rgb.mean(axis=2) < 0.92)
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    return mask, w / mask.shape[1]


def tile_grid(slide: Slide, params: TilingParams) -> TileGrid:
    """A non-overlapping grid of tiles of ``params.tile_um`` µm over the tissue."""
    size = int(round(params.tile_um / slide.mpp))
    w, h = slide.dimensions
    mask, mask_scale = tissue_mask(slide, mask_mpp=params.mask_mpp)
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    xs = np.arange(0, w - size + 1, size)
    ys = np.arange(0, h - size + 1, size)
    gx, gy = np.meshgrid(xs, ys)
    x0 = np.clip((gx / mask_scale).astype(int), 0, mask.shape[1])
    y0 = np.clip((gy / mask_scale).astype(int), 0, mask.shape[0])
    x1 = np.clip(((gx + size) / mask_scale).astype(int), 0, mask.shape[1])
    y1 = np.clip(((gy + size) / mask_scale).astype(int), 0, mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    keep = frac >= params.min_tissue
    if not keep.any():
        raise NoTissueError(
            f"{slide.path.name}: no tile has ≥ {params.min_tissue:.0%} tissue. Check the slide, "
            "or lower the tissue threshold."
        )
    xy = np.stack([gx[keep], gy[keep]], axis=1).astype(np.int64)
    return TileGrid(xy=xy, size_level0=size, tissue=frac[keep].astype(np.float32), params=params)


def file_fingerprint(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Content hash (BLAKE2b-128) of the whole file: moving a slide keeps it, editing changes it."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
