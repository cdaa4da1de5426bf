"""Measured vs predicted on ST sections: compare_section, the per-gene table, figures and ``st-compare``.

Golden numbers come from scipy.stats.pearsonr / spearmanr on the returned arrays and from hand
computation (3 spots); measured values are checked against log1p CP10k computed here with numpy
from the section's raw counts.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.analysis.measured_spatial import (best_gene, comparison_json, measured_vs_predicted, shared_range,
                                            sorted_table, spot_maps, table_csv)
from core.errors import AnalysisError
from core.training.st_compare import SectionComparison, compare_section, gene_table, section_paths


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _log_cp10k(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0) * 1e4)   # a 0-count spot stays 0


@pytest.fixture(scope="module")
def demo_model(demo_env):
    from core.engine.modelhub import load_model

    settings, _ = demo_env
    return load_model("demo-synthetic", settings.model_dirs)


@pytest.fixture(scope="module")
def demo_section(demo_env):
    from core.training.stdata import read_section

    settings, _ = demo_env
    return read_section(sorted((settings.demo_dir / "st").iterdir())[-1])


@pytest.fixture(scope="module")
def demo_cmp(demo_model, demo_section):
    return compare_section(demo_model, demo_section)


# ------------------------------------------------------------------ the per-gene table
def test_gene_table_hand_built_three_spots():
    """3 spots × 4 genes, by hand:
    gene a: measured (1, 2, 3), predicted (1, 2, 4): deviations (-1, 0, 1) and (-4/3, -1/3, 5/3),
            r = 3 / (√2 · √(42)/3) = 9/√84 = 0.981981…; ranks identical → ρ = 1.
    gene b: measured (3, 1, 2), predicted (1, 2, 3): r = -1 / (√2 · √2) = -0.5; the ranks are the values → ρ = -0.5.
    gene c: measured constant → r = ρ = NaN. gene d: predicted constant → NaN (scipy also gives NaN)."""
    measured = np.array([[1, 3, 2, 1], [2, 1, 2, 5], [3, 2, 2, 9]], float)
    predicted = np.array([[1, 1, 0, 4], [2, 2, 1, 4], [4, 3, 5, 4]], float)
    with np.errstate(all="ignore"):
        table = gene_table(measured, predicted, ["a", "b", "c", "d"])
    assert list(table.columns) == ["gene", "pearson_r", "spearman_rho", "n_spots", "measured_mean", "predicted_mean"]
    assert table["pearson_r"].iloc[0] == pytest.approx(9 / math.sqrt(84), abs=1e-12)
    assert table["spearman_rho"].iloc[0] == pytest.approx(1.0, abs=1e-12)
    assert table["pearson_r"].iloc[1] == pytest.approx(-0.5, abs=1e-12)
    assert table["spearman_rho"].iloc[1] == pytest.approx(-0.5, abs=1e-12)
    assert table[["pearson_r", "spearman_rho"]].iloc[2:].isna().all().all()
    assert list(table["n_spots"]) == [3, 3, 3, 3]
    assert table["measured_mean"].tolist() == pytest.approx([2, 2, 2, 5])
    assert table["predicted_mean"].tolist() == pytest.approx([7 / 3, 2, 2, 4])
    for j in range(2):   # and scipy agrees
        assert table["pearson_r"].iloc[j] == pytest.approx(stats.pearsonr(measured[:, j], predicted[:, j])[0], abs=1e-12)
        assert table["spearman_rho"].iloc[j] == pytest.approx(stats.spearmanr(measured[:, j], predicted[:, j])[0],
                                                              abs=1e-12)


def test_gene_table_ties_match_scipy_spearman():
    """Tied values get average ranks, as scipy.stats.spearmanr does."""
    rng = np.random.default_rng(3)
    measured = rng.integers(0, 4, (40, 3)).astype(float)
    predicted = measured + rng.normal(0, 1, (40, 3))
    table = gene_table(measured, predicted, list("xyz"))
    for j in range(3):
        assert table["spearman_rho"].iloc[j] == pytest.approx(stats.spearmanr(measured[:, j], predicted[:, j])[0],
                                                              abs=1e-10)


def test_gene_table_rejects_mismatched_shapes():
    with pytest.raises(AnalysisError, match="same shape"):
        gene_table(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])


def _tiny(measured, predicted, genes) -> SectionComparison:
    measured, predicted = np.asarray(measured, np.float32), np.asarray(predicted, np.float32)
    n = len(measured)
    with np.errstate(all="ignore"):
        table = gene_table(measured, predicted, genes)
    return SectionComparison(section="S1", layout="hest", model="m@1", image_path="none", image_size=(100, 80), mpp=1.0,
                             spot_diameter_px=10.0, spot_ids=tuple(f"s{i}" for i in range(n)),
                             xy=np.c_[np.arange(n) * 10.0 + 5, np.full(n, 40.0)], genes=tuple(genes),
                             measured=measured, predicted=predicted, table=table)


def test_sorting_json_and_csv_of_a_constant_column():
    """A constant column's r is NaN: last when sorted by r, null in strict JSON, empty in the CSV."""
    cmp = _tiny([[1, 3, 2], [2, 1, 2], [3, 2, 2]], [[1, 1, 0], [2, 2, 1], [4, 3, 5]], ["b_gene", "a_gene", "c_const"])
    assert list(sorted_table(cmp, "r")["gene"]) == ["b_gene", "a_gene", "c_const"]
    assert list(sorted_table(cmp, "gene")["gene"]) == ["a_gene", "b_gene", "c_const"]
    assert best_gene(cmp) == "b_gene"
    with pytest.raises(AnalysisError, match="Sort by"):
        sorted_table(cmp, "rho")
    out = _strict(json.dumps(comparison_json(cmp), allow_nan=False))
    assert out["genes"][-1] == {**out["genes"][-1], "gene": "c_const", "pearson_r": None, "spearman_rho": None}
    assert out["n_genes_scored"] == 2 and out["median_r"] == pytest.approx(np.median([9 / math.sqrt(84), -0.5]))
    csv = pd.read_csv(io.BytesIO(table_csv(cmp)))
    assert list(csv["gene"]) == ["b_gene", "a_gene", "c_const"] and np.isnan(csv["pearson_r"].iloc[-1])


