"""Cross-modal retrieval (core.analysis.retrieval, the CLI's ``query``) on the tiny demo world:
quality clearly above chance against the world's truth in every space, the z-projection score
against a hand computation, caps, bottom-k, the clinical filter, profile inputs, and the CLI
giving the same results as the function with clear errors for bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.analysis.retrieval import Query, retrieve
from core.engine.modelhub import load_model
from core.errors import TesseraError
from core.store.db import Store
from core.training import retrieval_eval as E


@pytest.fixture(scope="module")
def world(demo_env):
    settings, _ = demo_env
    model = load_model("demo-synthetic", settings.model_dirs)
    with Store(settings.store_path, read_only=True) as store:
        truth = E.demo_truth(store, "demo", model.key, settings.demo_dir)
    return settings, model, truth


def test_the_demo_model_ships_a_joint_space_and_every_run_stores_it(world):
    settings, model, _ = world
    assert model.module.joint is not None
    card = json.loads((settings.demo_dir / "models" / "demo-synthetic" / "card.json").read_text())
    r = card["metrics"]["joint"]["retrieval"]
    assert r["top50"] > 2 * r["random50"]                # held-out section, in the card
    with Store(settings.store_path, read_only=True) as store:
        runs = store.cohort_runs("demo", model.key).dropna(subset=["run_key"])
        assert store.has_joint(list(runs["run_key"]))
        v = store.tile_vector(runs["run_key"].iloc[0], 0, "joint")
        assert v.shape == (model.module.joint.config.dim,) and abs(np.linalg.norm(v) - 1) < 1e-3


@pytest.mark.parametrize("space", ["predicted", "joint"])
def test_gene_to_tiles_precision_is_far_above_chance(world, space):
    """precision@12 of ten marker genes against the true top decile (chance 0.10)."""
    settings, model, truth = world
    with Store(settings.store_path, read_only=True) as store:
        res = E.gene_precision(store, "demo", model.key, truth, space=space, joint=model.module.joint, k=12)
    assert res["chance"] == pytest.approx(0.1, abs=0.02)
    assert res["precision"] > 0.4, res


def test_profile_to_tile_finds_the_tile_of_a_true_profile(world):
    """The true profile of a tile as the query finds that tile in the top 50 several times more
    often than chance, in the joint space and in the predicted space."""
    settings, model, truth = world
    with Store(settings.store_path, read_only=True) as store:
        for space in ("joint", "predicted"):
            res = E.profile_retrieval(store, "demo", model.key, truth, space=space, joint=model.module.joint,
                                      n_queries=30)
            assert res["top50"] > 2.5 * res["random50"], (space, res)


def test_image_to_image_agrees_on_the_compartment_more_than_chance(world):
    settings, model, truth = world
    with Store(settings.store_path, read_only=True) as store:
        for space in ("image", "joint"):
            res = E.compartment_agreement(store, "demo", model.key, truth, space=space, n_queries=30, k=8)
            assert res["agreement"] > res["chance"] + 0.15, (space, res)


def test_z_projection_score_is_the_hand_computed_one(world):
    """Predicted space, profile query: score = (1/G) Σ_g z_q,g · (ŷ_g − μ_g)/σ_g with μ, σ over the
    cohort's tiles (population sd), computed here with numpy from the stored predictions."""
    settings, model, _ = world
    genes = ["CD8A", "MKI67", "COL1A1"]
    profile = {"CD8A": 3.0, "MKI67": 0.5, "COL1A1": 2.0}
    with Store(settings.store_path, read_only=True) as store:
        res = retrieve(store, "demo", model.key, Query("profile", profile=profile), space="predicted", k=5)
        runs = store.cohort_runs("demo", model.key).dropna(subset=["run_key"])
        frames = []
        for rk in runs["run_key"]:
            tiles, matrix, _ = store.run_expression(model.key, rk, genes)
            frames.append(pd.DataFrame(matrix, columns=genes).assign(run_key=rk, tile_idx=tiles["tile_idx"].to_numpy()))
    df = pd.concat(frames, ignore_index=True)
    mu, sd = df[genes].mean(), df[genes].std(ddof=0)
    zq = (pd.Series(profile) - mu) / sd
    df["score"] = ((df[genes] - mu) / sd * zq).sum(axis=1) / len(genes)
    best = df.sort_values("score", ascending=False).head(5)
    np.testing.assert_allclose(res.results["score"].to_numpy(), best["score"].to_numpy(), rtol=1e-4, atol=1e-6)
    assert list(res.results["tile"]) == list(best["tile_idx"])
    assert res.found_by == "by predicted profile" and "z-projection" in res.score


