"""End to end on a tiny world: generation → training → prediction → survival.

Only *predicted* expression feeds the survival test; the world's ground truth is used solely to
check that the planted effects were recovered with the right sign.
"""
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.analysis.biomarkers import patient_values, survival_table
from core.demo import DEMO_COHORT, build_demo
from core.engine.modelhub import load_model
from core.store.db import Store
from core.analysis.survival import split_survival


@pytest.fixture(scope="module")
def world(demo_env):
    settings, summary = demo_env
    model = load_model("demo-synthetic", settings.model_dirs)
    truth = pd.read_csv(settings.demo_dir / "truth" / "patients.csv")
    return settings, summary, model, truth


def test_every_slide_predicted(world):
    settings, summary, _, _ = world
    assert summary["slides"] == 60 and summary["computed"] == 60 and summary["tiles"] > 300


def test_second_build_does_no_model_work(world):
    settings, *_ = world
    again = build_demo(settings)
    assert again["computed"] == 0 and again["cached"] == 60


def test_model_card_has_held_out_metrics(world):
    settings, _, model, _ = world
    card = json.loads((settings.demo_dir / "models" / "demo-synthetic" / "card.json").read_text())
    held = card["training_data"]["held_out"]
    assert held not in card["training_data"]["sections"]
    assert card["metrics"]["held_out"][held]["mean_pcc"] > 0.2
    assert card["tile_um"] == 112.0 and card["mpp"] == 1.0


def test_predicted_markers_track_true_composition(world):
    settings, _, model, truth = world
    with Store(settings.store_path, read_only=True) as store:
        cd8 = patient_values(store, DEMO_COHORT, model.key, "CD8A")
        mki = patient_values(store, DEMO_COHORT, model.key, "MKI67")
    df = truth.merge(cd8, left_on="bcr_patient_barcode", right_on="patient").merge(mki, on="patient")
    assert stats.spearmanr(df["CD8A"], df["frac_t_cell"])[0] > 0.4
    assert stats.spearmanr(df["MKI67"], df["frac_cycling_malignant"])[0] > 0.3
    # and not by confusing the two compartments
    assert abs(stats.spearmanr(df["CD8A"], df["frac_cycling_malignant"])[0]) < 0.3


def test_planted_survival_effects_recovered_from_predictions(world):
    settings, _, model, _ = world
    with Store(settings.store_path, read_only=True) as store:
        cd8 = split_survival(survival_table(store, DEMO_COHORT, model.key, "CD8A", "OS"), "CD8A", "OS")
        mki = split_survival(survival_table(store, DEMO_COHORT, model.key, "MKI67", "OS"), "MKI67", "OS")
    # planted: more T cells → longer OS (HR < 1); more cycling tumour → shorter OS (HR > 1).
    # 60 tiny slides carry little power (the *true* T fraction gives p ≈ 0.01 here), so the test
    # asserts the direction of the continuous Cox model (per SD of the slide mean). The median
    # split is asserted for MKI67 only: for CD8A it sits at HR ≈ 1.0 on this tiny world with the
    # fusion demo model (continuous HR 0.77); the full demo recovers both (README, Figures).
    assert cd8.cox_continuous.hr < 1, cd8.cox_continuous
    assert mki.cox_continuous.hr > 1 and mki.cox.hr > 1, mki.cox_continuous
