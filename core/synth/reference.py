"""The synthetic single-cell reference: 8 breast-cancer cell types over a panel of real genes.

Expected profiles are fixed constants of the demo world (built from an internal seed), so the
reference, the ST sections and the tile truth all agree. Units: expected UMI counts per cell.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CELL_TYPES = ["malignant_epithelial", "cycling_malignant", "normal_epithelial", "fibroblast",
              "endothelial", "t_cell", "b_plasma", "macrophage"]
SUBTYPES = ["LumA", "LumB", "Her2", "Basal", "Normal"]
SUBTYPE_PREVALENCE = {"LumA": 0.40, "LumB": 0.20, "Her2": 0.12, "Basal": 0.18, "Normal": 0.10}

_GROUPS = {
    "housekeeping": ["ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1", "MALAT1", "FTL", "FTH1", "TMSB4X",
                     "PPIA", "UBC", "RPL13A", "RPS18", "HPRT1", "TBP", "PGK1", "TUBB"],
    "luminal": ["ESR1", "PGR", "FOXA1", "GATA3", "XBP1", "TFF1", "TFF3", "AGR2", "SCUBE2", "BCL2", "CA12",
                "AR", "MLPH", "NAT1", "SLC39A6", "MAPT"],
    "her2": ["ERBB2", "GRB7", "STARD3", "PGAP3", "MIEN1"],
    "basal": ["KRT5", "KRT14", "KRT17", "KRT6B", "FOXC1", "SFRP1", "MIA", "EGFR", "CDH3"],
    "prolif": ["MKI67", "TOP2A", "CCNB1", "CDK1", "BIRC5", "UBE2C", "PTTG1", "CENPF", "CCNE1", "MYBL2",
               "CDC20", "RRM2", "TYMS", "KIF2C", "MELK", "AURKA"],
    "epithelial": ["EPCAM", "KRT8", "KRT18", "KRT19", "KRT7", "CDH1", "CLDN4", "MUC1", "ELF3", "CD24",
                   "MYC", "CCND1"],
    "normal_epi": ["KRT15", "KRT23", "TP63", "KIT", "ELF5", "LTF", "PIP", "SLPI", "ANKRD30A", "OXTR", "MYH11"],
    "fibro": ["ACTA2", "COL1A1", "COL1A2", "COL3A1", "COL5A1", "COL6A3", "DCN", "LUM", "PDGFRB", "PDGFRA",
              "FAP", "POSTN", "SPARC", "FN1", "THY1", "MMP2", "MMP11", "CTHRC1", "VIM", "TAGLN", "MYL9",
              "MGP", "CXCL12", "IGFBP7", "TIMP1", "TIMP3", "SERPINE1"],
    "endo": ["PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "PLVAP", "ENG", "EMCN", "RAMP2", "AQP1", "FLT1",
             "SPARCL1", "FABP4"],
    "tcell": ["CD3E", "CD3D", "CD3G", "CD2", "CD8A", "CD8B", "CD4", "GZMB", "GZMK", "GZMA", "PRF1", "NKG7",
              "IL7R", "CCL5", "CD247", "LCK", "CD69", "FOXP3", "CTLA4", "PDCD1", "LAG3", "CXCL13", "TRAC"],
    "bplasma": ["MS4A1", "CD79A", "CD79B", "CD19", "JCHAIN", "MZB1", "IGKC", "IGHG1", "IGHM", "SDC1",
                "PRDM1", "TNFRSF17"],
    "macro": ["CD68", "CD163", "LYZ", "CSF1R", "C1QA", "C1QB", "C1QC", "AIF1", "FCGR3A", "MS4A7", "APOE",
              "TYROBP", "FCER1G", "ITGAM", "MRC1", "SPP1", "CD14", "CD274", "IDO1", "CXCL9", "CXCL10"],
    "immune": ["PTPRC", "HLA-DRA", "HLA-DRB1", "CST3", "S100A8", "S100A9"],
}
GENES: list[str] = [g for genes in _GROUPS.values() for g in genes]

# Which gene groups mark which type (fold range 10–100× drawn per gene), plus single-gene extras.
_MARKERS = {
    "malignant_epithelial": ["epithelial", "luminal", "her2"],
    "cycling_malignant": ["epithelial", "luminal", "her2", "prolif"],
    "normal_epithelial": ["epithelial", "normal_epi"],
    "fibroblast": ["fibro"],
    "endothelial": ["endo"],
    "t_cell": ["tcell"],
    "b_plasma": ["bplasma"],
    "macrophage": ["macro"],
}
_EXTRA = {
    "normal_epithelial": {"KRT5": 20, "KRT14": 20, "KRT17": 12, "ESR1": 8, "GATA3": 10, "ACTA2": 10},
    "t_cell": {"PTPRC": 30, "IL7R": 1},
    "b_plasma": {"PTPRC": 12, "XBP1": 25, "HLA-DRA": 10},
    "macrophage": {"PTPRC": 15, "HLA-DRA": 30, "HLA-DRB1": 25, "CST3": 20, "FTL": 3},
    "endothelial": {"SPARC": 8, "VIM": 6},
    "fibroblast": {"VIM": 1},
}
# Expected total counts of the panel per cell (bigger, busier cells carry more RNA).
_LIBRARY = {"malignant_epithelial": 420, "cycling_malignant": 560, "normal_epithelial": 300, "fibroblast": 260,
            "endothelial": 200, "t_cell": 160, "b_plasma": 380, "macrophage": 320}
# PAM50-like modulation of malignant cells: multipliers per gene group or gene.
_SUBTYPE_MULT = {
    "LumA": {"ESR1": 4, "PGR": 4, "FOXA1": 3, "GATA3": 3, "luminal": 1.6, "her2": 0.5, "KRT5": 0.15,
             "KRT14": 0.15, "KRT17": 0.15, "basal": 0.3, "prolif": 0.5},
    "LumB": {"ESR1": 3, "PGR": 1, "FOXA1": 2.5, "GATA3": 2.5, "luminal": 1.3, "her2": 1.2, "KRT5": 0.2,
             "KRT14": 0.2, "KRT17": 0.2, "basal": 0.3, "prolif": 1.6},
    "Her2": {"ERBB2": 6, "GRB7": 6, "STARD3": 4, "PGAP3": 4, "MIEN1": 4, "ESR1": 0.4, "PGR": 0.3,
             "basal": 0.6, "prolif": 1.6},
    "Basal": {"KRT5": 40, "KRT14": 40, "KRT17": 40, "basal": 15, "luminal": 0.1, "ESR1": 0.5, "her2": 0.5,
              "prolif": 2.5},
    "Normal": {"luminal": 1.3, "her2": 0.6, "KRT5": 8, "KRT14": 8, "KRT17": 6, "basal": 2, "prolif": 0.4},
}
_MALIGNANT = ("malignant_epithelial", "cycling_malignant")
_PROFILE_SEED = 20240531


@lru_cache(maxsize=1)
def _base_profiles() -> pd.DataFrame:
    """Subtype-neutral expected counts per cell (types × genes), a constant of the world."""
    rng = np.random.default_rng(_PROFILE_SEED)
    gi = {g: i for i, g in enumerate(GENES)}
    background = np.exp(rng.normal(np.log(0.4), 0.8, len(GENES)))
    background[[gi[g] for g in _GROUPS["housekeeping"]]] *= 25
    typical = float(np.median(background))
    rows = []
    for t in CELL_TYPES:
        prof = background * np.exp(rng.normal(0.0, 0.35, len(GENES)))
        for group in _MARKERS[t]:
            idx = [gi[g] for g in _GROUPS[group]]
            # markers sit 10–100× above the typical background, whatever their own background
            prof[idx] = typical * np.exp(rng.uniform(np.log(10), np.log(100), len(idx)))
        for g, fold in _EXTRA.get(t, {}).items():
            prof[gi[g]] *= fold
        rows.append(prof / prof.sum() * _LIBRARY[t])
    return pd.DataFrame(np.array(rows), index=CELL_TYPES, columns=GENES)


def _subtype_multiplier(subtype: str) -> np.ndarray:
    if subtype not in _SUBTYPE_MULT:
        raise ValueError(f"Unknown subtype {subtype!r}; expected one of {SUBTYPES}")
    mult = pd.Series(1.0, index=GENES)
    spec = _SUBTYPE_MULT[subtype]
    for key, value in spec.items():  # groups first, then single genes override
        if key in _GROUPS:
            mult[_GROUPS[key]] *= value
    for key, value in spec.items():
        if key not in _GROUPS:
            mult[key] = value
    return mult.to_numpy()


def expected_profiles(subtype: str | None = None) -> pd.DataFrame:
    """Expected counts per cell, cell types (rows, CELL_TYPES order) × GENES (columns).

    Malignant rows carry the PAM50-like ``subtype`` programme (e.g. Her2 → ERBB2/GRB7 high);
    ``None`` gives the prevalence-weighted cohort average.
    """
    base = _base_profiles()
    if subtype is None:
        mult = sum(w * _subtype_multiplier(s) for s, w in SUBTYPE_PREVALENCE.items())
    else:
        mult = _subtype_multiplier(subtype)
    out = base.copy()
    malignant = base.loc[list(_MALIGNANT)].to_numpy() * mult
    totals = base.loc[list(_MALIGNANT)].sum(axis=1).to_numpy()[:, None]
    out.loc[list(_MALIGNANT)] = malignant / malignant.sum(axis=1, keepdims=True) * totals
    return out


def sample_counts(rng: np.random.Generator, means: np.ndarray, *, dispersion: float = 4.0) -> np.ndarray:
    """Negative-binomial counts as a Poisson–gamma mixture around ``means`` (any shape)."""
    lam = rng.gamma(dispersion, np.maximum(means, 1e-9) / dispersion)
    return rng.poisson(lam)


def make_reference(seed: int, n_cells_per_type: int = 150):
    """Single cells with raw integer counts: ``obs['cell_type']``, ``obs['subtype']``, ``var_names`` = GENES.

    Each cell's mean is its type profile × a log-normal library size; malignant cells come from
    patients of every subtype (by prevalence); counts are negative binomial (dispersion 4).
    """
    import anndata as ad

    rng = np.random.default_rng(np.random.SeedSequence([seed, 7001]))
    by_subtype = {s: expected_profiles(s) for s in SUBTYPES}
    types = np.repeat(CELL_TYPES, n_cells_per_type)
    subtypes = np.where(np.isin(types, _MALIGNANT),
                        rng.choice(SUBTYPES, len(types), p=list(SUBTYPE_PREVALENCE.values())), "")
    means = np.stack([by_subtype[s or "LumA"].loc[t].to_numpy() for t, s in zip(types, subtypes)])
    library = np.exp(rng.normal(0.0, 0.3, len(types)))[:, None]
    counts = sample_counts(rng, means * library).astype(np.int32)
    obs = pd.DataFrame({"cell_type": pd.Categorical(types, categories=CELL_TYPES),
                        "subtype": pd.Categorical(subtypes)},
                       index=[f"cell{i:05d}" for i in range(len(types))])
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(GENES, name="gene")))
    adata.uns["source"] = f"Tessera synthetic reference (seed {seed})"
    log.info("reference: %d cells × %d genes", adata.n_obs, adata.n_vars)
    return adata
