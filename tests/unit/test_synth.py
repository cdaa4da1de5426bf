"""The synthetic demo world: determinism, formats, planted truths and H&E plausibility.

One tiny world is built per module (≈ 4 s); a second build with one worker checks determinism.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from core.synth.reference import CELL_TYPES, GENES, expected_profiles, make_reference
from core.synth.st import SPOT_DIAMETER_UM

TINY = dict(n_patients=12, slide_size_px=(1024, 768), n_sections=2, section_size_px=(1600, 1600))
SLIDE_NAME = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-01Z-00-DX1\.[0-9a-f-]{36}\.tiff$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from core.synth.world import build_world

    root = tmp_path_factory.mktemp("world")
    manifest = build_world(root, seed=3, workers=2, **TINY)
    return root, manifest


def _level0(path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path, key=0)


def test_same_seed_same_world_whatever_the_workers(world, tmp_path):
    from core.synth.world import build_world

    root, manifest = world
    again = build_world(tmp_path, seed=3, workers=1, **TINY)
    assert [s["file"] for s in again["slides"]] == [s["file"] for s in manifest["slides"]]
    assert (tmp_path / "clinical" / "clinical.csv").read_bytes() == (root / "clinical" / "clinical.csv").read_bytes()
    for s in manifest["slides"][:3]:
        assert np.array_equal(_level0(root / s["file"]), _level0(tmp_path / s["file"]))
    assert np.array_equal(_level0(root / "st" / "SYN-A1" / "he.tiff"), _level0(tmp_path / "st" / "SYN-A1" / "he.tiff"))


def test_manifest_and_layout(world):
    root, manifest = world
    assert json.loads((root / "world.json").read_text()) == manifest
    assert manifest["genes"] == GENES and manifest["cell_types"] == CELL_TYPES and manifest["mpp"] == 0.5
    for rel in manifest["paths"].values():
        assert (root / rel).exists(), rel
    assert [s["id"] for s in manifest["sections"]] == ["SYN-A1", "SYN-B1"]
    sizes = {(s["width"], s["height"]) for s in manifest["slides"]}
    assert len(sizes) > 1, "slide sizes should jitter between patients"
    for s in manifest["slides"]:
        assert 0.84 * 1024 <= s["width"] <= 1.16 * 1024 and 0.84 * 768 <= s["height"] <= 1.16 * 768


def test_slide_names_follow_tcga(world):
    from core.synth.clinical import TSS_CODES

    root, manifest = world
    names = sorted(p.name for p in (root / "slides").iterdir())
    assert len(names) == TINY["n_patients"]
    assert all(SLIDE_NAME.match(n) for n in names), names
    barcodes = [n[:12] for n in names]
    assert len(set(barcodes)) == len(barcodes)
    assert {b.split("-")[1] for b in barcodes} <= set(TSS_CODES)


def test_openslide_reads_slides_with_mpp_and_levels(world):
    import openslide

    root, manifest = world
    for rel in [s["file"] for s in manifest["slides"][:4]] + [manifest["sections"][0]["he"]]:
        with openslide.OpenSlide(str(root / rel)) as slide:
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
            assert slide.level_count >= 3
            assert slide.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
            region = np.asarray(slide.read_region((0, 0), 1, (64, 64)))
            assert region.shape == (64, 64, 4)


def test_write_pyramidal_tiff_odd_sizes(tmp_path):
    import openslide

    from core.synth.tiff import write_pyramidal_tiff

    rgb = np.random.default_rng(0).integers(0, 255, (301, 517, 3), dtype=np.uint8)
    write_pyramidal_tiff(tmp_path / "odd.tiff", rgb, mpp=0.25)
    with openslide.OpenSlide(str(tmp_path / "odd.tiff")) as slide:
        assert slide.dimensions == (517, 301)
        assert slide.level_count >= 3
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)


def test_clinical_table_is_tcga_cdr(world):
    from core.synth.clinical import CDR_COLUMNS

    root, _ = world
    cdr = pd.read_csv(root / "clinical" / "clinical.csv")
    assert list(cdr.columns) == CDR_COLUMNS + ["PAM50"]
    assert (cdr["type"] == "BRCA").all()
    assert set(cdr["OS"]) <= {0, 1} and set(cdr["PFI"]) <= {0, 1}
    assert ((cdr["DSS"] == 1) <= (cdr["OS"] == 1)).all(), "DSS events must be OS events"
    assert (cdr["PFI.time"] <= cdr["OS.time"]).all()
    assert cdr["ajcc_pathologic_tumor_stage"].str.match(r"^Stage (IV|I{1,3})[ABC]?$").all()
    assert cdr["gender"].isin(["FEMALE", "MALE"]).all()
    assert cdr["histological_type"].isin(["Infiltrating Ductal Carcinoma", "Infiltrating Lobular Carcinoma"]).all()


def test_planted_terms_are_computed_from_the_rendered_cells(world):
    """The linear predictor in truth/patients.csv is recomputed independently from truth/cells.parquet."""
    root, _ = world
    cells = pd.read_parquet(root / "truth" / "cells.parquet")
    patients = pd.read_csv(root / "truth" / "patients.csv")
    frac = pd.crosstab(cells["patient"].astype(str), cells["cell_type"].astype(str), normalize="index")
    frac = frac.reindex(patients["bcr_patient_barcode"])
    z = lambda v: (v - v.mean()) / v.std(ddof=0)  # noqa: E731
    np.testing.assert_allclose(patients["lp_t_cell"], -patients["beta_t_cell"] * z(frac["t_cell"].to_numpy()))
    np.testing.assert_allclose(patients["lp_cycling"],
                               patients["beta_cycling"] * z(frac["cycling_malignant"].to_numpy()))
    assert patients["beta_t_cell"].between(0.8, 1.0).all() and patients["beta_cycling"].between(0.8, 1.0).all()
    assert patients["frac_t_cell"].max() > 2 * patients["frac_t_cell"].min()


def _harrell_c(time, event, risk) -> float:
    """Harrell's concordance (pairs comparable when the earlier time is an event)."""
    t, e, r = map(np.asarray, (time, event, risk))
    earlier = (t[:, None] < t[None, :]) & (e[:, None] == 1)
    conc = (r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])
    return float((conc * earlier).sum() / earlier.sum())


