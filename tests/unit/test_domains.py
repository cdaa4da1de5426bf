"""Cohort spatial domains (core.analysis.domains / domain_fit, core.store.domain_tables, CLI).

Planted data: slides whose tiles belong to known regions (bands, rings) with region-specific gene
means and heavy noise; recovery is scored with sklearn.metrics.adjusted_rand_score against the
planted truth. Store tests run on copies of the session demo store (``demo_env`` itself is never
written to); markers are checked against an independent scanpy.tl.rank_genes_groups call.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from core.analysis import domains as D
from core.analysis.domain_fit import SlideData, allocate, assign, cell_type_group, domain_name, fit_slides, neighbour_mean
from core.errors import AnalysisError
from core.store.db import Store

TYPES = ["malignant_epithelial", "t_cell", "fibroblast", "endothelial"]
GENES = [f"G{i}" for i in range(40)]


def planted(n_slides: int = 3, side: int = 24, noise: float = 2.5, seed: int = 0):
    """Three domains with 5 marker genes each (+1.5 over a shared profile), N(0, noise) per tile; slide
    0 in vertical bands, 1 horizontal bands, 2 rings. Returns (slides, truth per slide)."""
    rng = np.random.default_rng(seed)
    k = 3
    mu = rng.normal(2.0, 0.3, size=(k, len(GENES)))
    for d in range(k):
        mu[d, d * 5:(d + 1) * 5] += 1.5
    comp_mu = np.array([[.7, .1, .15, .05], [.3, .5, .15, .05], [.1, .05, .6, .25]])
    yy, xx = np.divmod(np.arange(side * side), side)
    slides, truth = [], []
    for s in range(n_slides):
        if s % 3 == 0:
            t = np.minimum(xx * k // side, k - 1)
        elif s % 3 == 1:
            t = np.minimum(yy * k // side, k - 1)
        else:
            t = np.minimum((np.hypot(xx - side / 2, yy - side / 2) / (side * 0.72) * k).astype(int), k - 1)
        x = (mu[t] + rng.normal(0, noise, size=(len(t), len(GENES)))).astype(np.float32)
        comp = np.array([rng.dirichlet(comp_mu[d] * 30) for d in t])
        slides.append(SlideData(f"run{s}", np.stack([xx, yy], axis=1) * 100, 100, x, comp))
        truth.append(t)
    return slides, truth


@pytest.fixture(autouse=True)
def _one_thread():
    """BLAS/OpenMP on one thread: on a shared 2-core machine the spinning threads of k-means and the
    PCA made these tiny fits 20× slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def labels_of(fit, slides):
    return np.concatenate([assign(fit, s.expression, s.xy, s.tile_size) for s in slides])


# ---------------------------------------------------------------- the maths, on planted data

@pytest.mark.parametrize("method", ["leiden", "kmeans"])
def test_planted_domains_recovered(method):
    """ARI vs the planted truth (sklearn adjusted_rand_score) ≥ 0.85 with BANKSY's λ = 0.8; without
    the neighbourhood term (λ = 0) the noise hides the domains (ARI well below)."""
    slides, truth = planted()
    fit = fit_slides(slides, genes=GENES, cell_types=TYPES, method=method, n_domains=3, spatial_weight=0.8)
    assert fit.method == method and len(fit.labels) == 3
    spatial = adjusted_rand_score(np.concatenate(truth), labels_of(fit, slides))
    plain = fit_slides(slides, genes=GENES, cell_types=TYPES, method=method, n_domains=3, spatial_weight=0.0)
    alone = adjusted_rand_score(np.concatenate(truth), labels_of(plain, slides))
    assert spatial >= 0.85 and alone < spatial - 0.2, (spatial, alone)
    # the planted composition names the domains: tumour 0.7, immune 0.5 + tumour 0.3, stroma 0.6 + vascular 0.25
    assert sorted(n.split(" ", 1)[1] for n in fit.domains["name"]) == ["immune–tumour", "stroma–vascular", "tumour"]
    assert fit.domains["share"].sum() == pytest.approx(1.0) and list(fit.domains["domain"]) == ["D1", "D2", "D3"]