def test_maps_share_one_colour_scale_over_both():
    """zmin/zmax of both maps = the 2nd/98th percentile (np.percentile) of measured ∪ predicted, or min/max."""
    rng = np.random.default_rng(0)
    measured, predicted = rng.normal(2, 1, (30, 2)), rng.normal(5, 2, (30, 2))
    cmp = _tiny(measured, predicted, ["g1", "g2"])
    thumb = np.zeros((8, 10, 3), np.uint8)
    both = np.concatenate([cmp.measured[:, 1], cmp.predicted[:, 1]]).astype(float)
    fig = spot_maps(cmp, "g2", thumb, mode="robust")
    spots = [t for t in fig.data if t.type == "scatter"]
    assert len(spots) == 2 and [t.marker.coloraxis for t in spots] == ["coloraxis", "coloraxis"]
    assert fig.layout.coloraxis.cmin == pytest.approx(np.percentile(both, 2))
    assert fig.layout.coloraxis.cmax == pytest.approx(np.percentile(both, 98))
    np.testing.assert_allclose(spots[0].marker.color, cmp.measured[:, 1])
    np.testing.assert_allclose(spots[1].marker.color, cmp.predicted[:, 1])
    np.testing.assert_allclose(spots[1].x, cmp.xy[:, 0])
    assert sum(t.type == "image" for t in fig.data) == 2
    full = spot_maps(cmp, "g2", thumb, mode="minmax")
    assert (full.layout.coloraxis.cmin, full.layout.coloraxis.cmax) == pytest.approx((both.min(), both.max()))
    assert shared_range(cmp, "g2", "minmax") == pytest.approx((both.min(), both.max()))
    scatter = measured_vs_predicted(cmp, "g1")
    np.testing.assert_allclose(scatter.data[0].x, cmp.measured[:, 0])
    np.testing.assert_allclose(scatter.data[0].y, cmp.predicted[:, 0])
    with pytest.raises(AnalysisError, match="NOPE"):
        spot_maps(cmp, "NOPE", thumb)