def test_planted_effect_shows_in_outcomes():
    """Without any Cox fit: more T cells → longer survival among deaths; risk ranks outcomes."""
    from core.synth.clinical import clinical_table, demographics

    rng = np.random.default_rng(0)
    n = 1500
    t_cell, cycling = rng.uniform(0.01, 0.25, n), rng.uniform(0.01, 0.3, n)
    barcodes = [f"TCGA-A2-{i:04d}" for i in range(n)]
    cdr, terms = clinical_table(rng, barcodes, demographics(rng, n), ["LumA"] * n, t_cell, cycling)
    assert 0.30 <= cdr["OS"].mean() <= 0.45
    dead = cdr["OS"] == 1
    assert np.corrcoef(t_cell[dead], cdr.loc[dead, "OS.time"])[0, 1] > 0.1
    assert np.corrcoef(cycling[dead], cdr.loc[dead, "OS.time"])[0, 1] < -0.1
    assert _harrell_c(cdr["OS.time"], cdr["OS"], terms["lp"]) > 0.68


def test_immune_and_cycling_are_drawn_independently():
    from core.synth.tissue import sample_params

    rng = np.random.default_rng(1)
    params = [sample_params(rng) for _ in range(400)]
    immune = np.log([p.immune for p in params])
    cycling = np.array([p.cycling_frac for p in params])
    assert abs(np.corrcoef(immune, cycling)[0, 1]) < 0.15
    assert cycling.min() < 0.05 and cycling.max() > 0.35