def test_same_features_same_label_on_another_slide():
    """A slide moved elsewhere on the grid, and a 3×3 patch copied into another slide: the copied
    tiles (same expression, same neighbourhood) get the same labels."""
    slides, _ = planted()
    fit = fit_slides(slides, genes=GENES, method="kmeans", n_domains=3)
    a = slides[0]
    moved = assign(fit, a.expression, a.xy + np.array([5000, 700]), a.tile_size)
    assert (moved == assign(fit, a.expression, a.xy, a.tile_size)).all()
    b = slides[1]
    cell = a.xy // 100
    src = np.nonzero((np.abs(cell[:, 0] - 4) <= 1) & (np.abs(cell[:, 1] - 10) <= 1))[0]   # patch around (4, 10)
    dst = np.nonzero((np.abs(cell[:, 0] - 15) <= 1) & (np.abs(cell[:, 1] - 3) <= 1))[0]   # same layout in b
    expr = b.expression.copy()
    expr[dst] = a.expression[src]
    centre_a = src[4]
    centre_b = dst[4]
    assert assign(fit, expr, b.xy, 100)[centre_b] == assign(fit, a.expression, a.xy, 100)[centre_a]


def test_fit_is_deterministic():
    slides, _ = planted(n_slides=2, side=16)
    one = fit_slides(slides, genes=GENES, method="leiden", seed=3, n_sample=300)
    two = fit_slides(slides[::-1], genes=GENES, method="leiden", seed=3, n_sample=300)
    assert one.labels == two.labels and np.array_equal(one.centroids, two.centroids)
    assert one.sample.equals(two.sample) and len(one.sample) == 300
    assert (labels_of(one, slides) == labels_of(two, slides)).all()


def test_allocate_and_neighbour_mean_by_hand():
    """Largest remainder: [10, 30, 60] of 10 → [1, 3, 6]; [5, 5, 5] of 10 → quotas 3.33 → [4, 3, 3].
    A 1×3 row [1, 2, 4] → neighbour means [2, 2.5, 2]; an isolated tile keeps its own value."""
    assert allocate([10, 30, 60], 10).tolist() == [1, 3, 6]
    assert allocate([5, 5, 5], 10).tolist() == [4, 3, 3]
    assert allocate([5, 5], 100).tolist() == [5, 5]
    xy = np.array([[0, 0], [100, 0], [200, 0], [900, 900]])
    out = neighbour_mean(np.array([[1.0], [2.0], [4.0], [7.0]]), xy, 100)
    assert out[:, 0].tolist() == [2.0, 2.5, 2.0, 7.0]


def test_names_from_cell_type_groups():
    """Groups summed: tumour 0.5, immune 0.2 + 0.1, stroma 0.2 → the two groups ≥ 0.20 (largest first,
    at most two); nothing ≥ 0.20 → the largest group alone."""
    assert [cell_type_group(t) for t in ["malignant_epithelial", "cycling_malignant", "normal_epithelial", "b_plasma",
                                         "T cells", "endothelial", "Weird type"]] == [
        "tumour", "tumour", "epithelial", "immune", "immune", "vascular", "weird type"]
    comp = pd.Series({"malignant_epithelial": .5, "t_cell": .2, "b_plasma": .1, "fibroblast": .2})
    assert domain_name("D3", comp) == "D3 tumour–immune"
    flat = pd.Series({f"type{i}": 0.1 for i in range(9)} | {"fibroblast": 0.1})
    assert domain_name("D1", flat) == "D1 stroma"         # all 0.1: the largest, ties by name
    assert domain_name("D2", None) == "D2"


@pytest.mark.parametrize("kw,match", [({"spatial_weight": 1.5}, "between 0 and 1"), ({"n_domains": 1}, "at least 2"),
                                      ({"method": "dbscan"}, "Unknown domain method"), ({"resolution": 0}, "positive")])
def test_bad_options_are_named(kw, match):
    slides, _ = planted(n_slides=1, side=8)
    with pytest.raises(AnalysisError, match=match):
        fit_slides(slides, genes=GENES, **kw)


# ---------------------------------------------------------------- the demo store (copies)

