"""Cells of cells runs (``predict --cells``) as exports: ``--level cells`` of
:func:`core.export.api.export`. Every format is written from one :class:`CellExport`, gathered by
:func:`collect_cells` through :func:`core.analysis.cell_layers.run_cells` (the same cells and
values as the Slide page's cell layer and the cell biomarkers).

Coordinates are level-0 pixels (cell centroids; outlines are the fitted ellipses of
:func:`core.wsi.cells.ellipse_polygon`, 16 vertices). Values are each cell's predicted
log1p(CP10k) of the chosen genes (default the whole panel).

- AnnData: ``X`` cells × genes (float32), ``obs`` slide, patient, tile_idx, cell_type
  (categorical, the model's types in order), confidence, x, y and the morphology
  (:data:`MORPHOLOGY`); ``obsm['spatial']`` centroids (x, y); ``uns['spatial'][slide]`` as the tile
  export (thumbnail, ``tissue_hires_scalef``; ``spot_diameter_fullres`` = the median nucleus's
  equivalent diameter in level-0 px); ``uns['cell_type_colors']``.
- QuPath GeoJSON: one ``detection`` Feature per cell, geometry the ellipse polygon (closed ring),
  ``classification`` the cell type with its colour, ``measurements`` one per gene + confidence.
- CSV / Parquet: one row per cell: slide, patient, tile_idx, x, y, cell_type, confidence, the
  morphology, one column per gene.
"""
from __future__ import annotations

import math
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import TesseraError

UNITS = "predicted log1p(CP10k) per cell"
MORPHOLOGY = ("major_um", "minor_um", "angle", "area_um2", "eccentricity", "solidity", "h_mean", "h_rel",
              "h_core_ratio", "e_ring", "density", "nucleus_class")


@dataclass
class CellSlide:
    slide_name: str
    patient: str
    slide_path: str
    run_key: str
    width: int
    height: int
    mpp: float
    frame: pd.DataFrame          # run_cells' frame: x, y, cell_type (categorical), confidence, morphology, gene:<g>


@dataclass
class CellExport:
    cohort: str
    model_key: str
    model_id: str
    version: str
    stride: float
    cell_types: list[str]
    genes: list[str]             # exported genes, in panel order
    slides: list[CellSlide]
    exported_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def n_cells(self) -> int:
        return int(sum(len(s.frame) for s in self.slides))

    def provenance(self) -> dict:
        return {"cohort": self.cohort, "model_key": self.model_key, "model_id": self.model_id, "version": self.version,
                "level": "cells", "stride": self.stride, "units": UNITS, "exported_at": self.exported_at}


def resolve_genes(items: list[str], panel: list[str]) -> list[str]:
    """Gene names (any case, optionally ``gene:``-prefixed) → panel genes in panel order; other
    layers (signatures, nuclei) and unknown genes are one error."""
    by_upper = {g.upper(): g for g in panel}
    chosen, unknown = set(), []
    for item in items:
        kind, sep, what = item.partition(":")
        name = what if sep and kind.strip().lower() == "gene" else (item if not sep else None)
        gene = by_upper.get((name or "").strip().upper())
        if gene is None:
            unknown.append(item)
        else:
            chosen.add(gene)
    if unknown:
        raise TesseraError(f"Not a gene of the model's panel: {', '.join(unknown)}. A cells export holds genes only "
                           f"(any of the {len(panel)}, e.g. {', '.join(panel[:8])}…; default: all).")
    return [g for g in panel if g in chosen]


def check_cells(store, chosen: pd.DataFrame, cohort: str) -> None:
    """Every chosen run has cells, else one error naming the slides without."""
    without = [str(r.slide_name) for r in chosen.itertuples(index=False) if not store.has_cells(r.run_key)]
    if without:
        raise TesseraError(f"No cells for {len(without)} chosen slide(s) ({', '.join(without[:3])}"
                           f"{'…' if len(without) > 3 else ''}): predict with cells first (python -m core.cli predict "
                           f"--cohort {cohort} --cells), or choose slides with cells (--slide).")


def collect_cells(store, cohort: str, model_key: str, chosen: pd.DataFrame, genes: list[str] | None, *,
                  stride: float = 1.0) -> CellExport:
    """The cells of the ``chosen`` runs (rows of ``Store.cohort_runs``) with ``genes`` (None = panel)."""
    from core.analysis.cell_layers import run_cells

    info = store.model_info(model_key)
    genes = list(info.genes) if genes is None else list(genes)
    out = []
    for row in chosen.itertuples(index=False):
        with warnings.catch_warnings():   # run_cells adds one column per gene
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            rc = run_cells(store, model_key, row.run_key, genes)
        out.append(CellSlide(str(row.slide_name), str(row.patient), str(row.slide_path), str(row.run_key),
                             int(row.width), int(row.height), float(row.mpp), rc.frame.copy()))
    model_id, _, version = model_key.partition("@")
    return CellExport(cohort, model_key, model_id, str(info.card.get("version", version)), float(stride),
                      list(info.cell_types), genes, out)


def type_colors(cell_types: list[str]) -> dict[str, list[int]]:
    """A fixed colour per cell type: type k (the model's order) gets colour k of
    :func:`core.analysis.overlay.categorical_colors`, whichever types a slide contains."""
    from core.analysis.overlay import categorical_colors

    colors = categorical_colors(len(cell_types))
    return {t: [int(c) for c in colors[i]] for i, t in enumerate(cell_types)}


# ---------------------------------------------------------------- tables

