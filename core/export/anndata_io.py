"""Predictions as AnnData (``.h5ad``), laid out like a Visium section so that
``scanpy.pl.spatial(adata[adata.obs.slide == s], library_id=s, color=gene)`` draws the tiles on
the tissue.

- ``X``: predicted log1p(CP10k), tiles × panel genes, float32; ``var_names`` = the panel.
- ``obs``: slide, patient, tile_idx, tissue, domain (categorical), x, y (level-0 top-left px) and
  one column per signature / nuclei layer asked for.
- ``obsm['spatial']``: tile centres (x, y) in level-0 px.
- ``uns['spatial'][slide]``: ``images['hires']`` (an RGB uint8 thumbnail read with OpenSlide),
  ``scalefactors`` (``tissue_hires_scalef`` = thumbnail px / level-0 px, ``spot_diameter_fullres``
  = tile side in level-0 px) and ``metadata`` (model key, µm/px, tile µm).
- ``uns['tessera']``: model key, id, version, export time, units, cohort.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.export.collect import ExportData, domain_colors

HIRES_PX = 2000        # long side of the embedded thumbnail of one slide (Space Ranger's hires image)
HIRES_PX_MANY = 1000   # … of each slide of a several-slide export (a cohort's file stays a manageable size)


def thumbnail(slide_path: str, max_px: int) -> np.ndarray:
    """RGB uint8 thumbnail (long side ≤ ``max_px``), level-0 aspect kept."""
    from core.wsi.slide import Slide

    with Slide(slide_path) as slide:
        return np.asarray(slide.thumbnail(max_px), dtype=np.uint8)


def to_anndata(data: ExportData, *, hires_px: int = HIRES_PX):
    """The :class:`anndata.AnnData` of ``data`` (loaded with ``expression=True``)."""
    import anndata as ad

    obs_parts, xs, spatial, coords = [], [], {}, []
    extra = [la for la in data.layers if la.kind != "gene"]
    for s in data.slides:
        n = len(s.tiles)
        obs = pd.DataFrame({
            "slide": s.slide_name, "patient": s.patient, "tile_idx": s.tiles["tile_idx"].to_numpy(np.int64),
            "tissue": s.tiles["tissue"].to_numpy(np.float32), "domain": s.domain.astype(str),
            "x": s.tiles["x"].to_numpy(np.int64), "y": s.tiles["y"].to_numpy(np.int64)},
            index=[f"{s.slide_name}:{i}" for i in s.tiles["tile_idx"]])
        for layer in extra:
            obs[layer.column] = s.values[layer.column]
        obs_parts.append(obs)
        xs.append(s.expression if s.expression is not None else np.zeros((n, 0), np.float32))
        coords.append(s.centres)
        image = thumbnail(s.slide_path, hires_px)
        spatial[s.slide_name] = {
            "images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": float(image.shape[1]) / float(s.width),
                             "spot_diameter_fullres": float(s.tile_size)},
            "metadata": {"model_key": data.model_key, "mpp": float(s.mpp), "tile_um": data.tile_um,
                         "tile_px": int(s.tile_size), "patient": s.patient, "run_key": s.run_key,
                         "width": int(s.width), "height": int(s.height)}}
    obs = pd.concat(obs_parts) if obs_parts else pd.DataFrame(columns=["slide", "patient", "tile_idx", "tissue",
                                                                       "domain", "x", "y"])
    for col in ("slide", "patient", "domain"):
        obs[col] = pd.Categorical(obs[col].astype(str))
    x = np.concatenate(xs).astype(np.float32) if xs else np.zeros((0, len(data.genes)), np.float32)
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(data.genes, name="gene")))
    adata.obsm["spatial"] = np.concatenate(coords).astype(np.float64) if coords else np.zeros((0, 2))
    adata.uns["spatial"] = spatial
    colors = domain_colors(list(obs["domain"].cat.categories))
    adata.uns["domain_colors"] = ["#%02x%02x%02x" % tuple(colors[c]) for c in obs["domain"].cat.categories]
    adata.uns["tessera"] = {**data.provenance(), "layers": [la.column for la in data.layers],
                            "obsm_spatial": "tile centres (x, y), level-0 px"}
    return adata


def write_h5ad(data: ExportData, path: Path, *, hires_px: int = HIRES_PX) -> None:
    to_anndata(data, hires_px=hires_px).write_h5ad(path, compression="gzip")