@pytest.fixture(scope="module")
def fitted(demo_env, tmp_path_factory):
    """A copy of the demo store (620 tiles on 60 slides) with a Leiden fit on a 200-tile sample."""
    settings, _ = demo_env
    path = tmp_path_factory.mktemp("domains") / "store.duckdb"
    shutil.copy(settings.store_path, path)
    from threadpoolctl import threadpool_limits

    with Store(path) as store, threadpool_limits(limits=1):
        key = store.models()["model_key"].iloc[-1]
        fit = D.fit_domains(store, "demo", key, method="leiden", n_sample=200, seed=0)
    return path, key, fit


def test_no_fit_gives_none(demo_env):
    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        key = store.models()["model_key"].iloc[-1]
        run = D.predicted_runs(store, "demo", key)["run_key"].iloc[0]
        assert D.tile_domains(store, "demo", key, run) is None and D.load_fit(store, "demo", key) is None
        with pytest.raises(AnalysisError, match="no domain fit"):
            D.patient_fractions(store, "demo", key)
        with pytest.raises(AnalysisError, match="open for writing"):
            D.fit_domains(store, "demo", key)


def test_stored_fit_labels_every_slide_consistently(fitted):
    path, key, fit = fitted
    with Store(path, read_only=True) as store:
        loaded = D.load_fit(store, "demo", key)
        runs = D.predicted_runs(store, "demo", key)
        assert set(loaded.run_keys) == set(runs["run_key"]) and loaded.labels == fit.labels
        np.testing.assert_array_equal(loaded.centroids, fit.centroids)
        sample = store.domain_sample("demo", key)
        assert len(sample) == 200
        # the stored sample labels are what the on-demand rule gives those tiles
        for run_key, rows in sample.groupby("run_key"):
            got = D.slide_labels(store, loaded, run_key)
            assert len(got) == int(runs.set_index("run_key").loc[run_key, "n_tiles"])
            assert (got[rows["tile_idx"].to_numpy()] == rows["domain"].to_numpy()).all()


def test_slides_outside_the_sample_get_labels(demo_env, tmp_path):
    """40 tiles over 60 slides: at least 20 slides have no tile in the sample, and are labelled."""
    settings, _ = demo_env
    path = tmp_path / "small.duckdb"
    shutil.copy(settings.store_path, path)
    with Store(path) as store:
        key = store.models()["model_key"].iloc[-1]
        fit = D.fit_domains(store, "demo", key, method="kmeans", n_domains=3, n_sample=40)
        runs = D.predicted_runs(store, "demo", key)
        outside = sorted(set(runs["run_key"]) - set(fit.sample["run_key"]))
        assert len(outside) >= 20 and set(fit.run_keys) == set(runs["run_key"])
        for run_key in outside[:3]:
            labels = D.tile_domains(store, "demo", key, run_key)
            assert len(labels) == int(runs.set_index("run_key").loc[run_key, "n_tiles"])
            assert set(labels) <= set(fit.labels)


def test_a_slide_predicted_after_the_fit_gets_labels(fitted, tmp_path):
    """A run written after the fit (a copy of a fitted slide's predictions under a new key) is
    labelled without refitting, exactly like the slide it copies."""
    from core.analysis.spatial import slide_summary
    from core.store.db import RunRecord

    src, key, fit = fitted
    path = tmp_path / "later.duckdb"
    shutil.copy(src, path)
    with Store(path) as store:
        old = fit.run_keys[0]
        run = store.find_run(old)
        tiles, expr, genes = store.run_expression(key, old)
        _, emb, comp = store.tile_vectors([old])
        xy = tiles[["x", "y"]].to_numpy()
        record = RunRecord("later-run", "fp-later", key, run["tiling_key"], json.loads(run["tiling"]), "later.svs",
                           "/slides/later.svs", int(run["tile_size"]), int(run["width"]), int(run["height"]),
                           float(run["mpp"]), "cpu", 0.1)
        store.write_run(record, xy, tiles["tissue"].to_numpy(), expr, emb, comp,
                        summary=slide_summary(expr, xy, int(run["tile_size"]), genes))
        assert "later-run" not in D.load_fit(store, "demo", key).run_keys
        assert (D.tile_domains(store, "demo", key, "later-run") == D.tile_domains(store, "demo", key, old)).all()