# ------------------------------------------------------------------ on the demo world's ST section
def test_compare_section_on_a_demo_section(demo_cmp, demo_section, demo_model):
    """Spot ids/centres are the section's, measured = log1p CP10k over the shared genes from the raw
    counts (numpy here), and every gene's r / ρ is scipy's on the returned arrays."""
    cmp = demo_cmp
    shared = [g for g in demo_model.genes if g in set(demo_section.counts.var_names)]
    assert cmp.genes == tuple(shared) and cmp.n_spots + cmp.n_dropped == len(demo_section) and cmp.n_spots > 20
    assert cmp.measured.shape == cmp.predicted.shape == (cmp.n_spots, len(shared))
    rows = demo_section.counts.obs_names.get_indexer(list(cmp.spot_ids))
    assert (rows >= 0).all()
    np.testing.assert_allclose(cmp.xy, demo_section.xy[rows])
    raw = demo_section.counts[:, shared].X.toarray()[rows]
    np.testing.assert_allclose(cmp.measured, _log_cp10k(raw), rtol=1e-5, atol=1e-5)
    w, h = cmp.image_size
    assert ((cmp.xy >= 0) & (cmp.xy < [w, h])).all()
    for j, gene in enumerate(cmp.genes):
        row = cmp.table.iloc[j]
        assert row["gene"] == gene and row["n_spots"] == cmp.n_spots
        m, p = cmp.measured[:, j].astype(float), cmp.predicted[:, j].astype(float)
        if np.ptp(m) == 0 or np.ptp(p) == 0:
            assert np.isnan(row["pearson_r"])
            continue
        assert row["pearson_r"] == pytest.approx(stats.pearsonr(m, p)[0], abs=1e-6)
        assert row["spearman_rho"] == pytest.approx(stats.spearmanr(m, p)[0], abs=1e-6)
        assert row["measured_mean"] == pytest.approx(m.mean(), rel=1e-6)
    assert cmp.median_r == pytest.approx(np.nanmedian(cmp.table["pearson_r"]))


