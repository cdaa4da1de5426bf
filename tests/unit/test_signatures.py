"""The signature library (core.analysis.signatures), its tile scores (core.analysis.signature_scores:
score_genes against scanpy, mean_z by hand), the ``sig:`` layers (core.analysis.maps), the
cross-modal query, the ``signatures`` CLI and the cross-modal page's library signature."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from core.analysis import signature_scores as ss
from core.analysis.maps import layer_tiles, layer_title, split_sig
from core.analysis.signatures import CATEGORIES, SIGNATURES, available, library, lookup, resolve, source
from core.analysis.spatial import slide_summary
from core.errors import TesseraError
from core.store.db import RunRecord, Store
from tests.app.test_pages import app_env, assert_clean, monkeypatch_module, run_page  # noqa: F401 (fixtures)

SIGNATURE_DIR = "signatures"


# ---------------------------------------------------------------- the library

def test_library_is_complete_cited_and_without_duplicates():
    required = {"proliferation", "t_cytotoxic", "b_plasma", "myeloid", "caf_stroma", "endothelial", "er_luminal",
                "her2", "scsubtype"}
    assert required <= set(CATEGORIES)
    assert {s.category for s in SIGNATURES.values()} == set(CATEGORIES)   # no empty category, no stray one
    assert {"Basal_SC", "Her2E_SC", "LumA_SC", "LumB_SC", "pam50_proliferation"} <= set(SIGNATURES)
    for name, sig in SIGNATURES.items():
        assert len(sig.genes) == len(set(sig.genes)), f"{name} repeats a gene"
        assert all(re.fullmatch(r"[A-Za-z0-9.\-]+", g) for g in sig.genes), name
        assert len(sig.source) > 20, name
        assert re.search(r"(19|20)\d\d", sig.source) or sig.source.startswith("curated"), name
        assert sig.description and sig.category in CATEGORIES, name
    assert len({n.lower() for n in SIGNATURES}) == len(SIGNATURES)        # names are unique ignoring case
    # the five sets that existing callers (variables, survival, associations) know keep their genes
    assert library()["oncotype_proliferation"] == ["MKI67", "AURKA", "BIRC5", "CCNB1", "MYBL2"]
    assert library()["cytolytic"] == ["GZMA", "PRF1"] and "Rooney" in source("cytolytic")
    assert {"oncotype_er", "oncotype_her2", "oncotype_invasion"} <= set(library())
    assert lookup("luma_sc") == "LumA_SC" and source("LUMA_SC").startswith("Wu S.Z.")
    assert available(["ERBB2", "grb7"]) == ["oncotype_her2", "her2_amplicon_17q12", "Her2E_SC"]


def test_scsubtype_lists_equal_the_supplementary_table(shared_data):
    """Wu et al. 2021, Supplementary Table S4, as stored in shared/data/signatures. R wrote the
    table, turning '-' into '.' (HLA-DRA → HLA.DRA); the code keeps the real symbols."""
    table = pd.read_csv(shared_data / SIGNATURE_DIR / "NatGen_Supplementary_table_S4_SCSubtype.csv",
                        encoding="utf-8-sig")
    assert list(table.columns) == ["Basal_SC", "Her2E_SC", "LumA_SC", "LumB_SC"]
    for column in table.columns:
        expected = [g.strip() for g in table[column].dropna()]
        assert [g.replace("-", ".") for g in SIGNATURES[column].genes] == expected, column


def test_garnett_sets_equal_the_marker_file(shared_data):
    """The sets cited as Wu et al.'s Garnett marker file are its ``expressed:`` lines, in order."""
    text = (shared_data / SIGNATURE_DIR / "garnett_breast_cancer_TME_markers_v4.txt").read_text()
    sections = {}
    for block in re.split(r"^>", text, flags=re.M)[1:]:
        expressed = re.search(r"^expressed:(.*)$", block, re.M).group(1)
        sections[block.splitlines()[0].strip()] = [g.strip() for g in expressed.split(",") if g.strip()]
    cited = {n: s for n, s in SIGNATURES.items() if "Garnett marker file" in s.source}
    assert len(cited) == 8
    for name, sig in cited.items():
        section = re.search(r"section “(.+)”", sig.source).group(1)
        assert list(sig.genes) == sections[section], name


# ---------------------------------------------------------------- the resolver

PANEL = ["ERBB2", "GRB7", "CD8A", "CD3E", "GZMB", "MKI67", "HLA-DRA"]