def test_caps_bottom_k_and_the_clinical_filter(world):
    settings, model, _ = world
    with Store(settings.store_path, read_only=True) as store:
        top = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=20)
        assert top.results["score"].is_monotonic_decreasing and top.found_by == "highest predicted"
        capped = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=10, per_slide=1)
        assert capped.results["slide"].is_unique and len(capped.results) == 10
        per_patient = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=10, per_patient=2)
        assert per_patient.results["patient"].value_counts().max() <= 2
        low = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=10, lowest=True)
        assert low.results["score"].is_monotonic_increasing and low.results["score"].max() < top.results["score"].min()
        clinical = store.clinical("demo")
        wanted = clinical["PAM50"].value_counts().index[0]
        ids = set(clinical.loc[clinical["PAM50"] == wanted, "bcr_patient_barcode"])
        only = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=10, where={"PAM50": [wanted]})
        assert set(only.results["patient"]) <= ids and only.n_slides < top.n_slides
        with pytest.raises(TesseraError, match="no patient has"):
            retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), where={"PAM50": ["Nonsense"]})
        with pytest.raises(TesseraError, match="image space needs an image query"):
            retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), space="image")


def test_similar_tiles_by_image_and_in_the_joint_space_exclude_the_query(world):
    settings, model, _ = world
    with Store(settings.store_path, read_only=True) as store:
        runs = store.cohort_runs("demo", model.key).dropna(subset=["run_key"])
        slide = runs["slide_name"].iloc[0]
        for space in ("image", "joint", "predicted"):
            res = retrieve(store, "demo", model.key, Query("tile", slide=slide, tile=0), space=space, k=6)
            assert len(res.results) == 6
            assert not ((res.results["slide"] == slide) & (res.results["tile"] == 0)).all()
        assert res.found_by == "by predicted profile"
        with pytest.raises(TesseraError, match="there is no tile"):
            retrieve(store, "demo", model.key, Query("tile", slide=slide, tile=10_000))


def test_top_genes_of_a_tile_are_ranked_against_the_cohort(world):
    """The list is by z-score against the cohort's tiles, so genes every tile expresses highly
    (housekeeping) do not top it just for their level."""
    from core.analysis.crossmodal import cohort_stats, tile_top_genes

    settings, model, _ = world
    with Store(settings.store_path, read_only=True) as store:
        runs = store.cohort_runs("demo", model.key).dropna(subset=["run_key"])
        keys = list(runs["run_key"])
        top = tile_top_genes(store, model.key, keys, keys[0], 0, top=10)
        stats = cohort_stats(store, model.key, keys)
        profile = store.tile_profile(model.key, keys[0], 0).astype(float)
    z = ((profile - stats["mean"]) / stats["sd"]).sort_values(ascending=False)
    assert list(top["gene"]) == list(z.index[:10])
    assert top["z"].is_monotonic_decreasing
    assert top["predicted"].iloc[0] < profile.max() or top["gene"].iloc[0] == profile.idxmax()


def _cli(args, capsys):
    from core.cli import main

    code = main(["query", *map(str, args)])
    return code, capsys.readouterr()


def test_cli_query_json_is_the_function_s_result(world, capsys, monkeypatch, tmp_path):
    settings, model, _ = world
    monkeypatch.setenv("TESSERA_STORE", str(settings.store_path))
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    code, out = _cli(["--cohort", "demo", "--gene", "cd8a", "--k", "5", "--json", "-"], capsys)
    assert code == 0, out.err
    payload = json.loads(out.out)
    with Store(settings.store_path, read_only=True) as store:
        res = retrieve(store, "demo", model.key, Query("gene", genes=["CD8A"]), k=5)
    assert payload["space"] == "predicted" and payload["found_by"] == "highest predicted"
    assert [r["tile"] for r in payload["results"]] == list(res.results["tile"])
    assert set(payload["results"][0]) == {"rank", "slide", "patient", "tile", "x", "y", "score"}
    prof = tmp_path / "profile.csv"
    prof.write_text("gene,value\nCD8A,3.5\nGZMB,2.0\nNOTAGENE,1\n")
    code, out = _cli(["--cohort", "demo", "--profile", prof, "--space", "joint", "--k", "5", "--json", "-"], capsys)
    assert code == 0, out.err
    payload = json.loads(out.out)
    assert payload["found_by"] == "closest in the joint space" and len(payload["results"]) == 5
    assert any("NOTAGENE" in n for n in payload["notes"])


