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
    with a metric resolution unit), ``aperio.MPP``, TIFF resolution + unit, and last the
    objective power (10 / power, e.g. 40× → 0.25): only an *estimate*, since scanners differ,
    so its source says so and importers warn.
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
    try:
        power = float(props["openslide.objective-power"])
        if power > 0:
            return 10.0 / power, "objective-power (estimate)"
    except (KeyError, TypeError, ValueError):
        pass
    return None, "unknown"


PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _open_plain_image(path: Path):
    """A JPEG/PNG as a one-level ``openslide.ImageSlide`` (decoded once, on the first read).

    It has no metadata, so µm/px must come from ``mpp_override``. Large H&E JPEGs (e.g. HER2ST,
    ~92 Mpx) exceed PIL's decompression-bomb warning threshold; that warning is silenced here.
    """
    import warnings

    import openslide
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return openslide.ImageSlide(str(path))
    except Image.DecompressionBombError as exc:
        raise SlideOpenError(f"{path.name}: too large for a plain image ({exc}); convert it to a tiled "
                             "pyramidal TIFF (vips tiffsave --tile --pyramid).", kind="unsupported") from exc
    except OSError as exc:
        raise SlideOpenError(f"{path.name}: not a readable image ({exc}); it may be damaged.") from exc


class Slide:
    """A whole-slide image opened lazily with OpenSlide; use as a context manager.

    Plain ``.jpg``/``.jpeg``/``.png`` images open as a one-level ``openslide.ImageSlide``.
    ``mpp`` is level-0 µm/px from the metadata chain or ``mpp_override``; if neither is known
    (always the case for plain images), accessing it raises :class:`MissingMppError` saying
    how to set it.
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
                raise SlideOpenError(f"Slide file not found: {self.path}", kind="missing")
            if self.path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
                self._osr = _open_plain_image(self.path)
                return self._osr
            try:
                self._osr = openslide.OpenSlide(str(self.path))
            except openslide.OpenSlideUnsupportedFormatError as exc:
                raise SlideOpenError(
                    f"{self.path.name}: not a format OpenSlide reads ({exc or 'unsupported or missing file'}). "
                    "Supported: SVS, NDPI, MRXS, SCN, BIF, VMS, Philips TIFF, generic tiled TIFF; convert "
                    "other files (e.g. with vips tiffsave --tile --pyramid).", kind="unsupported"
                ) from exc
            except Exception as exc:  # OpenSlideError, OSError: a damaged or truncated file
                raise SlideOpenError(
                    f"{self.path.name}: OpenSlide cannot read this file ({exc}). It may be truncated or "
                    "damaged; download it again.", kind="unreadable"
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
    def objective_power(self) -> float | None:
        try:
            return float(self.osr.properties["openslide.objective-power"])
        except (KeyError, TypeError, ValueError):
            return None

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
    """A non-overlapping grid of ``params.tile_um`` µm tiles keeping those with enough tissue.

    ``tissue`` may be a precomputed ``(TissueMask, thumb, mask_scale)`` from :func:`tissue_mask`.
    """
    from core.wsi.tissue import tile_tissue_fraction

    size = int(round(params.tile_um / slide.mpp))
    w, h = slide.dimensions
    detected, _, mask_scale = tissue or tissue_mask(slide, mask_mpp=params.mask_mpp)
    gx, gy = np.meshgrid(np.arange(0, w - size + 1, size), np.arange(0, h - size + 1, size))
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


def file_fingerprint(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """Content hash (BLAKE2b-128) of the whole file: moving a slide keeps it, editing changes it."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def preview(path: str | Path, params: TilingParams, *, mpp_override: float | None = None,
            max_px: int = 1024) -> tuple[np.ndarray, dict]:
    """The tissue mask and tile grid drawn over a thumbnail of up to ``max_px``, plus figures.

    The mask is computed at ``params.mask_mpp`` as for tiling, then drawn on a sharper thumbnail.
    """
    from core.wsi.tissue import render_preview

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
