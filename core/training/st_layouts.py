"""Spatial-transcriptomics folder layouts: the section type and one reader per layout.

Three folder layouts are read into one :class:`SpatialSection` (detection, finding and the
training helpers live in :mod:`core.training.stdata`, which re-exports the names defined here;
:class:`core.errors.SectionFormatError` is raised for an incomplete or unreadable folder):

* ``her2st`` — legacy ST as published with HER2ST: ``<S>.tsv.gz`` (spots × genes, row index
  ``XxY`` array coordinates), ``<S>_selection.tsv`` (array ``x, y`` → ``pixel_x, pixel_y``)
  and a plain H&E JPEG. µm/px is derived from the 200 µm spot grid.
* ``visium`` — a 10x Space Ranger ``outs`` folder: ``filtered_feature_bc_matrix.h5`` +
  ``spatial/`` (positions, scale factors, hires/lowres images).
* ``hest`` — an ``.h5ad`` with ``obsm['spatial']`` + a WSI beside it (or HEST-1k's
  ``st/ wsis/ metadata/`` folders) + the pixel size in ``uns`` or a metadata JSON. Tessera's
  synthetic sections (``st/<ID>/section.h5ad`` + ``he.tiff``) use this layout.

Spot centres are ``(x, y)`` level-0 px of ``image_path``; sizes are in µm unless named ``_px``.
Gene symbols that occur more than once are **summed** into one column (counts of one symbol).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import MissingMppError, SectionFormatError
from core.wsi.slide import Slide

log = logging.getLogger(__name__)

ST_PITCH_UM = 200.0  # legacy ST: centre-to-centre distance of adjacent array positions
ST_SPOT_UM = 100.0
VISIUM_SPOT_UM = 55.0
WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi")
_POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@dataclass
class SpatialSection:
    """One ST section: raw spot counts, spot centres (x, y) in level-0 px of ``image_path``.

    ``mpp`` is µm per level-0 px of that image, ``mpp_source`` says how it was obtained;
    ``counts.obsm['spatial']`` holds the same centres as ``xy``.
    """

    name: str
    counts: "anndata.AnnData" = field(repr=False)  # noqa: F821 - spots × genes, raw counts, csr float32
    xy: np.ndarray = field(repr=False)  # (N, 2) float64, level-0 px
    image_path: Path
    mpp: float
    mpp_source: str
    spot_diameter_um: float
    layout: str

    def __len__(self) -> int:
        return self.counts.n_obs


def _her2st_counts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tsv*") if "_selection" not in p.name and p.suffix in (".gz", ".tsv"))


def _her2st_files(path: Path) -> tuple[str, Path, Path]:
    """(section id, counts table, selection table) of a legacy ST folder, or an actionable error."""
    folder = path.parent if path.is_file() else path
    counts = [path] if path.is_file() else _her2st_counts(folder)
    if len(counts) != 1:
        raise SectionFormatError(f"{folder}: a legacy ST section needs exactly one <S>.tsv.gz counts table (found: "
                                 f"{', '.join(p.name for p in counts) or 'none'}). Put each section in its own folder.")
    sid = counts[0].name.split(".tsv")[0]
    selection = next(iter(sorted(folder.glob(f"{sid}_selection.tsv*"))), None)
    if selection is None:
        raise SectionFormatError(f"{folder}: found the counts {counts[0].name} but no {sid}_selection.tsv "
                                 "(the spot table mapping array x, y to pixel_x, pixel_y in the H&E image). "
                                 "Put it beside the counts (HER2ST: data/ST-spotfiles/).")
    return sid, counts[0], selection


def _read_her2st(path: Path, *, image: Path | None) -> SpatialSection:
    sid, counts_file, selection = _her2st_files(path)
    image = image or _single_image(selection.parent, (".jpg", ".jpeg", ".png", ".tif", ".tiff"), "H&E image (.jpg)")
    sel = pd.read_csv(selection, sep="\t")
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(sel.columns)
    if missing:
        raise SectionFormatError(f"{selection.name}: missing columns {sorted(missing)}; expected x, y, "
                                 "pixel_x, pixel_y (and optionally selected).")
    sel = sel[sel["selected"].astype(int) == 1] if "selected" in sel.columns else sel
    sel.index = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"])]  # counts rows are "XxY", x first
    table = pd.read_csv(counts_file, sep="\t", index_col=0)
    spots = [s for s in table.index.astype(str) if s in sel.index]
    if len(spots) < 3:
        raise SectionFormatError(f"{sid}: only {len(spots)} spots are both in {counts_file.name} and selected "
                                 f"in {selection.name}; check that the files belong to the same section.")
    sel = sel[~sel.index.duplicated()].loc[spots]
    mpp = _grid_mpp(sel[["x", "y"]].to_numpy(float), sel[["pixel_x", "pixel_y"]].to_numpy(float), sid)
    obs = sel[["x", "y"]].astype(int).rename(columns={"x": "array_x", "y": "array_y"})
    adata = _make_adata(table.set_axis(table.index.astype(str)).loc[spots].to_numpy(np.float32), obs,
                        list(table.columns))
    return _section(sid, adata, sel[["pixel_x", "pixel_y"]].to_numpy(np.float64), image, mpp,
                    "spot grid (200 µm pitch)", ST_SPOT_UM, "her2st")


def _grid_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, name: str) -> float:
    """µm/px from a robust affine fit of spot pixels (x, y) against array positions (x, y).

    Trimmed least squares (drop residuals > 3 robust SD, refit, three rounds); the pixel size
    of one array step is sqrt(|det|) of the linear part, one step being 200 µm.
    """
    if len(np.unique(array_xy[:, 0])) < 2 or len(np.unique(array_xy[:, 1])) < 2:
        raise SectionFormatError(f"{name}: the spots span a single array row or column; the pixel size "
                                 "cannot be derived from the spot grid.")
    design = np.c_[np.ones(len(array_xy)), array_xy]
    inliers = np.ones(len(array_xy), bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[inliers], pixel_xy[inliers], rcond=None)
        resid = np.linalg.norm(pixel_xy - design @ coef, axis=1)
        mad = np.median(np.abs(resid[inliers] - np.median(resid[inliers])))
        inliers = resid <= max(np.median(resid[inliers]) + 3 * 1.4826 * mad, 1.0)
    linear = coef[1:]  # rows: d/d array_x, d/d array_y; columns: pixel x, y
    step_px = float(np.sqrt(abs(np.linalg.det(linear))))
    log.info("%s: %.1f px per array step (x %.1f, y %.1f; %d/%d spots inliers, median residual %.1f px)",
             name, step_px, np.linalg.norm(linear[0]), np.linalg.norm(linear[1]), inliers.sum(),
             len(inliers), np.median(resid[inliers]))
    return ST_PITCH_UM / step_px


def _visium_positions(folder: Path) -> tuple[pd.DataFrame, dict]:
    """In-tissue spot positions (indexed by barcode) and scale factors, or an actionable error."""
    spatial = folder / "spatial"
    new, old, scalefile = (spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv",
                           spatial / "scalefactors_json.json")
    for needed, ok in (("spatial/tissue_positions.csv (or tissue_positions_list.csv)", new.is_file() or old.is_file()),
                       ("spatial/scalefactors_json.json", scalefile.is_file()),
                       ("filtered_feature_bc_matrix.h5", (folder / "filtered_feature_bc_matrix.h5").is_file())):
        if not ok:
            raise SectionFormatError(f"{folder}: this Visium folder lacks {needed}. "
                                     "Copy the whole Space Ranger outs/ folder.")
    if new.is_file():  # Space Ranger ≥ 2.0: with a header
        pos = pd.read_csv(new, index_col=0)
    else:
        pos = pd.read_csv(old, header=None, index_col=0, names=["barcode", *_POSITION_COLUMNS])
    return pos[pos["in_tissue"].astype(int) == 1], json.loads(scalefile.read_text())


def _read_visium(path: Path, *, image: Path | None) -> SpatialSection:
    import scanpy as sc

    folder = path.parent if path.is_file() else path
    pos, scale = _visium_positions(folder)
    adata = sc.read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    spots = [b for b in adata.obs_names if b in pos.index]
    if not spots:
        raise SectionFormatError(f"{folder}: no barcode of filtered_feature_bc_matrix.h5 is an in-tissue spot "
                                 "of spatial/tissue_positions; are they from the same run?")
    pos = pos.loc[spots]
    adata = _make_adata(adata[spots].X, pos[["array_row", "array_col"]].astype(int), list(adata.var_names))
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)  # x = column
    diameter_px = float(scale["spot_diameter_fullres"])
    mpp, source = VISIUM_SPOT_UM / diameter_px, f"Visium spot diameter (55 µm = {diameter_px:.1f} full-res px)"
    if image is None:
        image, factor, which = _visium_image(folder, scale)
        xy, mpp = xy * factor, mpp / factor
        source += f"; {which} image, coordinates and µm/px scaled by {factor:g}"
    name = folder.parent.name if folder.name == "outs" else folder.name
    return _section(name, adata, xy, image, mpp, source, VISIUM_SPOT_UM, "visium")


def _visium_image(folder: Path, scale: dict) -> tuple[Path, float, str]:
    for which in ("hires", "lowres"):
        png = folder / "spatial" / f"tissue_{which}_image.png"
        if png.is_file() and f"tissue_{which}_scalef" in scale:
            log.info("%s: no full-resolution image given; using %s (pass image= for patches at full "
                     "resolution)", folder.name, png.name)
            return png, float(scale[f"tissue_{which}_scalef"]), which
    raise SectionFormatError(f"{folder}: no tissue_hires_image.png or tissue_lowres_image.png in spatial/; "
                             "pass the full-resolution H&E with image=.")


def _read_hest(path: Path, *, image: Path | None) -> SpatialSection:
    import anndata as ad

    h5ad = path
    if path.is_dir():
        files = sorted(path.glob("*.h5ad"))
        if len(files) != 1:
            raise SectionFormatError(f"{path}: holds {len(files)} .h5ad files; pass one of them.")
        h5ad = files[0]
    adata = ad.read_h5ad(h5ad)
    if "spatial" not in adata.obsm:
        raise SectionFormatError(f"{h5ad.name}: no obsm['spatial'] (spot centres as x, y full-resolution "
                                 "pixels of the WSI). Add it, e.g. adata.obsm['spatial'] = coords.")
    image = image or _hest_image(h5ad)
    # a self-contained folder (section.h5ad + he.tiff) is named by the folder, HEST-1k files by stem
    alone = image.parent == h5ad.parent and image.stem != h5ad.stem and len(list(h5ad.parent.glob("*.h5ad"))) == 1
    name = h5ad.parent.name if alone else h5ad.stem
    mpp, source = _hest_mpp(adata, h5ad, image)
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = _make_adata(x, adata.obs.copy(), list(adata.var_names))
    for key, value in adata.obsm.items():  # e.g. a synthetic section's true composition
        counts.obsm[key] = value
    return _section(name, counts, np.asarray(adata.obsm["spatial"], np.float64)[:, :2], image, mpp, source,
                    _hest_spot_um(adata, h5ad, mpp), "hest")


def _hest_image(h5ad: Path) -> Path:
    """The WSI of an .h5ad: ``<stem>.<ext>`` beside it, the only WSI beside it, or HEST-1k's wsis/."""
    beside = [p for p in sorted(h5ad.parent.iterdir()) if p.suffix.lower() in WSI_SUFFIXES]
    same_stem = [p for p in beside if p.stem == h5ad.stem]
    hest1k = [h5ad.parent.parent / "wsis" / f"{h5ad.stem}{ext}" for ext in WSI_SUFFIXES]
    for choice in (same_stem, beside if len(beside) == 1 else [], [p for p in hest1k if p.is_file()]):
        if choice:
            return choice[0]
    raise SectionFormatError(f"{h5ad.name}: no whole-slide image found beside it ({', '.join(WSI_SUFFIXES)}; "
                             f"{len(beside)} candidates) nor in ../wsis/{h5ad.stem}.tif; put the H&E next to "
                             "the .h5ad with the same name.")


