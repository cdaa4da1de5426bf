"""The shipped breast model (models/weights/breast-her2st) through the normal prediction path on a
real Aperio SVS, and its card."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.config import REPO_ROOT
from core.cohort.importer import import_cohort
from core.engine.modelhub import load_model
from core.engine.predict import predict_cohort
from core.store.db import Store

WEIGHTS = REPO_ROOT / "models" / "weights"


def test_card_documents_panel_tiling_and_loso():
    """The shipped model is the held-out table's best engine-runnable row on new patients."""
    from core.training.loso import best_row

    card = json.loads((WEIGHTS / "breast-her2st" / "card.json").read_text())
    report = json.loads((WEIGHTS / "breast-her2st" / "loso.json").read_text())
    assert len(card["genes"]) == 253 and {"ERBB2", "ESR1", "CD8A", "MKI67"} <= set(card["genes"])
    assert card["tile_um"] == 112.0 and card["input_px"] == round(card["tile_um"] / card["mpp"])
    assert card["training_data"]["sections"] == ["B4", "C2", "C3", "C4", "C5"]
    assert card["metrics"]["loso_headline"] == "patient"
    assert {"ridge", "prior", "full"} <= set(card["metrics"]["loso"]["patient"])
    assert card["metrics"]["shipped_row"] == best_row(report)


def test_breast_model_predicts_a_real_svs(shared_data, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(shared_data / "wsi" / "CMU-1-Small-Region.svs", slides / "TCGA-A2-A0T2-01Z-00-DX1.svs")
    model = load_model("breast-her2st", [WEIGHTS])
    with Store(tmp_path / "s.duckdb") as store:
        import_cohort(store, "cmu", slides, shared_data / "clinical" / "TCGA-CDR_BRCA.csv", tiling=model.tiling())
        [result] = predict_cohort(store, "cmu", model, device="cpu", workers=0)
        heat = store.heatmap(model.key, result.run_key, "ERBB2")
        runs = store.cohort_runs("cmu", model.key)
    assert result.status == "computed" and result.n_tiles == 57  # 112 µm tiles at 0.499 µm/px
    assert np.isfinite(heat["value"]).all() and heat["value"].std() > 0
    assert runs["run_key"].notna().all()