def test_resolver_names_missing_and_unknown_genes():
    r = resolve("ONCOTYPE_HER2", PANEL)
    assert (r.name, r.genes_used, r.genes_missing, r.is_library) == ("oncotype_her2", ("ERBB2", "GRB7"), (), True)
    assert r.notice is None
    r = resolve("her2_amplicon_17q12", [g.lower() for g in PANEL])
    assert r.genes_used == ("erbb2", "grb7")                               # the panel's spelling
    assert "7 of the 9 genes of her2_amplicon_17q12" in r.notice and "PPP1R1B" in r.notice and "IKZF3" in r.notice
    assert "rests on the 2 that remain" in r.notice
    r = resolve(" cd8a; CD3E,cd8a  gzmb ", PANEL)
    assert (r.name, r.genes_used, r.source, r.is_library) == ("CD8A,CD3E,GZMB", ("CD8A", "CD3E", "GZMB"),
                                                              "typed gene list", False)
    with pytest.raises(TesseraError, match=r"Not in the model's panel of 7 genes: NOTAGENE, FOO\."):
        resolve("CD8A, NOTAGENE, FOO", PANEL)
    with pytest.raises(TesseraError, match="'LumX_SC' is neither a library signature nor a gene"):
        resolve("LumX_SC", PANEL)
    with pytest.raises(TesseraError, match="None of the 46 genes of LumA_SC"):
        resolve("LumA_SC", PANEL)
    with pytest.raises(TesseraError, match="Name a signature"):
        resolve("  ", PANEL)


# ---------------------------------------------------------------- score_genes against scanpy

def _adata(x, genes):
    import anndata as ad

    return ad.AnnData(x, var=pd.DataFrame(index=pd.Index(genes)))


@pytest.mark.parametrize("n_genes,sig,ctrl_size", [
    (400, slice(0, 20), 5),        # bins of 17 genes: scanpy samples 5 per bin (its RNG reproduced)
    (400, slice(100, 103), 50),    # ctrl_size ≥ bin size: every gene of the bin
    (150, slice(0, 1), 50),        # a one-gene signature
    (10, slice(0, 2), 3),          # a pool under n_bins / 2 genes: one bin
])
def test_score_genes_equals_scanpy(n_genes, sig, ctrl_size):
    """Golden: ``scanpy.tl.score_genes`` (scanpy 1.11.5, random_state=0, n_bins=25) on the same
    float32 matrix; our control set from the same gene means, applied as fixed weights."""
    import scanpy as sc

    rng = np.random.default_rng(n_genes)
    genes = [f"G{i}" for i in range(n_genes)]
    x = rng.gamma(rng.uniform(0.2, 3.0, n_genes), 1.0, size=(300, n_genes)).astype(np.float32)
    signature = genes[sig]
    adata = _adata(x, genes)
    sc.tl.score_genes(adata, signature, ctrl_size=ctrl_size, random_state=0)
    control = ss.control_genes(pd.Series(np.nanmean(x, axis=0), index=genes), signature, ctrl_size=ctrl_size)
    assert not set(control) & set(signature)
    scoring = ss.Scoring(resolve(",".join(signature), genes), "score_genes",
                         ss.score_genes_weights(signature, control), 0.0, control)
    np.testing.assert_allclose(scoring.apply(x, genes), adata.obs["score"].to_numpy(), rtol=0, atol=1e-12)
    # a different seed draws other control genes where scanpy samples: the check above can fail
    if ctrl_size < 17:
        assert ss.control_genes(pd.Series(np.nanmean(x, axis=0), index=genes), signature, ctrl_size=ctrl_size,
                                seed=1) != control


# ---------------------------------------------------------------- small real stores

def _store(path, genes: list[str], runs: dict[str, np.ndarray]) -> tuple[Store, str]:
    """A DuckDB store with one model over ``genes`` and one run per entry (tiles × genes)."""
    store = Store(path)
    key = store.register_model("sim", "v1", genes, ["a", "b"], {})
    for name, expr in runs.items():
        n = len(expr)
        side = int(np.ceil(np.sqrt(n)))
        xy = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1) * 100
        record = RunRecord(run_key=name, slide_fp=f"fp-{name}", model_key=key, tiling_key="t", tiling={},
                           slide_name=f"{name}.svs", slide_path=f"/slides/{name}.svs", tile_size=100,
                           width=side * 100, height=side * 100, mpp=0.5, device="cpu", seconds=0.1)
        expr = np.asarray(expr, np.float32)
        store.write_run(record, xy, np.ones(n, np.float32), expr, np.ones((n, 4), np.float32) / 2,
                        np.full((n, 2), 0.5, np.float32), summary=slide_summary(expr, xy, 100, genes))
    return store, key


