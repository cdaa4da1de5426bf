"""Spatial-transcriptomics sections as training and evaluation samples.

A folder in one of three layouts — ``her2st`` (legacy ST as published with HER2ST), ``visium``
(a 10x Space Ranger ``outs`` folder) or ``hest`` (an ``.h5ad`` beside its WSI; Tessera's
synthetic sections) — is read into one :class:`SpatialSection`. The layouts and their readers
are described in :mod:`core.training.st_layouts`; this module detects the layout, reads and finds
sections, cuts spot patches and builds the gene panel and training targets.

Spot centres are ``(x, y)`` level-0 px of ``image_path``; sizes are in µm unless named ``_px``.
Gene symbols that occur more than once are **summed** into one column (counts of one symbol).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.errors import SectionFormatError, TesseraError
from core.training.reference import log_normalize
# SpatialSection and the layout constants are re-exported: import them from here. SectionFormatError
# lives in core.errors; ``from core.training.stdata import SectionFormatError`` keeps working.
from core.training.st_layouts import (ST_PITCH_UM, ST_SPOT_UM, VISIUM_SPOT_UM, WSI_SUFFIXES,  # noqa: F401
                                      SpatialSection, _her2st_counts, _read_hest, _read_her2st, _read_visium)
from core.wsi.slide import Slide

log = logging.getLogger(__name__)


def detect_layout(path: str | Path) -> str | None:
    """``"visium"``, ``"her2st"``, ``"hest"`` or None for a folder (or a file inside one)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".h5ad":
            return "hest"
        path = path.parent
    if not path.is_dir():
        return None
    if (path / "filtered_feature_bc_matrix.h5").is_file() or (path / "spatial" / "scalefactors_json.json").is_file():
        return "visium"
    if _her2st_counts(path) or list(path.glob("*_selection.tsv*")):
        return "her2st"
    if list(path.glob("*.h5ad")):
        return "hest"
    return None


def read_section(path: str | Path, *, image: str | Path | None = None) -> SpatialSection:
    """Read one section from a folder (or its counts / ``.h5ad`` file), detecting the layout.

    ``image`` replaces the image found in the folder (its pixels must be in the coordinate
    frame of the spot table); for Visium it is the full-resolution TIFF/SVS, without which the
    hires PNG is used with coordinates and µm/px scaled by ``tissue_hires_scalef``.
    """
    path = Path(path)
    if not path.exists():
        raise SectionFormatError(f"{path}: no such file or folder.")
    layout = detect_layout(path)
    if layout is None:
        raise SectionFormatError(
            f"{path}: no spatial-transcriptomics section recognised. Expected one of: a Space Ranger "
            "folder (filtered_feature_bc_matrix.h5 + spatial/), a legacy ST / HER2ST folder "
            "(<S>.tsv.gz + <S>_selection.tsv + H&E .jpg), or an .h5ad with obsm['spatial'] beside its WSI.")
    reader = {"visium": _read_visium, "her2st": _read_her2st, "hest": _read_hest}[layout]
    section = reader(path, image=Path(image) if image else None)
    _check_inside(section)
    log.info("%s (%s): %d spots × %d genes, %.4f µm/px from %s", section.name, layout, len(section),
             section.counts.n_vars, section.mpp, section.mpp_source)
    return section


