"""The built-in synthetic TCGA-BRCA demo world (deterministic under a seed).

Public entry points: :func:`build_world` (everything on disk), :func:`make_reference` and
:func:`expected_profiles` (single-cell reference), :func:`layout_tissue` + :func:`render_he`
(one H&E image), :func:`write_pyramidal_tiff` (OpenSlide-readable slides) and
:func:`tile_truth` (true composition / expression per tile). Heavy modules load lazily.
"""
from __future__ import annotations

from core.synth.reference import CELL_TYPES, GENES, SUBTYPES, expected_profiles, make_reference

__all__ = ["CELL_TYPES", "GENES", "SUBTYPES", "expected_profiles", "make_reference", "build_world",
           "layout_tissue", "render_he", "write_pyramidal_tiff", "tile_truth", "TissueParams", "sample_params"]


def __getattr__(name):
    if name == "build_world":
        from core.synth.world import build_world
        return build_world
    if name in ("layout_tissue", "TissueParams", "sample_params"):
        from core.synth import tissue
        return getattr(tissue, name)
    if name == "render_he":
        from core.synth.render import render_he
        return render_he
    if name == "write_pyramidal_tiff":
        from core.synth.tiff import write_pyramidal_tiff
        return write_pyramidal_tiff
    if name == "tile_truth":
        from core.synth.truth import tile_truth
        return tile_truth
    raise AttributeError(name)