def test_refit_replaces_and_is_deterministic(fitted, tmp_path):
    src, key, fit = fitted
    path = tmp_path / "refit.duckdb"
    shutil.copy(src, path)
    with Store(path) as store:
        again = D.fit_domains(store, "demo", key, method="leiden", n_sample=200, seed=0)
        # the same tiles and labels; the centroids equal to rounding (BLAS may sum in another order)
        assert again.sample.equals(fit.sample) and again.labels == fit.labels
        np.testing.assert_allclose(again.centroids, fit.centroids, rtol=1e-9, atol=1e-12)
        D.fit_domains(store, "demo", key, method="kmeans", n_domains=3, n_sample=100)
        assert store.con.execute("SELECT count(*) FROM domain_fits").fetchone()[0] == 1
        assert len(store.domain_sample("demo", key)) == 100 and D.load_fit(store, "demo", key).method == "kmeans"


def test_patient_fractions_sum_to_one_and_match_a_hand_count(fitted):
    path, key, fit = fitted
    with Store(path, read_only=True) as store:
        table = D.patient_fractions(store, "demo", key)
        runs = store.cohort_runs("demo", key).dropna(subset=["run_key"])
        assert len(table) == runs["patient"].nunique() and list(table.columns) == list(fit.labels)
        np.testing.assert_allclose(table.sum(axis=1), 1.0)
        row = runs.iloc[3]                      # one slide per demo patient: the hand count is that slide's
        labels = D.tile_domains(store, "demo", key, row["run_key"])
        hand = {d: (labels == d).sum() / len(labels) for d in fit.labels}
        assert table.loc[row["patient"]].to_dict() == pytest.approx(hand)


def test_patient_rule_by_hand_and_as_patient_matrix(demo_env):
    """P1: selected s1 wins over s2; P2: no selection → its diagnostic slide; P3: mean of its two
    slides. On the demo store the rule applied to the slide means equals patient_matrix."""
    from core.analysis.biomarkers import patient_matrix

    runs = pd.DataFrame({"run_key": ["s1", "s2", "d1", "t1", "u1", "u2"], "patient": ["P1", "P1", "P2", "P2", "P3", "P3"],
                         "slide_type": ["diagnostic", "diagnostic", "diagnostic_x", "tissue", "tissue", "tissue"],
                         "selected": [True, False, None, False, False, False]})
    values = pd.DataFrame({"v": [1.0, 9.0, 2.0, 7.0, 3.0, 5.0]}, index=["s1", "s2", "d1", "t1", "u1", "u2"])
    assert D.patient_rule(runs, values)["v"].to_dict() == {"P1": 1.0, "P2": 2.0, "P3": 4.0}
    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        key = store.models()["model_key"].iloc[-1]
        runs = store.cohort_runs("demo", key)
        means = store.slide_summary(key, ["CD8A"], list(runs["run_key"].dropna()))
        per_run = means.set_index("run_key")[["mean"]]
        expected = patient_matrix(store, "demo", key, ["CD8A"])["CD8A"]
        got = D.patient_rule(runs, per_run)["mean"]
        pd.testing.assert_series_equal(got.reindex(expected.index), expected, check_names=False, check_dtype=False)


def test_markers_are_scanpys_on_the_stored_sample(fitted):
    """Top genes per domain = scanpy.tl.rank_genes_groups(method='wilcoxon') run here on the stored
    sample's predicted expression grouped by its stored labels."""
    import anndata as ad
    import scanpy as sc

    path, key, fit = fitted
    with Store(path, read_only=True) as store:
        sample = store.domain_sample("demo", key)
        rows = []
        for run_key, part in sample.groupby("run_key", sort=False):
            _, expr, genes = store.run_expression(key, run_key)
            rows.append(expr[part["tile_idx"].to_numpy()])
        loaded = D.load_fit(store, "demo", key)
    adata = ad.AnnData(np.vstack(rows), var=pd.DataFrame(index=genes))
    adata.obs["g"] = pd.Categorical(sample["domain"].to_numpy(), categories=list(fit.labels))
    sc.tl.rank_genes_groups(adata, "g", method="wilcoxon", use_raw=False)
    names = adata.uns["rank_genes_groups"]["names"]
    for d in fit.labels:
        want = [str(g) for g in names[d][:3]]
        assert fit.domains.set_index("domain").loc[d, "markers"] == want
        assert loaded.domains.set_index("domain").loc[d, "markers"] == want
        assert loaded.markers[loaded.markers["domain"] == d]["gene"].tolist() == [str(g) for g in names[d][:10]]


