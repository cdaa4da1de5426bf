"""Spatial-transcriptomics sections: HER2ST (real), Visium (real), HEST-style (synthetic), bad inputs.

Real data is read from ``../shared/data`` through the ``shared_data`` fixture (skipped when absent).
"""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from core.errors import MissingMppError, TesseraError
from core.wsi.slide import Slide
from core.training.stdata import (SectionFormatError, find_sections, panel_genes, read_section, section_patches,
                         targets)
from tests.conftest import make_slide

# spots selected in <S>_selection.tsv AND present in <S>.tsv.gz (counted with pandas by hand)
HER2ST_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181}


@pytest.fixture(scope="module")
def her2st(shared_data):
    return find_sections(shared_data / "her2st")


@pytest.fixture(scope="module")
def synth_world(tmp_path_factory):
    from core.synth.world import build_world

    root = tmp_path_factory.mktemp("stworld")
    build_world(root, workers=1, n_patients=2, slide_size_px=(512, 512), n_sections=1, section_size_px=(1500, 1500))
    return root


# ---------------------------------------------------------------------------------------- Slide


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_slide_opens_plain_images_with_override_only(tmp_path, suffix):
    from PIL import Image

    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[:, :200] = (200, 100, 180)
    rgb[:, 200:] = (240, 240, 240)
    path = tmp_path / f"he{suffix}"
    Image.fromarray(rgb).save(path)
    with Slide(path) as s:
        assert s.dimensions == (400, 300) and s.level_count == 1
        with pytest.raises(MissingMppError, match="override"):
            _ = s.mpp
    with Slide(path, mpp_override=0.7) as s:
        assert s.mpp == 0.7 and s.mpp_source == "override"
        tile = s.read_region((50, 50), 100, 50)
        assert tile.shape == (50, 50, 3) and tile.dtype == np.uint8
        assert np.abs(tile.astype(int) - (200, 100, 180)).max() <= 6  # JPEG tolerance


# ---------------------------------------------------------------------------------------- HER2ST


def test_her2st_sections_counts_and_mpp(her2st):
    assert [s.name for s in her2st] == sorted(HER2ST_SPOTS)
    for s in her2st:
        assert s.layout == "her2st" and len(s) == HER2ST_SPOTS[s.name] == len(s.xy)
        assert s.counts.n_vars > 15000 and s.counts.var_names.is_unique
        assert 0.6 < s.mpp < 0.8, s.mpp  # README: one 200 µm step ≈ 290 px → ≈ 0.69 µm/px
        assert s.mpp_source == "spot grid (200 µm pitch)" and s.spot_diameter_um == 100
        assert s.image_path.suffix == ".jpg"
        np.testing.assert_array_equal(s.counts.obsm["spatial"], s.xy)
        with Slide(s.image_path, mpp_override=s.mpp) as slide:
            w, h = slide.dimensions
        assert (s.xy > 0).all() and (s.xy[:, 0] < w).all() and (s.xy[:, 1] < h).all()


def test_her2st_counts_match_raw_table(her2st, shared_data):
    """Spot '10x21' of C2 keeps its raw counts row (the 'XxY' index, x first)."""
    c2 = next(s for s in her2st if s.name == "C2")
    raw = pd.read_csv(shared_data / "her2st/C2/C2.tsv.gz", sep="\t", index_col=0, nrows=3)
    row = c2.counts[raw.index[0]].X.toarray().ravel()
    np.testing.assert_array_equal(row, raw.iloc[0].to_numpy(np.float32))
    sel = pd.read_csv(shared_data / "her2st/C2/C2_selection.tsv", sep="\t")
    x, y = (int(v) for v in raw.index[0].split("x"))
    hit = sel[(sel.x == x) & (sel.y == y)].iloc[0]
    np.testing.assert_allclose(c2.xy[c2.counts.obs_names.get_loc(raw.index[0])], [hit.pixel_x, hit.pixel_y])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 92 Mpx HER2ST JPEGs
def test_her2st_patches_are_tissue(her2st):
    """Patches at 112 µm / 0.5 µm/px are non-blank and mostly differ from the glass colour."""
    for s in her2st:
        patches, keep = section_patches(s, tile_um=112, mpp=0.5)
        assert patches.shape == (keep.sum(), 224, 224, 3) and patches.dtype == np.uint8
        assert keep.mean() > 0.95
        glass = _glass_colour(s.image_path)
        small = patches[:, ::4, ::4].astype(np.float32)
        tissue = (np.linalg.norm(small - glass, axis=3) > 40).mean(axis=(1, 2))
        assert np.median(tissue) > 0.6, (s.name, np.median(tissue))
        assert (patches.reshape(len(patches), -1).std(axis=1) > 5).all()


