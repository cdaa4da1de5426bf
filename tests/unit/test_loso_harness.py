"""The evaluation harness itself: the metric, the absence of leakage, and the card against its JSON.

``per_gene_pearson`` is checked against ``scipy.stats.pearsonr`` (an independent implementation).
The leakage tests run the real fold functions on small synthetic sections (random features, no
encoder) with every kind of method in the table (ridge on several feature sets, ridge + prior,
the fusion model with and without view augmentation, the prior alone): replacing the held-out
sections' targets with noise must not change any prediction, and no fit may ever receive a
held-out row. The closed-form ridge path is checked against scikit-learn's pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from core.training import loso
from core.training.loso import (Prepared, folds_for, fusion_fit, fusion_predict, hvg_indices, inner_folds,
                                 ridge_predict, run_loso, wilcoxon_vs)
from models.evaluate import per_gene_pearson

ROOT = Path(__file__).resolve().parents[2]
SENTINEL = 987654.0


def test_per_gene_pearson_equals_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    true[:, 1] += 2 * pred[:, 1]
    r = per_gene_pearson(pred, true)
    for g in range(6):
        assert r[g] == pytest.approx(stats.pearsonr(pred[:, g], true[:, g])[0], abs=1e-12)


def test_constant_columns():
    """A constant *prediction* of a gene that varies is scored r = 0 (it predicts nothing), not
    dropped; a gene whose *measured* values are constant cannot be scored (NaN, left out of means)."""
    rng = np.random.default_rng(1)
    pred, true = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    pred[:, 0] = 4.2
    true[:, 1] = 0.0
    r = per_gene_pearson(pred, true)
    assert r[0] == 0.0 and np.isnan(r[1])
    assert r[2] == pytest.approx(stats.pearsonr(pred[:, 2], true[:, 2])[0], abs=1e-12)


def sections(n_sections=3, n=40, genes=5, seed=0, patients=None) -> list[Prepared]:
    """Sections with a linear signal; ``views`` carry 8 'dihedral' and 4 'stain' copies of the
    features (noisy), a context block and the other encoders' features, so every method runs."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, genes))
    out = []
    for i in range(n_sections):
        pooled = rng.normal(size=(n, 16)).astype(np.float32)
        tokens = np.repeat(pooled[:, None, :], 4, axis=1).astype(np.float16)
        y = (pooled @ w + rng.normal(scale=0.5, size=(n, genes))).astype(np.float32)
        xy = np.stack(np.meshgrid(np.arange(8), np.arange(n // 8)), -1).reshape(-1, 2)[:n] * 290.0
        views = {}
        for key, v in (("efficientnet_lite0/dihedral", 8), ("efficientnet_lite0/stain", 4),
                       ("efficientnet_lite0/context", 1), ("efficientnet_lite1/base", 1), ("efficientnet_lite2/base", 1)):
            pv = (pooled[None] + rng.normal(scale=0.1, size=(v, n, 16))).astype(np.float32)
            views[key] = {"pooled": pv, "tokens": np.repeat(pv[:, :, None, :], 4, axis=2).astype(np.float16)}
        out.append(Prepared(f"S{i}", pooled, tokens, y, patient=(patients or {}).get(f"S{i}"), xy=xy, views=views))
    return out


def _with_targets(p: Prepared, y: np.ndarray) -> Prepared:
    from dataclasses import replace

    return replace(p, y=y.astype(np.float32))


def _profiles(parts):
    return np.abs(np.random.default_rng(3).normal(size=(2, parts[0].y.shape[1]))).astype(np.float32)


ALL_FAST = ["ridge", "ridge_d8", "ridge_lite1", "ridge_ens", "ridge_ctx", "ridge_nbr", "ridge_lite2_nbr", "ridge_prior", "prior", "full_lite2",
            "full", "full_aug"]


def test_pca_ridge_path_equals_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(4)
    x, y, xe = rng.normal(size=(60, 20)), rng.normal(size=(60, 3)), rng.normal(size=(15, 20))
    ours = loso._pca_ridge_path(x, y, xe, [10.0, 1000.0], n_pca=8)
    for a, pred in zip([10.0, 1000.0], ours):
        ref = make_pipeline(StandardScaler(), PCA(n_components=8, svd_solver="full"), Ridge(alpha=a)).fit(x, y).predict(xe)
        np.testing.assert_allclose(pred, ref, atol=1e-4)


def test_held_out_targets_do_not_change_any_prediction():
    """Every method, one fold: the held-out section's targets replaced by noise (and its HVG
    choice, made on training spots only, unchanged)."""
    parts = sections()
    train, test = parts[:2], parts[2]
    noisy = _with_targets(test, np.random.default_rng(9).normal(size=test.y.shape))
    a = loso._predict_fold(train, [test], ALL_FAST, _profiles(parts), 0, epochs=2, cnn_epochs=1,
                           encoder="efficientnet_lite0", nuclei={}, timing={})
    b = loso._predict_fold(train, [noisy], ALL_FAST, _profiles(parts), 0, epochs=2, cnn_epochs=1,
                           encoder="efficientnet_lite0", nuclei={}, timing={})
    for m in ALL_FAST:
        np.testing.assert_allclose(a[m][0][0], b[m][0][0], atol=0, err_msg=m)
        assert a[m][1].get("alpha") == b[m][1].get("alpha"), m
    boosted = [_with_targets(p, p.y * np.array([1, 1, 1, 5, 1])) for p in train]   # gene 3 most variable in training
    assert hvg_indices(boosted, k=1).tolist() == [3]
    ridge_a, alpha_a = ridge_predict(train, test)
    assert ridge_a.shape == test.y.shape and alpha_a in loso.ALPHAS


def test_no_fit_sees_a_held_out_row(monkeypatch):
    """A spy on every fit (the ridge path, the fusion trainer): the held-out sections' targets
    carry a sentinel value, which must never reach a fit while they are held out, in either fold
    scheme."""
    import models.train as train_mod

    seen = []

    def check(y) -> None:
        arr = np.asarray(y.detach().numpy() if hasattr(y, "detach") else y)
        seen.append(arr.shape)
        assert not np.any(arr == SENTINEL), "a fit received held-out rows"

    real_path, real_fusion = loso._pca_ridge_path, train_mod.fit_fusion
    monkeypatch.setattr(loso, "_pca_ridge_path", lambda x, y, *a, **k: (check(y), real_path(x, y, *a, **k))[1])
    monkeypatch.setattr(train_mod, "fit_fusion", lambda head, x, y, **k: (check(y), real_fusion(head, x, y, **k))[1])
    parts = sections(4, patients={"S0": "P", "S1": "P", "S2": "Q", "S3": "R"})
    for scheme in ("patient", "section"):
        for fold, (train, tests) in folds_for(parts, scheme).items():
            marked = [_with_targets(t, np.full_like(t.y, SENTINEL)) for t in tests]
            loso._predict_fold(train, marked, ALL_FAST, _profiles(parts), 0, epochs=1, cnn_epochs=1,
                               encoder="efficientnet_lite0", nuclei={}, timing={})
    assert len(seen) >= 30      # inner ridge fits, final fits and fusion fits were all watched


def test_patient_folds_never_split_a_patient():
    parts = sections(4, patients={"S0": "P", "S1": "P", "S2": "Q", "S3": "R"})
    folds = folds_for(parts, "patient")
    assert set(folds) == {"P", "Q", "R"}
    train, tests = folds["P"]
    assert [t.name for t in tests] == ["S0", "S1"] and [t.name for t in train] == ["S2", "S3"]
    for train, tests in folds.values():
        assert not {t.patient for t in tests} & {p.patient for p in train}
    assert len(folds_for(parts, "section")) == 4


def test_inner_folds_stay_inside_training():
    parts = sections(3)
    folds = inner_folds(parts[:2])           # two sections → leave one section out
    assert [len(v) for _, v in folds] == [40, 40] and set(folds[1][1]) == set(range(40, 80))
    stripes = inner_folds(parts[:1])          # one section → spatial stripes by x
    assert len(stripes) == 4 and sorted(np.concatenate([v for _, v in stripes]).tolist()) == list(range(40))
    xs = [parts[0].xy[v, 0] for _, v in stripes]
    assert all(a.max() <= b.min() for a, b in zip(xs, xs[1:]))


def test_wilcoxon_vs_scipy_and_hand():
    """Paired per-gene test: the same p as scipy's wilcoxon on the differences; a hand case: all
    10 differences positive and distinct → exact two-sided p = 2/2¹⁰ = 0.001953 (Wilcoxon 1945)."""
    ref = np.zeros(10)
    out = wilcoxon_vs(np.arange(1, 11) / 100.0, ref)
    assert out["n_better"] == 10 and out["p"] == pytest.approx(2 / 2 ** 10)
    assert out["median_diff"] == pytest.approx(0.055)
    nan = np.array([0.1, np.nan, 0.3])
    assert wilcoxon_vs(nan, np.zeros(3))["n_genes"] == 2


def test_run_loso_report_shape_and_statistics():
    parts = sections(4, patients={"S0": "P", "S1": "P", "S2": "Q", "S3": "Q"})
    genes = [f"g{i}" for i in range(5)]
    report = run_loso(parts, _profiles(parts), genes, reference_types=["a", "b"],
                      methods=["ridge", "prior", "full"], epochs=2, n_seeds=3, n_boot=50,
                      gene_sets={"some": ["g0", "g1", "nope"]})
    assert report["format"] == "tessera-loso/2" and report["headline"] == "patient"
    assert list(report["schemes"]) == ["patient", "section"]
    pt = report["schemes"]["patient"]
    assert set(pt["folds"]) == {"P", "Q"} and pt["folds"]["P"]["test_sections"] == ["S0", "S1"]
    for m in ("ridge", "prior", "full"):
        row = pt["table"][m]
        folds = [pt["folds"][f]["methods"][m] for f in pt["folds"]]
        assert row["mean_pcc"] == pytest.approx(np.mean([f["mean_pcc"] for f in folds]))
        assert row["seeds"] == (1 if m == "ridge" else 3)
        assert row["ci95"][0] <= row["ci95"][1]
        for f in folds:     # a fold = the mean of its test sections
            assert f["mean_pcc"] == pytest.approx(np.mean(list(f["per_section"].values())), abs=1e-6)
            assert set(f["per_gene"]) == set(genes) and f["some_pcc"] is not None
    assert pt["table"]["full"]["sd"] >= 0 and pt["table"]["ridge"]["sd"] == 0
    assert pt["table"]["ridge"]["vs_ridge"]["median_diff"] == 0
    assert pt["table"]["ridge"]["mean_pcc"] > 0.5        # the features carry the targets
    lo, hi = pt["table"]["ridge"]["ci95"]
    assert lo < pt["table"]["ridge"]["mean_pcc"] < hi + 0.02
    assert report["gene_sets"] == {"panel": 5, "hvg50": 50, "some": 2}
    assert all(isinstance(a, float) for a in pt["table"]["ridge"]["alpha"])
    assert "| full |" in loso.format_table(report) and "per patient" in loso.format_table(report)
    json.dumps(report)      # JSON-ready


def test_one_patient_has_no_patient_scheme():
    parts = sections(3)
    for p in parts:
        p.patient = "only"
    report = run_loso(parts, None, [f"g{i}" for i in range(5)], methods=["ridge", "full"], n_seeds=1, n_boot=10)
    assert list(report["schemes"]) == ["section"] and report["headline"] == "section"
    assert any("one patient" in n for n in report["notes"]) and any("full" in n for n in report["notes"])


def test_patient_rule():
    assert loso.patient_of("C2") == "C" and loso.patient_of("B4") == "B"
    assert loso.patient_of("SYN-A1") == "SYN-A1" and loso.patient_of("C2", {"C2": "X"}) == "X"
    assert loso.parse_groups("B4=B, C2=C") == {"B4": "B", "C2": "C"}
    with pytest.raises(ValueError):
        loso.parse_groups("B4:B")


def test_shipped_card_table_equals_its_loso_json():
    folder = ROOT / "models" / "weights" / "breast-her2st"
    card = json.loads((folder / "card.json").read_text())
    report = json.loads((folder / "loso.json").read_text())
    assert card["metrics"]["loso_format"] == report["format"]
    for scheme, data in report["schemes"].items():
        assert card["metrics"]["loso"][scheme] == data["table"]
        for fold, f in data["folds"].items():
            for method, metrics in f["methods"].items():
                mine = card["metrics"]["loso_folds"][scheme][fold][method]
                for key in ("mean_pcc", "sd", "ci95", "median_pcc", "hvg50_pcc"):
                    assert mine[key] == pytest.approx(metrics[key])
    assert card["metrics"]["shipped_row"] in report["schemes"][report["headline"]]["table"]


def test_ridge_linear_is_the_path_and_ships_as_a_probe_head():
    """The collapsed affine map predicts what the PCA → ridge path predicts; a ProbeFusionHead
    carrying it returns that expression for tokens whose mean is the pooled feature."""
    import torch

    from models.fusion import FusionConfig, ProbeFusionHead

    rng = np.random.default_rng(5)
    x, y, xe = rng.normal(size=(50, 12)), rng.normal(size=(50, 4)), rng.normal(size=(9, 12))
    w, b = loso.ridge_linear(x, y, 100.0, n_pca=6)
    np.testing.assert_allclose(xe @ w + b, loso._pca_ridge_path(x, y, xe, [100.0], n_pca=6)[0], atol=1e-4)
    head = ProbeFusionHead(FusionConfig(in_dim=12, n_tokens=3, n_genes=4, n_types=2),
                           torch.from_numpy(np.abs(rng.normal(size=(2, 4))).astype(np.float32))).eval()
    with torch.no_grad():
        head.probe.weight.copy_(torch.from_numpy(w.T))
        head.probe.bias.copy_(torch.from_numpy(b))
        tokens = torch.from_numpy(np.repeat(xe[:, None, :], 3, axis=1).astype(np.float32))
        out = head(tokens)
    np.testing.assert_allclose(out["expression"].numpy(), xe @ w + b, atol=1e-4)
    assert set(out) == {"expression", "composition", "prior", "embedding"}
