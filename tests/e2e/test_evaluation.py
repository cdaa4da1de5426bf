"""`evaluate` and the LOSO runner on the tiny world's synthetic sections (HEST-style layout)."""
import json

import numpy as np
import pytest

from core.cli import main as cli


@pytest.fixture(scope="module")
def world(demo_env):
    settings, _ = demo_env
    card = json.loads((settings.demo_dir / "models" / "demo-synthetic" / "card.json").read_text())
    return settings, card


def test_evaluate_cli_writes_the_documented_json(world, tmp_path, monkeypatch):
    settings, card = world
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--model", "demo-synthetic", "--st", str(settings.demo_dir / "st"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("demo-synthetic@") and report["genes"] == card["genes"]
    held = card["training_data"]["held_out"]
    assert set(report["sections"]) == {"SYN-A1", "SYN-B1", "SYN-C1", "SYN-D1"}
    sec = report["sections"][held]
    assert {"n_spots", "mean_pcc", "median_pcc", "top50_pcc", "per_gene"} <= set(sec)
    # the same spots and targets as at training time give the same held-out figure
    assert sec["mean_pcc"] == pytest.approx(card["metrics"]["held_out"][held]["mean_pcc"], abs=0.02)
    # sections the model was trained on score higher than the held-out one
    trained = [report["sections"][s]["mean_pcc"] for s in card["training_data"]["sections"]]
    assert min(trained) > sec["mean_pcc"] - 0.05


def test_loso_table_on_synthetic_sections(world, tmp_path):
    from core.training.loso import METHODS, format_table, prepare, run_loso
    from core.wsi.nuclei import CLASSES
    from core.wsi.nuclei_classes import SYNTH_MAPPING
    from core.training.stdata import find_sections
    from core.training.reference import read_reference, reference_profiles

    settings, card = world
    sections = find_sections(settings.demo_dir / "st")[:3]
    genes = card["genes"]
    reference = read_reference(settings.demo_dir / "reference" / "reference.h5ad")
    profiles, types = reference_profiles(reference, genes, card["cell_types"])
    shares = reference.obs["cell_type"].astype(str).value_counts(normalize=True).to_dict()
    prepared = prepare(sections, genes, encoder="efficientnet_lite0", tile_um=112, mpp=1.0, cache_dir=tmp_path)
    assert prepared[0].tokens.shape[1:] == (9, 1280)  # 112 px → a 3 × 3 feature map
    assert prepared[0].small.shape[1:] == (56, 56, 3) and prepared[0].nuclei.shape[1] == len(CLASSES)
    report = run_loso(prepared, profiles.to_numpy(), genes, reference_types=types, type_shares=shares,
                      nuclei_mapping=SYNTH_MAPPING, epochs=3, cnn_epochs=1, n_seeds=1, n_boot=20,
                      methods=["ridge", "ridge_nbr", "prior", "prior_nuclei", "full", "cnn"])
    # synthetic section names carry no patient: each section is its own patient
    assert set(report["schemes"]) == {"patient", "section"}
    table = report["schemes"]["section"]["table"]
    assert set(report["schemes"]["section"]["folds"]) == {s.name for s in sections}
    assert set(table) == {"ridge", "ridge_nbr", "prior", "prior_nuclei", "full", "cnn"} <= set(METHODS)
    assert all(np.isfinite(v["mean_pcc"]) for v in table.values())
    assert table["ridge"]["mean_pcc"] > 0.2  # frozen features carry the synthetic morphology
    # nuclei counted on the synthetic patches carry the planted composition: the training-free
    # nuclei prior already predicts expression (a broken count or mapping would give ~0)
    assert table["prior_nuclei"]["mean_pcc"] > 0.1
    assert "| prior_nuclei |" in format_table(report)
    # features are cached: a second prepare reads them back identically
    again = prepare(sections, genes, encoder="efficientnet_lite0", tile_um=112, mpp=1.0, cache_dir=tmp_path)
    np.testing.assert_array_equal(again[0].pooled, prepared[0].pooled)