def _hest_metadata(h5ad: Path) -> dict:
    for candidate in (h5ad.with_suffix(".json"), h5ad.parent / "metadata.json",
                      h5ad.parent.parent / "metadata" / f"{h5ad.stem}.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _hest_mpp(adata, h5ad: Path, image: Path) -> tuple[float, str]:
    """µm/px: ``uns`` first, then the metadata JSON, then the WSI's own metadata.

    HEST's estimated size (from the spot spacing) is preferred to the embedded one (scanner
    metadata), as HEST itself does.
    """
    for where, source in ((adata.uns, "uns"), (_hest_metadata(h5ad), "metadata.json")):
        for key in ("mpp", "pixel_size_um_estimated", "pixel_size_um_embedded"):
            value = where.get(key)
            value = pd.to_numeric(value, errors="coerce") if np.isscalar(value) else np.nan
            if value > 0:
                return float(value), f"{source}['{key}']"
    try:
        with Slide(image) as slide:
            return slide.mpp, f"slide metadata ({slide.mpp_source})"
    except MissingMppError:
        pass
    raise SectionFormatError(f"{h5ad.name}: the pixel size is unknown: set adata.uns['mpp'] (µm per full-res "
                             "px) or put a metadata.json with 'pixel_size_um_estimated' beside it.")


def _hest_spot_um(adata, h5ad: Path, mpp: float) -> float:
    for lib in (adata.uns.get("spatial") or {}).values():
        try:
            return float(lib["scalefactors"]["spot_diameter_fullres"]) * mpp
        except (KeyError, TypeError, ValueError):
            continue
    meta = _hest_metadata(h5ad)
    if "spot_diameter" in meta:
        return float(meta["spot_diameter"])
    log.warning("%s: spot diameter unknown; assuming Visium's %g µm", h5ad.name, VISIUM_SPOT_UM)
    return VISIUM_SPOT_UM


def _single_image(folder: Path, suffixes: tuple[str, ...], what: str) -> Path:
    images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in suffixes]
    if len(images) != 1:
        raise SectionFormatError(f"{folder}: expected one {what} beside the counts, found "
                                 f"{len(images)} ({', '.join(p.name for p in images) or 'none'}).")
    return images[0]


def _make_adata(x, obs: pd.DataFrame, genes: list[str]):
    """AnnData of raw counts as csr float32; duplicated gene symbols are summed into one column."""
    import anndata as ad
    import scipy.sparse as sp

    x = sp.csr_matrix(x, dtype=np.float32)
    names = pd.Index([str(g) for g in genes])
    if names.has_duplicates:
        codes, uniques = pd.factorize(names)
        merge = sp.csr_matrix((np.ones(len(codes), np.float32), (np.arange(len(codes)), codes)),
                              shape=(len(codes), len(uniques)))
        log.info("summed %d duplicated gene symbols", len(names) - len(uniques))
        x, names = (x @ merge).tocsr(), pd.Index(uniques)
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=names))


def _section(name, adata, xy, image, mpp, source, spot_um, layout) -> SpatialSection:
    adata.obsm["spatial"] = xy
    return SpatialSection(name=name, counts=adata, xy=xy, image_path=Path(image).resolve(), mpp=float(mpp),
                          mpp_source=source, spot_diameter_um=float(spot_um), layout=layout)