def test_composition_and_shares_are_the_sample_means(fitted):
    path, key, fit = fitted
    with Store(path, read_only=True) as store:
        sample = store.domain_sample("demo", key)
        index, _, comp = store.tile_vectors(list(sample["run_key"].unique()))
        types = store.model_info(key).cell_types
    frame = pd.DataFrame(comp, columns=types).assign(run_key=index["run_key"], tile_idx=index["tile_idx"])
    merged = sample.merge(frame, on=["run_key", "tile_idx"])
    np.testing.assert_allclose(merged.groupby("domain")[types].mean().loc[list(fit.labels)], fit.composition,
                               rtol=1e-5)
    shares = sample["domain"].value_counts(normalize=True)
    np.testing.assert_allclose(fit.domains.set_index("domain")["share"], shares.loc[list(fit.labels)])


def test_domain_variable_in_cohort_analyses(fitted):
    from core.analysis.cohort_stats import associate_cohort, cohort_table, km_by
    from core.analysis.variables import parse_variable, variable_values

    path, key, fit = fitted
    name = fit.domains["name"].iloc[0]
    assert parse_variable(f"domain:{name}").source == "domain"
    with Store(path, read_only=True) as store:
        expected = D.patient_fractions(store, "demo", key)["D1"]
        by_name = variable_values(store, "demo", parse_variable(f"domain:{name.upper()}"), model_key=key)
        by_label = variable_values(store, "demo", parse_variable("domain:d1"), model_key=key)
        np.testing.assert_allclose(by_name.reindex(expected.index), expected)
        assert by_label.equals(by_name.rename(by_label.name)) and by_label.name == "d1 (domain fraction)"
        km = km_by(store, "demo", "OS", "domain:D1", model_key=key)
        assert km.to_json()["n"] > 20 and km.to_json()["variable"] == "domain:D1"
        assoc = associate_cohort(store, "demo", "domain:D1", "clinical:age_at_initial_pathologic_diagnosis",
                                 model_key=key).to_json()
        assert assoc["n"] == len(expected) and 0.0 <= assoc["p"] <= 1.0
        table = cohort_table(store, "demo", ["domain:D1"], model_key=key)
        assert "domain:D1" in table.columns
        with pytest.raises(AnalysisError, match="no domain 'D99'.*D1 = "):
            variable_values(store, "demo", parse_variable("domain:D99"), model_key=key)


def test_cli_fit_show_fractions(demo_env, tmp_path, capsys):
    from core.cli import main

    settings, _ = demo_env
    path = tmp_path / "cli.duckdb"
    shutil.copy(settings.store_path, path)
    base = ["--cohort", "demo", "--store", str(path)]
    assert main(["domains", "fit", *base, "--method", "kmeans", "--n-domains", "3", "--json", "-"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["method"] == "kmeans" and [d["domain"] for d in fit["domains"]] == ["D1", "D2", "D3"]
    assert fit["fitted_at"] and fit["n_slides"] == 60
    assert main(["domains", "show", *base, "--json", "-"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["domains"] == fit["domains"] and len(shown["composition"]) == 3
    assert main(["domains", "fractions", *base, "--json", "-"]) == 0
    fr = json.loads(capsys.readouterr().out)
    assert len(fr["rows"]) == 60 and all(abs(sum(r[d] for d in ("D1", "D2", "D3")) - 1) < 1e-9 for r in fr["rows"])
    # a busy store: the fit is computed, not saved, and the user is told why
    with Store(path, read_only=True):
        assert main(["domains", "fit", *base, "--method", "kmeans", "--wait", "0.2"]) == 2
    assert "NOT saved" in capsys.readouterr().err
    assert main(["domains", "show", "--cohort", "nope", "--store", str(path)]) == 2