def test_mean_z_by_hand(tmp_path):
    """Two slides of two tiles, genes ERBB2 and CD8A (MKI67 not in the signature):
    ERBB2 over the four reference tiles = 1, 2, 3, 4 → mean 2.5, SD (ddof 1) = √(5/3) = 1.2909944;
    CD8A = 2, 2, 4, 4 → mean 3, SD = √(4/3) = 1.1547005. Tile (4, 4): (1.5/1.2909944 +
    1/1.1547005) / 2 = (1.1618950 + 0.8660254) / 2 = 1.0139602; tile (2, 2): (−0.3872983 −
    0.8660254) / 2 = −0.6266619; tiles (1, 2) and (3, 4) are their mirror images."""
    runs = {"s1": [[1, 2, 9], [2, 2, 0]], "s2": [[3, 4, 5], [4, 4, 1]]}
    store, key = _store(tmp_path / "s.duckdb", ["ERBB2", "CD8A", "MKI67"], {k: np.array(v) for k, v in runs.items()})
    with store:
        s1 = layer_tiles(store, key, "s1", "sig:erbb2,cd8a@mean_z", 50.0)["value"].to_numpy()
        s2 = layer_tiles(store, key, "s2", "sig:ERBB2,CD8A@mean_z", 50.0)["value"].to_numpy()
    np.testing.assert_allclose(s1, [-1.0139602, -0.6266619], atol=1e-6)
    np.testing.assert_allclose(s2, [0.6266619, 1.0139602], atol=1e-6)


def test_the_same_tile_scores_the_same_on_every_slide(tmp_path):
    """Slide B holds 10 tiles copied from slide A among 30 of another tissue: both methods give the
    copies the same scores on both slides. Scanpy on each slide alone (a per-slide score) would not."""
    import scanpy as sc

    rng = np.random.default_rng(3)
    genes = [f"GENE{i}" for i in range(72)]
    a = rng.gamma(rng.uniform(0.3, 3, 72), 1.0, size=(40, 72))
    b = np.concatenate([a[:10], rng.gamma(rng.uniform(0.3, 3, 72), 2.0, size=(30, 72))])
    store, key = _store(tmp_path / "s.duckdb", genes, {"A": a, "B": b})
    with store:
        for method in ss.METHODS:
            layer = f"sig:GENE1,GENE5,GENE9,GENE30@{method}"
            on_a = layer_tiles(store, key, "A", layer, 50.0)["value"].to_numpy()
            on_b = layer_tiles(store, key, "B", layer, 50.0)["value"].to_numpy()
            np.testing.assert_array_equal(on_a[:10], on_b[:10])
            assert not np.allclose(on_a[10:20], on_b[10:20])
    sig = ["GENE1", "GENE5", "GENE9", "GENE30"]
    per_slide = []
    for x in (a, b):
        adata = _adata(x.astype(np.float32), genes)
        sc.tl.score_genes(adata, sig, random_state=0)
        per_slide.append(adata.obs["score"].to_numpy()[:10])
    assert not np.allclose(*per_slide, atol=1e-6)


# ---------------------------------------------------------------- on the demo store

@pytest.fixture(scope="module")
def demo(demo_env):
    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        key = store.models()["model_key"].iloc[-1]
        runs = store.model_runs(key)
        parts = [store.run_expression(key, r)[1] for r in runs["run_key"]]
        genes = list(store.model_info(key).genes)
    return settings, key, runs, np.concatenate(parts), genes


def test_sig_layers_on_the_demo_store_equal_scanpy_on_every_tile(demo):
    """The reference is every tile the model predicted: ``sig:LumA_SC`` (score_genes) on a slide
    equals ``scanpy.tl.score_genes`` (1.11.5, defaults) on the AnnData of all those tiles, and
    ``@mean_z`` equals the z-scores of that matrix computed with numpy."""
    import scanpy as sc

    settings, key, runs, x, genes = demo
    start = int(runs["n_tiles"].iloc[0])
    rows = slice(start, start + int(runs["n_tiles"].iloc[1]))
    with Store(settings.store_path, read_only=True) as store:
        got = layer_tiles(store, key, runs["run_key"].iloc[1], "sig:LumA_SC", 112.0)
        z = layer_tiles(store, key, runs["run_key"].iloc[1], "sig:luma_sc@mean_z", 112.0)
        gene = layer_tiles(store, key, runs["run_key"].iloc[1], "gene:CD8A", 112.0)
    used = resolve("LumA_SC", genes).genes_used
    adata = _adata(x, genes)
    sc.tl.score_genes(adata, list(used))
    np.testing.assert_allclose(got["value"], adata.obs["score"].to_numpy()[rows], rtol=0, atol=1e-9)
    assert "SH3BGRL" in got.attrs["notice"] and got.attrs["method"] == "score_genes"
    sub = x[:, [genes.index(g) for g in used]].astype(np.float64)
    expected = ((sub - sub.mean(axis=0)) / sub.std(axis=0, ddof=1)).mean(axis=1)
    np.testing.assert_allclose(z["value"], expected[rows], rtol=0, atol=1e-9)
    np.testing.assert_allclose(gene["value"], x[rows, genes.index("CD8A")], rtol=1e-6)