def test_st_counts_follow_composition(world):
    import anndata as ad

    root, manifest = world
    cd3e, tfrac, epcam, tumour = [], [], [], []
    for sec in manifest["sections"]:
        adata = ad.read_h5ad(root / sec["adata"])
        assert list(adata.var_names) == GENES
        assert np.issubdtype(adata.X.dtype, np.integer) and adata.X.min() >= 0
        assert adata.uns["mpp"] == 0.5 and (adata.obs["in_tissue"] == 1).all()
        sf = adata.uns["spatial"][sec["id"]]["scalefactors"]
        assert sf["spot_diameter_fullres"] == pytest.approx(SPOT_DIAMETER_UM / 0.5)
        assert adata.uns["spatial"][sec["id"]]["images"]["lowres"].dtype == np.uint8
        xy = adata.obsm["spatial"]
        assert (xy >= 0).all() and (xy[:, 0] < sec["width"]).all() and (xy[:, 1] < sec["height"]).all()
        comp = adata.obsm["composition"]
        assert list(comp.columns) == CELL_TYPES
        has = adata.obs["n_cells"].to_numpy() > 0
        np.testing.assert_allclose(comp.to_numpy()[has].sum(axis=1), 1.0)
        cd3e.append(adata[:, "CD3E"].X.ravel())
        tfrac.append(comp["t_cell"].to_numpy())
        epcam.append(adata[:, "EPCAM"].X.ravel())
        tumour.append(comp[["malignant_epithelial", "cycling_malignant"]].sum(axis=1).to_numpy())
    assert np.corrcoef(np.concatenate(cd3e), np.concatenate(tfrac))[0, 1] > 0.5
    assert np.corrcoef(np.concatenate(epcam), np.concatenate(tumour))[0, 1] > 0.6


def test_reference_and_subtype_profiles():
    ref = make_reference(0, n_cells_per_type=20)
    assert ref.shape == (160, len(GENES)) and list(ref.var_names) == GENES
    assert np.issubdtype(ref.X.dtype, np.integer)
    assert list(ref.obs["cell_type"].cat.categories) == CELL_TYPES
    assert len(set(GENES)) == len(GENES) >= 100
    her2, luma, basal = (expected_profiles(s) for s in ("Her2", "LumA", "Basal"))
    assert her2.loc["malignant_epithelial", "ERBB2"] > 4 * luma.loc["malignant_epithelial", "ERBB2"]
    assert basal.loc["malignant_epithelial", "KRT5"] > 10 * luma.loc["malignant_epithelial", "KRT5"]
    assert luma.loc["malignant_epithelial", "ESR1"] > 4 * basal.loc["malignant_epithelial", "ESR1"]
    assert her2.loc["t_cell", "ERBB2"] == luma.loc["t_cell", "ERBB2"]  # subtype touches tumour cells only
    prof = expected_profiles()
    for cell_type, marker in [("t_cell", "CD3E"), ("fibroblast", "COL1A1"), ("b_plasma", "JCHAIN"),
                              ("macrophage", "CD68"), ("endothelial", "PECAM1"), ("cycling_malignant", "MKI67")]:
        others = prof[marker].drop(cell_type)
        assert prof.loc[cell_type, marker] > 5 * others.median(), (cell_type, marker)


@pytest.fixture(scope="module")
def small_render():
    from core.synth.render import render_he
    from core.synth.tissue import TissueParams, layout_tissue

    rng = np.random.default_rng(5)
    params = TissueParams(subtype="LumB", tumour_frac=0.4, immune=0.8, adipose_frac=0.1)
    tissue = layout_tissue(params, 700.0, 500.0, rng)
    return tissue, render_he(tissue, mpp=0.5, rng=rng)


