"""The evaluation harness itself: the metric, the absence of leakage, and the card against its JSON.

``per_gene_pearson`` is checked against ``scipy.stats.pearsonr`` (an independent implementation).
The leakage tests run the real fold functions on small synthetic sections (random features, no
encoder): replacing the held-out section's targets with noise must not change any prediction, and
no fit may ever receive a held-out row.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from core.training.loso import Prepared, fusion_fit, fusion_predict, ridge_predict, run_loso
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


def sections(n_sections=3, n=40, genes=5, seed=0) -> list[Prepared]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, genes))
    out = []
    for i in range(n_sections):
        pooled = rng.normal(size=(n, 16)).astype(np.float32)
        tokens = np.repeat(pooled[:, None, :], 4, axis=1).astype(np.float16)
        y = (pooled @ w + rng.normal(scale=0.5, size=(n, genes))).astype(np.float32)
        out.append(Prepared(f"S{i}", pooled, tokens, y))
    return out


def _with_noise_targets(test: Prepared, seed: int) -> Prepared:
    y = np.random.default_rng(seed).normal(size=test.y.shape).astype(np.float32)
    return Prepared(test.name, test.pooled, test.tokens, y)


def test_held_out_targets_do_not_change_any_prediction():
    parts = sections()
    train, test = parts[:2], parts[2]
    profiles = np.abs(np.random.default_rng(3).normal(size=(2, test.y.shape[1]))).astype(np.float32)
    noisy = _with_noise_targets(test, 9)
    ridge_a, alpha_a = ridge_predict(train, test)
    ridge_b, alpha_b = ridge_predict(train, noisy)
    np.testing.assert_array_equal(ridge_a, ridge_b)
    assert alpha_a == alpha_b
    head_a = fusion_fit(train, profiles, epochs=2, seed=0)
    head_b = fusion_fit(train, profiles, epochs=2, seed=0)
    np.testing.assert_allclose(fusion_predict(head_a, test)[0], fusion_predict(head_b, noisy)[0], atol=0)


def test_no_fit_sees_a_held_out_row(monkeypatch):
    """A spy on every fit (sklearn pipelines, the fusion trainer): the held-out section's targets
    carry a sentinel value, which must never reach a fit while that section is held out."""
    import sklearn.pipeline

    import models.train as train_mod

    parts = sections()
    held = {"name": None}
    seen = []

    def check(y) -> None:
        arr = np.asarray(y.detach().numpy() if hasattr(y, "detach") else y)
        seen.append(arr.shape)
        assert not np.any(arr == SENTINEL), f"a fit received rows of the held-out section {held['name']}"

    real_pipe_fit, real_fusion = sklearn.pipeline.Pipeline.fit, train_mod.fit_fusion

    def pipe_fit(self, x, y=None, **kw):
        check(y)
        return real_pipe_fit(self, x, y, **kw)

    def fusion(head, x, y, **kw):
        check(y)
        return real_fusion(head, x, y, **kw)

    monkeypatch.setattr(sklearn.pipeline.Pipeline, "fit", pipe_fit)
    monkeypatch.setattr(train_mod, "fit_fusion", fusion)
    profiles = np.abs(np.random.default_rng(3).normal(size=(2, parts[0].y.shape[1]))).astype(np.float32)
    for i, test in enumerate(parts):
        marked = Prepared(test.name, test.pooled, test.tokens, np.full_like(test.y, SENTINEL))
        fold = parts[:i] + [marked] + parts[i + 1:]
        held["name"] = test.name
        train = [p for p in fold if p is not marked]
        ridge_predict(train, marked)
        fusion_fit(train, profiles, epochs=1, seed=0)
    assert len(seen) >= 6      # every fold's inner ridge fits and the fusion fit were watched


def test_run_loso_reports_every_fold():
    parts = sections()
    profiles = np.abs(np.random.default_rng(3).normal(size=(2, parts[0].y.shape[1]))).astype(np.float32)
    report = run_loso(parts, profiles, [f"g{i}" for i in range(5)], reference_types=["a", "b"],
                      methods=["ridge", "prior", "full"], epochs=2)
    assert set(report["folds"]) == {"S0", "S1", "S2"}
    for m in ("ridge", "prior", "full"):
        assert report["table"][m]["mean_pcc"] == pytest.approx(
            np.mean([report["folds"][s][m]["mean_pcc"] for s in report["folds"]]))
    assert report["table"]["ridge"]["mean_pcc"] > 0.5      # the features carry the targets


def test_shipped_card_table_equals_its_loso_json():
    folder = ROOT / "models" / "weights" / "breast-her2st"
    card = json.loads((folder / "card.json").read_text())
    loso = json.loads((folder / "loso.json").read_text())
    assert card["metrics"]["loso"] == loso["table"]
    assert set(card["metrics"]["loso_folds"]) == set(loso["folds"])
    for section, methods in loso["folds"].items():
        for method, metrics in methods.items():
            for key in ("mean_pcc", "median_pcc", "top50_pcc"):
                assert card["metrics"]["loso_folds"][section][method][key] == pytest.approx(metrics[key])