def test_layer_grammar_and_titles():
    assert split_sig("LumA_SC") == ("LumA_SC", "score_genes")
    assert split_sig("CD8A,CD3E@mean_z") == ("CD8A,CD3E", "mean_z")
    assert layer_title("sig:luma_sc@mean_z") == "LumA_SC signature by mean_z"
    assert layer_title("sig:CD8A,CD3E") == "signature (CD8A, CD3E) by score_genes"
    assert layer_title("gene:ERBB2") == "ERBB2" and layer_title("nuclei:all") == "all nuclei / mm²"
    with pytest.raises(TesseraError, match="'median'"):
        split_sig("LumA_SC@median")


def test_signature_top_tiles_are_the_best_tiles_of_the_cohort(demo):
    from core.analysis.crossmodal import signature_top_tiles

    settings, key, runs, x, genes = demo
    with Store(settings.store_path, read_only=True) as store:
        top, scoring = signature_top_tiles(store, key, "pam50_proliferation", list(runs["run_key"]), 5,
                                           method="mean_z")
    assert scoring.method == "mean_z" and scoring.n_tiles == len(x)
    every = scoring.apply(x, genes)
    np.testing.assert_allclose(top["value"], np.sort(every)[::-1][:5], rtol=0, atol=1e-9)


def test_cli_list_and_score_json(demo, capsys):
    from core.cli import main

    settings, key, runs, x, genes = demo
    store = ["--store", str(settings.store_path)]
    assert main(["signatures", "list", "--cohort", "demo", *store, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == key and len(out["signatures"]) == len(SIGNATURES)
    luma = next(r for r in out["signatures"] if r["name"] == "LumA_SC")
    assert luma["n_genes"] == 46 and luma["n_in_panel"] == 46 - len(luma["missing"])
    assert luma["n_in_panel"] == len(resolve("LumA_SC", genes).genes_used)
    assert luma["source"].startswith("Wu S.Z.") and luma["category"] == "scsubtype"
    assert main(["signatures", "list", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["signatures"][0]["n_in_panel"] is None

    slide = runs["run_key"].iloc[2]
    assert main(["signatures", "score", "--cohort", "demo", "--signature", "LumA_SC", *store, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scoring"]["method"] == "score_genes" and len(out["slides"]) == len(runs)
    row = next(r for r in out["slides"] if r["run_key"] == slide)
    with Store(settings.store_path, read_only=True) as s:
        values = layer_tiles(s, key, slide, "sig:LumA_SC", 112.0)["value"].to_numpy()
    assert row["n_tiles"] == len(values)
    np.testing.assert_allclose([row["mean"], row["q90"]], [values.mean(), np.quantile(values, 0.9)], atol=1e-9)
    name = row["slide_name"]
    assert main(["signatures", "score", "--cohort", "demo", "--signature", "cd8a,cd3e", "--method", "mean_z",
                 "--slide", name, *store, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["slide_name"] for r in out["slides"]] == [name] and out["scoring"]["genes_used"] == ["CD8A", "CD3E"]
    assert main(["signatures", "score", "--cohort", "demo", "--signature", "CD8A,NOTAGENE", *store]) == 2
    assert "NOTAGENE" in capsys.readouterr().err


# ---------------------------------------------------------------- the cross-modal page

def test_crossmodal_page_scores_a_library_signature(app_env):  # noqa: F811 (the fixture imported above)
    at = run_page("pages/crossmodal.py")
    at.radio(key="xm_kind").set_value("Signature").run()
    at.selectbox(key="xm_lib").select("LumA_SC").run()
    assert_clean(at)
    captions = [c.value.replace("\\", "") for c in at.caption]
    assert any("highest predicted" in c and "LumA_SC score by score_genes: mean of" in c and "Wu S.Z." in c
               for c in captions), captions
    assert any("SH3BGRL" in i.value.replace("\\", "") for i in at.info)      # the missing genes are named
    assert len(at.get("image")) >= 24
    at.selectbox(key="xm_method").select("mean_z").run()
    at.toggle(key="xm_per_slide").set_value(True).run()
    assert_clean(at)
    assert any("LumA_SC score by mean_z" in c.value.replace("\\", "") for c in at.caption)
    assert len(at.dataframe[0].value) == 60
