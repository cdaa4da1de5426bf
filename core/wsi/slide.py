"""Whole-slide images: a lazy OpenSlide handle and the µm/px chain (tiling: :mod:`core.wsi.tiling`).

All coordinates are level-0 pixels, ``(x, y)``, unless a name says otherwise.
"""
from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import numpy as np

from core.errors import ImplausibleMppError, MissingMppError, SlideOpenError
from core.vocab import MPP_MAX, MPP_MIN, PLAIN_IMAGE_SUFFIXES

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


def mpp_plausible(mpp: float | None) -> bool:
    """True when ``mpp`` is a finite µm/px within ``MPP_MIN``–``MPP_MAX``."""
    try:
        return mpp is not None and MPP_MIN <= float(mpp) <= MPP_MAX
    except (TypeError, ValueError):
        return False


def implausible_mpp_message(name: str, mpp: float, source: str) -> str:
    """The message for a µm/px outside the plausible range (as shown to the user)."""
    hint = ""
    dpi = 25400 / mpp if np.isfinite(mpp) and mpp > 0 else 0.0
    if dpi and mpp > MPP_MAX and abs(dpi - round(dpi)) < 1e-3:  # e.g. 72 or 96 dpi: an image editor's default
        hint = f" ({dpi:.0f} px per inch: a screen or print resolution, not the scanner's)"
    return (f"{name}: the pixel size found ({source}) is {mpp:.4g} µm/px{hint}, outside the plausible range "
            f"{MPP_MIN:g}–{MPP_MAX:g} µm/px (typical: 0.25 at 40×, 0.5 at 20×). Set the right µm/px with an "
            "--mpp override file (CSV 'slide,mpp') or on the Slide page.")


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
        """µm/px when known and plausible (override first), else None."""
        mpp = self._mpp_override or self._meta_mpp[0]
        return mpp if mpp_plausible(mpp) else None

    @property
    def mpp_source(self) -> str:
        return "override" if self._mpp_override else self._meta_mpp[1]

    @property
    def mpp(self) -> float:
        """Level-0 µm/px; raises :class:`ImplausibleMppError` (a :class:`MissingMppError`) when the
        value found is outside ``MPP_MIN``–``MPP_MAX``, so nothing tiles a slide at e.g. 352 µm/px."""
        found = self._mpp_override or self._meta_mpp[0]
        if found is not None and not mpp_plausible(found):
            raise ImplausibleMppError(implausible_mpp_message(self.path.name, float(found), self.mpp_source))
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