@pytest.mark.parametrize("args, message", [
    (["--gene", "NOTAGENE"], "not in the model's panel"),
    (["--gene", "CD8A", "--signature", "CD8A,GZMB"], "exactly one of"),
    (["--tile", "nocolon"], "SLIDE:INDEX"),
    (["--gene", "CD8A", "--where", "PAM50"], "COLUMN=VALUE"),
    (["--gene", "CD8A", "--where", "PAM50=Nonsense"], "no patient has"),
    (["--profile", "{tmp}/missing.csv"], "No profile file"),
    (["--profile", "{tmp}/bad.csv"], "Line 2"),
    (["--patch", "{tmp}/bad.csv"], "not a readable"),
    (["--gene", "CD8A", "--k", "0"], "between 1 and 500"),
])
def test_cli_bad_input_exits_2_with_a_message(world, capsys, monkeypatch, tmp_path, args, message):
    settings, _, _ = world
    monkeypatch.setenv("TESSERA_STORE", str(settings.store_path))
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    (tmp_path / "bad.csv").write_text("gene,value\nCD8A,high\n")
    code, out = _cli(["--cohort", "demo", *[a.replace("{tmp}", str(tmp_path)) for a in args]], capsys)
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_profile_inputs_parse_pairs_and_h5ad_selections(tmp_path):
    import anndata as ad

    from core.analysis.query_inputs import parse_profile_text, read_profile

    assert parse_profile_text("gene value\nCD8A 2.5\nGZMB\t1e-1\n\n# note\nMKI67=0") == \
        {"CD8A": 2.5, "GZMB": 0.1, "MKI67": 0.0}
    with pytest.raises(TesseraError, match="not finite"):
        parse_profile_text("gene,value\nCD8A,1e999")
    counts = np.array([[10, 0], [30, 10], [0, 5]], np.float32)
    a = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": ["T", "T", "B"]}, index=["c1", "c2", "c3"]),
                   var=pd.DataFrame(index=["CD8A", "MS4A1"]))
    a.write_h5ad(tmp_path / "cells.h5ad")
    profile, label = read_profile(tmp_path / "cells.h5ad", obs="cell_type=T")
    expected = np.log1p(counts[:2] / counts[:2].sum(axis=1, keepdims=True) * 1e4).mean(axis=0)   # hand: CP10k, log1p, mean
    assert profile == pytest.approx(dict(zip(["CD8A", "MS4A1"], expected)))
    assert "2 cells" in label
    with pytest.raises(TesseraError, match="no obs column"):
        read_profile(tmp_path / "cells.h5ad", obs="celltype=T")
    with pytest.raises(TesseraError, match="obs selection"):
        read_profile(tmp_path / "cells.h5ad")


def test_patch_mpp_comes_from_the_tiff_resolution_or_is_unknown(tmp_path):
    import io

    from PIL import Image

    from core.analysis.query_inputs import read_patch

    img = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="TIFF", dpi=(50_800, 50_800))        # 0.5 µm/px written as px per inch
    _, mpp, source = read_patch(buf.getvalue(), "p.tif")
    assert mpp == pytest.approx(0.5) and "TIFF" in source
    buf = io.BytesIO()
    img.save(buf, format="PNG", dpi=(72, 72))                  # a screen default says nothing
    assert read_patch(buf.getvalue(), "p.png")[1] is None


def test_the_joint_space_has_its_own_index_that_the_query_uses(world, tmp_path):
    """``refresh`` builds a second index over the joint embeddings; a joint-space query served by
    it returns what exact search over the joint embeddings returns."""
    import shutil

    from core.store.tile_index import refresh

    settings, model, _ = world
    path = tmp_path / "store.duckdb"
    shutil.copy(settings.store_path, path)
    done = refresh(path, model.key, min_vectors=100, kind="exact", rebuild_stale=-1)
    assert done[model.key].startswith("built") and done[f"{model.key} (joint)"].startswith("built")
    with Store(path, read_only=True) as store:
        runs = store.cohort_runs("demo", model.key).dropna(subset=["run_key"])
        res = retrieve(store, "demo", model.key, Query("tile", slide=runs["slide_name"].iloc[2], tile=1),
                       space="joint", k=8)
        ids, emb = store.embeddings(list(store.run_ids(list(runs["run_key"])).values()), space="joint")
        q = store.tile_vector(runs["run_key"].iloc[2], 1, "joint")
    order = np.argsort(-(emb @ q), kind="stable")[1:9]
    assert list(res.results["tile"]) == list((ids[order] & 0xFFFFFFFF).astype(int))
    np.testing.assert_allclose(res.results["score"], (emb @ q)[order], atol=1e-5)