def test_a_gene_subset_keeps_the_panel_units(demo_cmp, demo_model, demo_section):
    """genes=[…] picks columns of the same arrays (normalised over the whole shared panel), in that order."""
    pick = [demo_cmp.genes[3], demo_cmp.genes[0]]
    sub = compare_section(demo_model, demo_section, genes=pick)
    assert sub.genes == tuple(pick)
    np.testing.assert_allclose(sub.measured, demo_cmp.measured[:, [3, 0]])
    np.testing.assert_allclose(sub.predicted, demo_cmp.predicted[:, [3, 0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(AnalysisError, match="NOTAGENE"):
        compare_section(demo_model, demo_section, genes=["NOTAGENE"])


def test_section_paths_finds_the_demo_sections_only(demo_env, tmp_path):
    """The world's st/ sections are found; the single-cell reference (.h5ad without an H&E) is not."""
    settings, _ = demo_env
    found = section_paths([settings.demo_dir])
    assert found == sorted((settings.demo_dir / "st").resolve().iterdir())
    assert section_paths([settings.demo_dir], max_depth=1) == []
    assert section_paths([tmp_path / "missing"]) == []


# ------------------------------------------------------------------ CLI
@pytest.fixture
def cli_env(demo_env, monkeypatch):
    settings, _ = demo_env
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    return settings


def test_cli_json_and_csv(cli_env, demo_cmp, demo_section, tmp_path, capsys):
    from core.cli import main

    csv = tmp_path / "out" / "r.csv"
    rc = main(["st-compare", "--section", str(sorted((cli_env.demo_dir / "st").iterdir())[-1]), "--model",
               "demo-synthetic", "--csv", str(csv), "--json", "-", "--top", "3"])
    out, err = capsys.readouterr()
    assert rc == 0
    report = _strict(out)
    assert report["section"] == demo_section.name and report["n_spots"] == demo_cmp.n_spots
    assert report["median_r"] == pytest.approx(demo_cmp.median_r, abs=1e-6)
    assert [g["gene"] for g in report["genes"]] == list(sorted_table(demo_cmp)["gene"])
    assert "median Pearson r" in err and f"… {len(demo_cmp.genes) - 3} more genes" in err
    table = pd.read_csv(csv)
    assert len(table) == len(demo_cmp.genes)
    expected = sorted_table(demo_cmp).set_index("gene")
    np.testing.assert_allclose(table.set_index("gene").loc[expected.index, "pearson_r"], expected["pearson_r"],
                               atol=1e-6)


def test_cli_sort_by_gene_and_a_gene_list(cli_env, tmp_path, capsys):
    from core.cli import main

    section = str(sorted((cli_env.demo_dir / "st").iterdir())[-1])
    genes = ["CD8A", "EPCAM", "VIM"]
    rc = main(["st-compare", "--section", section, "--genes", "VIM,CD8A", "EPCAM", "--sort", "gene",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = _strict((tmp_path / "r.json").read_text())
    assert [g["gene"] for g in report["genes"]] == genes and report["sort"] == "gene"
    assert "VIM" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--section", "/no/such/section"], "no such file or folder"),
    (["--section", "{tmp}"], "no spatial-transcriptomics section recognised"),
    (["--section", "{st}", "--model", "../../etc"], "not a valid model id"),
    (["--section", "{st}", "--model", "no-such-model"], "No model 'no-such-model'"),
    (["--section", "{st}", "--genes", "NOTAGENE"], "NOTAGENE"),
    (["--section", "{st}", "--image", "/no/such.tiff"], "not found"),
    (["--section", "{st}", "--top", "0"], "--top"),
])
def test_cli_bad_inputs_exit_2(cli_env, tmp_path, capsys, argv, message):
    from core.cli import main

    st = str(sorted((cli_env.demo_dir / "st").iterdir())[-1])
    argv = [a.format(tmp=tmp_path, st=st) for a in argv]
    rc = main(["st-compare", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err + out


# ------------------------------------------------------------------ real HER2ST (one small section)
def test_her2st_section_with_the_shipped_model(shared_data):
    """C3 (180 spots, the smallest HER2ST section here; ~20 s on 2 CPU cores) with models/weights/breast-her2st:
    measured = log1p CP10k over the shared genes from the raw C3.tsv.gz read here with pandas; every
    gene's r is scipy.stats.pearsonr's and equals evaluate's per-gene PCC (models.evaluate) where both vary."""
    from core.config import REPO_ROOT
    from core.engine.modelhub import load_model
    from core.training.stdata import read_section
    from models.evaluate import per_gene_pearson

    model = load_model("breast-her2st", [REPO_ROOT / "models" / "weights"])
    section = read_section(shared_data / "her2st" / "C3")
    cmp = compare_section(model, section)
    assert cmp.in_training and "in-sample" in cmp.training_notice   # breast-her2st was trained on every section
    raw = pd.read_csv(shared_data / "her2st" / "C3" / "C3.tsv.gz", sep="\t", index_col=0)
    raw.index = raw.index.astype(str)
    raw = raw.loc[:, raw.columns.isin(cmp.genes)]
    raw = raw.T.groupby(level=0, sort=False).sum().T   # a symbol listed twice is one gene (summed)
    np.testing.assert_allclose(cmp.measured, _log_cp10k(raw.loc[list(cmp.spot_ids), list(cmp.genes)].to_numpy()),
                               rtol=1e-5, atol=1e-5)
    r = cmp.table["pearson_r"].to_numpy()
    varying = np.isfinite(r)
    assert varying.sum() > 200
    np.testing.assert_allclose(r[varying], per_gene_pearson(cmp.predicted, cmp.measured)[varying], atol=1e-5)
    for j in np.flatnonzero(varying)[:: 25]:
        assert r[j] == pytest.approx(stats.pearsonr(cmp.measured[:, j].astype(float),
                                                    cmp.predicted[:, j].astype(float))[0], abs=1e-6)
    assert cmp.median_r > 0   # a model trained on HER2ST predicts its own genes better than chance


def test_a_training_section_is_flagged_as_in_sample(demo_cmp, demo_model):
    """The model card's training sections (demo card: SYN-A1..C1; breast-her2st: all five HER2ST
    sections) mark a comparison as in-sample, with a warning in the page, the CLI and the JSON."""
    from core.training.st_compare import _training_sections

    assert _training_sections({"training_data": {"sections": ["SYN-A1", "SYN-B1"], "held_out": "SYN-D1"}}) == \
        {"SYN-A1", "SYN-B1"}
    assert _training_sections({"training_data": "{'sections': ['B4', 'C2'], 'spots': 1015}"}) == {"B4", "C2"}
    assert _training_sections({}) == set() and _training_sections({"training_data": "not a dict"}) == set()
    trained = _training_sections(demo_model.card)
    assert trained and demo_cmp.in_training == (demo_cmp.section in trained)
    assert (demo_cmp.training_notice is not None) == demo_cmp.in_training
    from core.analysis.measured_spatial import comparison_json

    assert comparison_json(demo_cmp)["section_in_training_data"] == demo_cmp.in_training