def find_sections(directory: str | Path) -> list[SpatialSection]:
    """Every section under ``directory`` (any layout, any depth), sorted by name.

    Incomplete candidates are skipped with a warning; if nothing is found the error lists them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SectionFormatError(f"{directory}: not a folder.")
    sections, problems = [], []
    for candidate in _candidates(directory):
        try:
            sections.append(read_section(candidate))
        except TesseraError as exc:  # an incomplete folder or an unreadable image: skip it, say why
            log.warning("skipping %s: %s", candidate, exc)
            problems.append(str(exc))
    if not sections:
        detail = (" Problems: " + " | ".join(problems)) if problems else ""
        raise SectionFormatError(f"{directory}: no spatial-transcriptomics section found.{detail}")
    return sorted(sections, key=lambda s: s.name)


def _candidates(root: Path):
    layout = detect_layout(root)
    if layout == "hest" and len(list(root.glob("*.h5ad"))) > 1:
        yield from sorted(root.glob("*.h5ad"))
        return
    if layout is not None:
        yield root
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            yield from _candidates(child)


def _check_inside(section: SpatialSection) -> None:
    """Spots off the image mean a wrong image or coordinate frame: warn, or fail if all are off."""
    with Slide(section.image_path, mpp_override=section.mpp) as slide:
        w, h = slide.dimensions
    x, y = section.xy[:, 0], section.xy[:, 1]
    outside = ~((x >= 0) & (y >= 0) & (x < w) & (y < h))
    if outside.all():
        raise SectionFormatError(f"{section.name}: no spot centre lies on {section.image_path.name} ({w}×{h} px); "
                                 "the image does not match the spot coordinates (wrong image or scale).")
    if outside.any():
        log.warning("%s: %d of %d spots lie outside %s", section.name, outside.sum(), len(x), section.image_path.name)


def section_patches(section: SpatialSection, *, tile_um: float, mpp: float,
                    out_px: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A square of ``tile_um`` µm centred on each spot, resampled to ``mpp`` µm/px.

    Returns ``(patches uint8 (K, out_px, out_px, 3), keep (N,) bool)``: spots whose square
    leaves the image are dropped (``keep`` is False). ``out_px`` defaults to ``tile_um / mpp``.
    Regions are read through :meth:`core.wsi.slide.Slide.read_region`, so pyramids are used; a
    plain JPEG/PNG is decoded once per call.
    """
    out_px = int(out_px or round(tile_um / mpp))
    size = int(round(tile_um / section.mpp))  # level-0 px
    top_left = np.round(section.xy - size / 2).astype(np.int64)
    with Slide(section.image_path, mpp_override=section.mpp) as slide:
        w, h = slide.dimensions
        keep = (top_left >= 0).all(axis=1) & (top_left[:, 0] + size <= w) & (top_left[:, 1] + size <= h)
        patches = np.empty((int(keep.sum()), out_px, out_px, 3), np.uint8)
        for i, (x, y) in enumerate(top_left[keep]):
            patches[i] = slide.read_region((int(x), int(y)), size, out_px)
    if not keep.all():
        log.info("%s: %d of %d spots dropped (their %g µm patch leaves the image)", section.name,
                 (~keep).sum(), len(keep), tile_um)
    return patches, keep


def read_gene_list(path: str | Path) -> list[str]:
    """Genes from a text file, one per line (first comma/tab field; '#' lines ignored), in order.

    Raises :class:`core.errors.SectionFormatError` for a missing, unreadable or empty file.
    """
    path = Path(path)
    how = "a text file with one gene symbol per line"
    if not path.is_file():
        raise SectionFormatError(f"{path}: no such gene-panel file ({'a folder' if path.is_dir() else 'missing'}); "
                                 f"pass {how}.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SectionFormatError(f"{path}: the gene-panel file cannot be read as text ({type(exc).__name__}); "
                                 f"pass {how}.") from exc
    genes = []
    for line in text.splitlines():
        token = line.replace(",", "\t").split("\t")[0].strip()
        if token and not token.startswith("#"):
            genes.append(token)
    if not genes:
        raise SectionFormatError(f"{path}: the gene-panel file lists no gene; put {how} (or omit the panel "
                                 "to use every gene the sections share).")
    return list(dict.fromkeys(genes))


def panel_genes(sections: list[SpatialSection], panel_file: str | Path | None = None) -> list[str]:
    """Genes measured in every section, intersected with ``panel_file`` when given.

    Order: the panel file's when given, else the first section's. A missing, unreadable or empty
    panel file, or an empty result, raises :class:`core.errors.SectionFormatError`.
    """
    if not sections:
        raise SectionFormatError("No sections given: cannot choose a gene panel.")
    order = read_gene_list(panel_file) if panel_file else list(sections[0].counts.var_names)
    common = set(sections[0].counts.var_names).intersection(*(s.counts.var_names for s in sections[1:]))
    genes = [g for g in order if g in common]
    if not genes:
        raise SectionFormatError(f"No gene is measured in all {len(sections)} sections"
                                 f"{' and listed in ' + str(panel_file) if panel_file else ''}; "
                                 "check that gene symbols (not Ensembl IDs) are used everywhere.")
    return genes


def targets(section: SpatialSection, genes: list[str]) -> np.ndarray:
    """Training targets (N, G) float32: counts normalised to 10⁴ per spot over ``genes``, then log1p."""
    import scipy.sparse as sp

    missing = [g for g in genes if g not in section.counts.var_names]
    if missing:
        raise SectionFormatError(f"{section.name}: {len(missing)} panel genes are not measured, e.g. "
                                 f"{missing[:5]}; choose the panel with panel_genes() over all sections.")
    x = section.counts[:, genes].X
    return log_normalize(x.toarray() if sp.issparse(x) else np.asarray(x))
