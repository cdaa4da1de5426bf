"""Tiled pyramidal TIFF writer that OpenSlide opens (vendor ``generic-tiff``) with its µm/px.

Every level is a full-resolution IFD (not a SubIFD), JPEG-compressed tiles, RGB, with the
pixel size stored as TIFF resolution in pixels per centimetre, which OpenSlide reports as
``openslide.mpp-x`` / ``openslide.mpp-y``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from core.synth.fields import downsample_area

log = logging.getLogger(__name__)


def pyramid(rgb: np.ndarray, *, min_side: int = 512, min_levels: int = 3) -> list[np.ndarray]:
    """Level 0 then 2× area-averaged downsamples until the long side is < ``min_side``.

    At least ``min_levels`` levels are produced while the image is larger than 1 px.
    """
    levels = [rgb]
    while (max(levels[-1].shape[:2]) >= min_side or len(levels) < min_levels) and min(levels[-1].shape[:2]) > 1:
        small = downsample_area(levels[-1], 2)
        levels.append(np.clip(small + 0.5, 0, 255).astype(np.uint8))
    return levels


def write_pyramidal_tiff(path, rgb: np.ndarray, *, mpp: float, tile: int = 256, jpeg_quality: int = 90) -> None:
    """Write ``rgb`` (uint8 [height, width, 3], level 0 at ``mpp`` µm/px) as a tiled pyramidal TIFF.

    Levels are 2× area-averaged downsamples (``pyramid``). The file is written to a temporary
    name and renamed, so a half-written slide is never visible under ``path``.
    """
    import tifffile

    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [height, width, 3], got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    levels = pyramid(rgb)
    with tifffile.TiffWriter(tmp) as tw:
        for i, level in enumerate(levels):
            level_mpp = mpp * 2 ** i
            res = 1e4 / level_mpp  # pixels per centimetre
            tw.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": jpeg_quality},
                     photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if i == 0 else 1, metadata=None, maxworkers=1)
    os.replace(tmp, path)
    log.debug("wrote %s: %d levels, level 0 %dx%d at %.3f µm/px", path.name, len(levels),
              rgb.shape[1], rgb.shape[0], mpp)