def cell_table(data: CellExport) -> pd.DataFrame:
    parts = []
    for s in data.slides:
        f = s.frame
        df = pd.DataFrame({"slide": s.slide_name, "patient": s.patient, "tile_idx": f["tile_idx"].to_numpy(np.int64),
                           "x": f["x"].to_numpy(np.float32), "y": f["y"].to_numpy(np.float32),
                           "cell_type": f["cell_type"].astype(str).to_numpy(),
                           "confidence": f["confidence"].to_numpy(np.float32),
                           **{m: f[m].to_numpy() for m in MORPHOLOGY},
                           **{g: f[f"gene:{g}"].to_numpy(np.float32) for g in data.genes}})
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=["slide", "patient", "tile_idx", "x", "y", "cell_type", "confidence",
                                     *MORPHOLOGY, *data.genes])
    return pd.concat(parts, ignore_index=True)


def write_cells_table(data: CellExport, path: Path, fmt: str) -> None:
    from core.export.tables import write_frame

    write_frame(cell_table(data), path, fmt, data.provenance())


# ---------------------------------------------------------------- AnnData

def to_anndata(data: CellExport, *, hires_px: int):
    import anndata as ad

    from core.export.anndata_io import thumbnail

    obs_parts, xs, coords, spatial = [], [], [], {}
    for s in data.slides:
        f = s.frame
        obs = pd.DataFrame({"slide": s.slide_name, "patient": s.patient, "tile_idx": f["tile_idx"].to_numpy(np.int64),
                            "cell_type": f["cell_type"].astype(str).to_numpy(),
                            "confidence": f["confidence"].to_numpy(np.float32),
                            "x": f["x"].to_numpy(np.float32), "y": f["y"].to_numpy(np.float32),
                            **{m: f[m].to_numpy() for m in MORPHOLOGY}},
                           index=[f"{s.slide_name}:cell{i}" for i in range(len(f))])
        obs_parts.append(obs)
        xs.append(f[[f"gene:{g}" for g in data.genes]].to_numpy(np.float32) if data.genes
                  else np.zeros((len(f), 0), np.float32))
        coords.append(f[["x", "y"]].to_numpy(np.float64))
        image = thumbnail(s.slide_path, hires_px)
        area = f["area_um2"].to_numpy(np.float64)
        diameter = 2.0 * math.sqrt(float(np.median(area)) / math.pi) / s.mpp if len(area) else 1.0
        spatial[s.slide_name] = {
            "images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": float(image.shape[1]) / float(s.width),
                             "spot_diameter_fullres": float(diameter)},
            "metadata": {"model_key": data.model_key, "mpp": float(s.mpp), "stride": data.stride,
                         "patient": s.patient, "run_key": s.run_key, "width": int(s.width), "height": int(s.height)}}
    obs = pd.concat(obs_parts) if obs_parts else pd.DataFrame(columns=["slide", "patient", "cell_type"])
    for col in ("slide", "patient"):
        obs[col] = pd.Categorical(obs[col].astype(str))
    obs["cell_type"] = pd.Categorical(obs["cell_type"].astype(str), categories=data.cell_types)
    x = np.concatenate(xs) if xs else np.zeros((0, len(data.genes)), np.float32)
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(data.genes, name="gene")))
    adata.obsm["spatial"] = np.concatenate(coords) if coords else np.zeros((0, 2))
    adata.uns["spatial"] = spatial
    colors = type_colors(data.cell_types)
    adata.uns["cell_type_colors"] = ["#%02x%02x%02x" % tuple(colors[t]) for t in data.cell_types]
    adata.uns["tessera"] = {**data.provenance(), "obsm_spatial": "cell centroids (x, y), level-0 px"}
    return adata


def write_h5ad(data: CellExport, path: Path, *, hires_px: int) -> None:
    to_anndata(data, hires_px=hires_px).write_h5ad(path, compression="gzip")


# ---------------------------------------------------------------- QuPath GeoJSON

def _num(v) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def features(data: CellExport, slide: CellSlide) -> dict:
    """The FeatureCollection of one slide's cells: ``detection`` objects (QuPath ≥ 0.4)."""
    from core.wsi.cells import ellipse_polygon

    f = slide.frame
    colors = type_colors(data.cell_types)
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"tessera:{data.model_key}:{slide.run_key}:cells")
    mpp = slide.mpp
    poly = ellipse_polygon(f["x"].to_numpy(), f["y"].to_numpy(), f["major_um"].to_numpy(np.float64) / mpp,
                           f["minor_um"].to_numpy(np.float64) / mpp, f["angle"].to_numpy())
    poly = np.round(poly, 2)
    types = f["cell_type"].astype(str).to_numpy()
    conf = f["confidence"].to_numpy(np.float64)
    values = f[[f"gene:{g}" for g in data.genes]].to_numpy(np.float64) if data.genes else np.zeros((len(f), 0))
    feats = []
    for i in range(len(f)):
        ring = poly[i].tolist()
        ring.append(ring[0])
        measurements = {g: _num(values[i, j]) for j, g in enumerate(data.genes)}
        measurements["confidence"] = _num(conf[i])
        feats.append({"type": "Feature", "id": str(uuid.uuid5(namespace, str(i))),
                      "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "detection",
                                     "classification": {"name": types[i], "color": colors[types[i]]},
                                     "measurements": measurements}})
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(data: CellExport, slide: CellSlide, path: Path) -> None:
    import json

    Path(path).write_text(json.dumps(features(data, slide), allow_nan=False, separators=(",", ":")))