def test_he_colours_look_like_he(small_render):
    """Nuclei are dark blue-purple, stroma pink, glass near-white: the stain model, not noise."""
    from scipy import ndimage

    from core.synth.tissue import GLASS, STROMA

    tissue, rgb = small_render
    assert rgb.shape == (1000, 1400, 3) and rgb.dtype == np.uint8
    px = lambda x_um, y_um: rgb[(y_um / 0.5).astype(int), (x_um / 0.5).astype(int)].astype(float)  # noqa: E731
    lymph = tissue.cells[tissue.cells["cell_type"] == "t_cell"]
    nuc = px(lymph["x_um"].to_numpy(), lymph["y_um"].to_numpy())
    full = lambda mask: np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[: rgb.shape[0], : rgb.shape[1]]  # noqa: E731
    stroma = rgb[full(tissue.comp == STROMA)].astype(float)
    glass = rgb[full(ndimage.binary_erosion(tissue.comp == GLASS, iterations=8))].astype(float)  # away from edges
    assert glass.mean() > 225 and glass.std(axis=0).max() < 12
    assert nuc.mean() < stroma.mean() - 50, "nuclei are darker than stroma"
    assert (nuc[:, 2] - nuc[:, 0]).mean() > 25, "hematoxylin is blue: B > R in nuclei"
    assert (stroma[:, 0] - stroma[:, 1]).mean() > 30, "eosin is pink: R > G in stroma"
    # spatial structure: neighbouring pixels agree far more than in white noise
    grey = rgb.mean(axis=2)
    assert np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1] > 0.8


def test_tissue_cover_and_cell_density(small_render):
    from core.synth.tissue import GLASS

    tissue, _ = small_render
    cover = (tissue.comp != GLASS).mean()
    assert 0.55 <= cover <= 0.9
    counts = tissue.cells["cell_type"].value_counts()
    assert set(counts.index) <= set(CELL_TYPES) and counts["t_cell"] > 0
    t = tissue.cells[tissue.cells["cell_type"] == "t_cell"]
    m = tissue.cells[tissue.cells["cell_type"] == "malignant_epithelial"]
    assert 5.5 <= t["major_um"].median() <= 7.5 and 9 <= m["major_um"].median() <= 16


def test_tile_truth_fractions_and_expression():
    from core.synth.truth import tile_truth

    cells = pd.DataFrame({"x_um": [10.0, 20.0, 30.0, 300.0], "y_um": [10.0, 10.0, 40.0, 300.0],
                          "cell_type": ["t_cell", "t_cell", "fibroblast", "macrophage"]})
    tiles = np.array([[0, 0], [0, 0], [1000, 1000], [700, 700]])  # level-0 px at 0.5 µm/px; cell 4 at 600 px
    prof = expected_profiles()
    comp, expr = tile_truth(cells, tiles, 112, 0.5, prof)
    assert list(comp.columns) == CELL_TYPES and list(expr.columns) == GENES
    assert comp.loc[0, "t_cell"] == pytest.approx(2 / 3) and comp.loc[0, "fibroblast"] == pytest.approx(1 / 3)
    np.testing.assert_allclose(comp.sum(axis=1), [1, 1, 0, 0])
    want = 2 * prof.loc["t_cell"] + prof.loc["fibroblast"]
    np.testing.assert_allclose(expr.loc[0], np.log1p(want / want.sum() * 1e4))
    assert (expr.loc[2] == 0).all()


def test_tile_truth_on_world_cells(world):
    from core.synth.truth import tile_truth

    root, manifest = world
    cells = pd.read_parquet(root / "truth" / "cells.parquet")
    s = manifest["slides"][0]
    mine = cells[cells["slide_file"] == s["file"].split("/")[1]]
    xs, ys = np.meshgrid(np.arange(0, s["width"] - 224, 224), np.arange(0, s["height"] - 224, 224))
    tiles = np.column_stack([xs.ravel(), ys.ravel()])
    comp, expr = tile_truth(mine, tiles, 224, 0.5, expected_profiles(s["subtype"]))
    occupied = comp.sum(axis=1) > 0
    assert occupied.mean() > 0.4
    np.testing.assert_allclose(comp[occupied].sum(axis=1), 1.0)
    assert np.isfinite(expr.to_numpy()).all()
