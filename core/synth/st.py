"""Synthetic spatial transcriptomics: Visium-like spots over a rendered synthetic section.

Spots have a 100 µm diameter on a hexagonal lattice with 112 µm centre-to-centre spacing (between
Visium's 55/100 µm and legacy ST's 100/200 µm: a spot then covers most of the 112 µm patch the
model sees, so the synthetic task is about morphology, not about guessing outside the spot); a spot
measures the cells whose centre lies inside it. Spot centres are (x, y) level-0 px of the
section's H&E image.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from core.synth.reference import CELL_TYPES, GENES, expected_profiles
from core.synth.tissue import GLASS, Tissue

log = logging.getLogger(__name__)

SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 112.0


def spot_grid(tissue: Tissue, *, margin_um: float = 60.0) -> pd.DataFrame:
    """Hexagonal spot lattice over the tissue: ``x_um, y_um, array_row, array_col``.

    Visium convention: rows are pitch·√3/2 apart, ``array_col`` steps by 2 along a row
    (pitch/2 per step) and odd rows are offset by one column. Only spots whose centre is on
    tissue are kept.
    """
    dy = SPOT_PITCH_UM * np.sqrt(3) / 2
    n_rows = int((tissue.height_um - 2 * margin_um) / dy) + 1
    n_cols = int((tissue.width_um - 2 * margin_um) / (SPOT_PITCH_UM / 2)) + 1
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    x = margin_um + cols * SPOT_PITCH_UM / 2
    y = margin_um + rows * dy
    inside = (x < tissue.width_um) & (y < tissue.height_um)
    x, y, rows, cols = x[inside], y[inside], rows[inside], cols[inside]
    g = 1.0 / tissue.grid_um
    on_tissue = tissue.comp[(y * g).astype(int), (x * g).astype(int)] != GLASS
    return pd.DataFrame({"x_um": x[on_tissue], "y_um": y[on_tissue],
                         "array_row": rows[on_tissue], "array_col": cols[on_tissue]})


def spot_counts(tissue: Tissue, spots: pd.DataFrame, rng: np.random.Generator, *,
                efficiency: float = 0.45) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Raw counts per spot (spots × GENES, int32), true composition and cells per spot.

    Each cell captured by a spot contributes gamma-distributed expression around its type
    profile (the section's subtype) × a log-normal library size; the spot total is scaled by a
    per-spot capture efficiency and Poisson-sampled (overall negative binomial). A little
    ambient RNA gives empty spots a few counts.
    """
    profiles = expected_profiles(tissue.params.subtype).to_numpy()
    cells = tissue.cells
    codes = cells["cell_type"].cat.codes.to_numpy()
    tree = cKDTree(cells[["x_um", "y_um"]].to_numpy(np.float64))
    members = tree.query_ball_point(spots[["x_um", "y_um"]].to_numpy(), r=SPOT_DIAMETER_UM / 2)
    spot_of = np.repeat(np.arange(len(spots)), [len(m) for m in members])
    cell_idx = np.concatenate([np.asarray(m, dtype=int) for m in members]) if len(members) else np.zeros(0, int)
    library = np.exp(rng.normal(0.0, 0.3, len(cell_idx)))[:, None]
    per_cell = rng.gamma(4.0, profiles[codes[cell_idx]] * library / 4.0)
    lam = np.zeros((len(spots), len(GENES)))
    np.add.at(lam, spot_of, per_cell)
    ambient = profiles.mean(axis=0) * 0.3
    eff = efficiency * np.exp(rng.normal(0.0, 0.25, len(spots)))[:, None]
    counts = rng.poisson(eff * (lam + ambient)).astype(np.int32)
    n_types = np.zeros((len(spots), len(CELL_TYPES)))
    np.add.at(n_types, (spot_of, codes[cell_idx]), 1)
    n_cells = n_types.sum(axis=1)
    frac = np.divide(n_types, n_cells[:, None], out=np.zeros_like(n_types), where=n_cells[:, None] > 0)
    return counts, pd.DataFrame(frac, columns=CELL_TYPES), n_cells.astype(int)


def make_section_adata(section_id: str, tissue: Tissue, rgb: np.ndarray, rng: np.random.Generator, *,
                       mpp: float = 0.5, lowres_side: int = 600):
    """AnnData of one section: raw counts, ``obsm['spatial']`` (x, y level-0 px), true composition,
    and ``uns['spatial'][section_id]`` with a low-resolution image and scale factors."""
    import anndata as ad
    from PIL import Image

    spots = spot_grid(tissue)
    counts, comp, n_cells = spot_counts(tissue, spots, rng)
    names = [f"{section_id}-{r}x{c}" for r, c in zip(spots["array_row"], spots["array_col"])]
    obs = pd.DataFrame({"array_row": spots["array_row"].to_numpy(), "array_col": spots["array_col"].to_numpy(),
                        "in_tissue": np.ones(len(spots), np.int32), "n_cells": n_cells}, index=names)
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(GENES, name="gene")))
    adata.obsm["spatial"] = spots[["x_um", "y_um"]].to_numpy(np.float64) / mpp
    comp.index = adata.obs_names
    adata.obsm["composition"] = comp
    scale = lowres_side / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    lowres = np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))
    scale = lowres.shape[1] / rgb.shape[1]
    adata.uns["spatial"] = {section_id: {
        "images": {"lowres": lowres},
        "scalefactors": {"spot_diameter_fullres": SPOT_DIAMETER_UM / mpp, "tissue_lowres_scalef": float(scale)},
        "metadata": {"source": "Tessera synthetic world"},
    }}
    adata.uns["mpp"] = mpp
    adata.uns["subtype"] = tissue.params.subtype
    log.debug("section %s: %d spots, %.0f counts/spot", section_id, adata.n_obs, counts.sum(1).mean())
    return adata