def _glass_colour(path):
    """Median colour of the image's top and bottom strips (a fast 1/8 JPEG draft decode)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (im.width // 8, im.height // 8))
        rgb = np.asarray(im.convert("RGB"))
    return np.median(np.concatenate([rgb[:20].reshape(-1, 3), rgb[-20:].reshape(-1, 3)]), axis=0)


def test_panel_and_targets(her2st, shared_data):
    panel = shared_data / "reference/xenium_breast_panel_280.txt"
    genes = panel_genes(her2st, panel)
    assert len(genes) == 253  # README: 253 of the 280 panel genes are measured in all five sections
    assert {"ERBB2", "ESR1", "MKI67"} <= set(genes)
    assert len(panel_genes(her2st)) > 10000
    y = targets(her2st[0], genes)
    assert y.shape == (len(her2st[0]), 253) and y.dtype == np.float32
    raw = her2st[0].counts[:, genes].X.toarray()
    np.testing.assert_allclose(np.expm1(y).sum(axis=1)[raw.sum(1) > 0], 1e4, rtol=1e-3)
    with pytest.raises(SectionFormatError, match="not measured"):
        targets(her2st[0], ["NOT_A_GENE"])


# ---------------------------------------------------------------------------------------- Visium


def test_visium_reads_counts_and_hires_coords(shared_data):
    v = read_section(shared_data / "visium")
    assert v.layout == "visium" and v.counts.shape == (100, 100) and v.spot_diameter_um == 55
    scale = json.loads((shared_data / "visium/spatial/scalefactors_json.json").read_text())
    pos = pd.read_csv(shared_data / "visium/spatial/tissue_positions_list.csv", header=None, index_col=0)
    full = pos.loc[v.counts.obs_names, [5, 4]].to_numpy(float)  # (pxl_col, pxl_row) = (x, y)
    np.testing.assert_allclose(v.xy, full * scale["tissue_hires_scalef"])
    assert v.mpp == pytest.approx(55 / scale["spot_diameter_fullres"] / scale["tissue_hires_scalef"])
    assert "Visium spot diameter" in v.mpp_source and "hires" in v.mpp_source
    assert v.image_path.name == "tissue_hires_image.png"
    patches, keep = section_patches(v, tile_um=112, mpp=0.5, out_px=32)
    assert patches.shape == (keep.sum(), 32, 32, 3) and keep.any()  # the hires PNG is blank: any pixels do


def test_visium_new_positions_header_and_fullres_image(shared_data, tmp_path):
    """Space Ranger ≥ 2 writes tissue_positions.csv with a header; image= gives full-res coordinates."""
    folder = tmp_path / "S1" / "outs"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(shared_data / "visium/filtered_feature_bc_matrix.h5", folder)
    shutil.copy(shared_data / "visium/spatial/scalefactors_json.json", folder / "spatial")
    pos = pd.read_csv(shared_data / "visium/spatial/tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                             "pxl_col_in_fullres"])
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] //= 10  # fits a small full-res test image
    pos.to_csv(folder / "spatial/tissue_positions.csv", index=False)
    image = make_slide(tmp_path / "fullres.tiff", width=1200, height=1200)
    v = read_section(folder, image=image)
    assert v.name == "S1" and v.counts.shape == (100, 100) and v.image_path == image.resolve()
    row = pos.set_index("barcode").loc[v.counts.obs_names[0]]
    np.testing.assert_allclose(v.xy[0], [row.pxl_col_in_fullres, row.pxl_row_in_fullres])
    assert "hires" not in v.mpp_source
    with pytest.raises(SectionFormatError, match="does not match"):
        read_section(folder, image=make_slide(tmp_path / "tiny.tiff", width=64, height=64))


# ---------------------------------------------------------------------------------------- HEST-style


def test_synthetic_hest_section(synth_world):
    import anndata as ad

    sections = find_sections(synth_world / "st")
    assert len(sections) == 1
    s = sections[0]
    folder = next((synth_world / "st").iterdir())
    truth = ad.read_h5ad(folder / "section.h5ad")
    assert s.layout == "hest" and s.name == folder.name and s.image_path.name == "he.tiff"
    assert s.mpp == 0.5 and s.mpp_source == "uns['mpp']" and s.spot_diameter_um == pytest.approx(100)
    np.testing.assert_array_equal(s.xy, truth.obsm["spatial"])
    np.testing.assert_array_equal(s.counts.X.toarray(), truth.X)
    patches, keep = section_patches(s, tile_um=112, mpp=1.0)
    assert patches.shape[1:] == (112, 112, 3) and keep.sum() == len(patches) > 0
    assert read_section(folder / "section.h5ad").name == s.name


def test_hest1k_folders_and_metadata_json(synth_world, tmp_path):
    """HEST-1k layout: st/<id>.h5ad, wsis/<id>.tif, metadata/<id>.json with pixel_size_um_estimated."""
    import anndata as ad

    folder = next((synth_world / "st").iterdir())
    adata = ad.read_h5ad(folder / "section.h5ad")
    del adata.uns["mpp"]
    for sub in ("st", "wsis", "metadata"):
        (tmp_path / sub).mkdir()
    for sid in ("TENX1", "TENX2"):
        adata.write_h5ad(tmp_path / "st" / f"{sid}.h5ad")
        shutil.copy(folder / "he.tiff", tmp_path / "wsis" / f"{sid}.tif")
        meta = {"pixel_size_um_estimated": 0.5, "pixel_size_um_embedded": 0.25}
        (tmp_path / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    sections = find_sections(tmp_path)
    assert [s.name for s in sections] == ["TENX1", "TENX2"]
    assert sections[0].mpp == 0.5 and sections[0].mpp_source == "metadata.json['pixel_size_um_estimated']"


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_genes_are_summed(synth_world, tmp_path):
    import anndata as ad

    folder = next((synth_world / "st").iterdir())
    adata = ad.read_h5ad(folder / "section.h5ad")
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    (tmp_path / "dup").mkdir()
    adata.write_h5ad(tmp_path / "dup" / "section.h5ad")
    shutil.copy(folder / "he.tiff", tmp_path / "dup" / "he.tiff")
    s = read_section(tmp_path / "dup")
    assert s.counts.n_vars == adata.n_vars - 1 and s.counts.var_names.is_unique
    np.testing.assert_array_equal(s.counts[:, names[0]].X.toarray().ravel(), adata.X[:, 0] + adata.X[:, 1])


# ---------------------------------------------------------------------------------------- bad inputs


def test_counts_without_selection_table(shared_data, tmp_path):
    (tmp_path / "C2").mkdir()
    (tmp_path / "C2" / "C2.tsv.gz").symlink_to(shared_data / "her2st/C2/C2.tsv.gz")
    with pytest.raises(SectionFormatError, match="C2_selection.tsv"):
        read_section(tmp_path / "C2")
    with pytest.raises(SectionFormatError, match="no spatial-transcriptomics section found.*selection"):
        find_sections(tmp_path)


def test_h5ad_without_spatial(synth_world, tmp_path):
    import anndata as ad

    folder = next((synth_world / "st").iterdir())
    adata = ad.read_h5ad(folder / "section.h5ad")
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "section.h5ad")
    with pytest.raises(SectionFormatError, match=r"obsm\['spatial'\]"):
        read_section(tmp_path / "section.h5ad")


def test_nothing_recognisable(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TesseraError, match="no spatial-transcriptomics section recognised.*Space Ranger"):
        read_section(tmp_path)
    with pytest.raises(TesseraError, match="no spatial-transcriptomics section found"):
        find_sections(tmp_path)
    with pytest.raises(TesseraError, match="no such file"):
        read_section(tmp_path / "missing")


def test_section_format_error_lives_in_core_errors():
    from core import errors

    assert SectionFormatError is errors.SectionFormatError and issubclass(SectionFormatError, TesseraError)


@pytest.mark.parametrize("content", [None, "", "# header only\n\n", b"\xff\xfe\x00garbage"])
def test_panel_file_missing_empty_or_unreadable(synth_world, tmp_path, content):
    sections = find_sections(synth_world / "st")
    panel = tmp_path / "panel.txt"
    if isinstance(content, bytes):
        panel.write_bytes(content)
    elif content is not None:
        panel.write_text(content)
    expected = {None: "no such gene-panel file", bytes: "cannot be read as text"}.get(
        content if content is None else type(content), "lists no gene")
    with pytest.raises(SectionFormatError, match="panel.txt: .*" + expected):
        panel_genes(sections, panel)
    genes = list(sections[0].counts.var_names[:2])
    panel.write_text("# panel\n" + "\n".join(["NOT_A_GENE", *genes]) + "\n")
    assert panel_genes(sections, panel) == genes
