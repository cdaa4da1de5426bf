"""Cells evaluation commands (``cells evaluate-demo | train-typer | her2st``) and the spot
aggregate of :mod:`core.training.cell_spots`.

Golden values are hand computations:

- without refinement a cell's profile is its type's reference profile renormalised to CP10k
  (log1p), so a spot's aggregate is Σ_t (n_t / n) R_t over the types of its typed cells — the
  typed composition × reference, computed here directly from R;
- when a spot's prediction is exactly a non-negative mixture of the present types' linear
  profiles, NNLS recovers it, ρ = 1 and the refined aggregate equals the unrefined one;
- a spot with one cell and a prediction within the ρ clip: the cell takes the whole prediction,
  so its refined profile is the prediction renormalised to CP10k.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.training.cell_spots import _choose, _types_beside, spot_aggregates
from core.wsi.cells import CELL_FIELDS
from core.wsi.nuclei import CLASSES
from tests.cells_world import cells_store  # noqa: F401  (fixture)
from tests.conftest import SHARED

TYPES = ["Malignant", "T", "Fibroblast"]          # nucleus classes neoplastic, inflammatory, connective


def _record(nucleus_class: str) -> np.ndarray:
    rec = np.zeros(len(CELL_FIELDS), np.float32)
    rec[CELL_FIELDS.index(f"p_{nucleus_class}")] = 1.0
    return rec


def _profiles(seed: int = 0, genes: int = 6) -> np.ndarray:
    """Reference profiles R (types × genes) in log1p CP10k: each row's expm1 sums to 10⁴."""
    lin = np.random.default_rng(seed).uniform(1, 10, size=(len(TYPES), genes))
    return np.log1p(lin / lin.sum(axis=1, keepdims=True) * 1e4)


def test_unrefined_aggregate_is_the_typed_composition_mixture_and_nnls_exact_mixture():
    r = _profiles()
    p = np.expm1(r)
    records = [np.stack([_record("neoplastic"), _record("neoplastic"), _record("inflammatory")]),
               np.stack([_record("connective")]), np.zeros((0, len(CELL_FIELDS)), np.float32)]
    comp = np.full((3, len(TYPES)), 1 / 3)
    expr = np.log1p(np.stack([2.0 * p[0] + 0.5 * p[1], 0.7 * p[2], p[0]]))   # spot 0: an exact mixture of M and T
    agg = spot_aggregates(records, comp, expr, r, TYPES)
    assert list(agg["n_cells"]) == [3, 1, 0]
    assert list(agg["cell_type"]) == [0, 0, 1, 2]
    np.testing.assert_allclose(agg["plain"][0], (2 * r[0] + r[1]) / 3, rtol=1e-6)
    np.testing.assert_allclose(agg["plain"][1], r[2], rtol=1e-6)
    assert np.isnan(agg["plain"][2]).all() and np.isnan(agg["refined"][2]).all()
    np.testing.assert_allclose(agg["refined"][0], agg["plain"][0], rtol=1e-5)
    np.testing.assert_allclose(agg["refined"][1], agg["plain"][1], rtol=1e-5)
    assert agg["clipped"][0] == 0 and agg["clipped"][1] == 0 and np.isnan(agg["clipped"][2])


def test_one_cell_spot_refined_profile_is_the_renormalised_prediction():
    r = _profiles(1)
    target = np.expm1(r[2]) * np.array([0.5, 2.0, 1.0, 1.5, 0.8, 1.2])     # ρ within [¼, 4]
    off = np.expm1(r[2]) * np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])       # one gene absent: its ρ clipped at ¼
    expr = np.log1p(np.stack([target, off]))
    cell = np.stack([_record("connective")])
    agg = spot_aggregates([cell, cell], np.full((2, 3), 1 / 3), expr, r, TYPES)
    np.testing.assert_allclose(agg["refined"][0], np.log1p(target / target.sum() * 1e4), rtol=1e-3)
    assert not np.allclose(agg["refined"][0], agg["plain"][0])
    assert agg["clipped"][0] == 0 and agg["clipped"][1] == pytest.approx(1 / 6)


def test_spot_choice_and_types_file_beside_counts(tmp_path):
    assert list(_choose(5, None)) == [0, 1, 2, 3, 4] and list(_choose(5, 9)) == [0, 1, 2, 3, 4]
    assert list(_choose(101, 3)) == [0, 50, 100]
    counts = tmp_path / "ref_cells_counts.csv.gz"
    counts.write_bytes(b"")
    assert _types_beside(counts) is None
    (tmp_path / "ref_cells_types.csv").write_text("cell_id,cell_type\n")
    assert _types_beside(counts) == tmp_path / "ref_cells_types.csv"


def _cli(args, capsys):
    from core.cli import main

    code = main(["cells", *map(str, args)])
    return code, capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["evaluate-demo", "--demo-dir", "{tmp}"], "is not a demo world"),
    (["evaluate-demo", "--demo-dir", "{tmp}/nope"], "python -m core.cli demo"),
    (["train-typer", "--demo-dir", "{tmp}"], "is not a demo world"),
    (["her2st", "--st", "{tmp}/nope", "--reference", "{tmp}/ref.csv"], "ref.csv"),
])
def test_cli_bad_input_exit_2_one_line(args, message, tmp_path, capsys):
    code, out = _cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2 and message in out.err and "Traceback" not in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--max-spots", "--slides"])
def test_cli_refuses_non_positive_limits(flag, capsys):
    from core.cli import main

    cmd = ["her2st", "--st", "x", "--reference", "y"] if flag == "--max-spots" else ["evaluate-demo"]
    with pytest.raises(SystemExit) as stop:
        main(["cells", *cmd, flag, "0"])
    assert stop.value.code == 2 and "must be at least 1" in capsys.readouterr().err


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real test data not found at {SHARED}")


@needs_shared
def test_her2st_bad_reference_and_section_exit_2(capsys):
    st, ref = SHARED / "her2st", SHARED / "reference" / "xenium_breast_cells_counts.csv.gz"
    code, out = _cli(["her2st", "--st", st, "--reference", ref, "--sections", "B4", "Z9"], capsys)
    assert code == 2 and "no section Z9" in out.err and "Traceback" not in out.err
    code, out = _cli(["her2st", "--st", st, "--reference", ref, "--types", SHARED / "reference" / "nope.csv",
                      "--sections", "B4", "C2"], capsys)
    assert code == 2 and "nope.csv" in out.err and "Traceback" not in out.err


@needs_shared
def test_real_section_spot_cells_and_aggregate():
    """Five real HER2ST B4 spots: nuclei lie in the spot disc; the unrefined aggregate is the typed
    composition × the real Xenium reference profiles."""
    from core.training.reference import read_reference, reference_profiles
    from core.training.cell_spots import spot_cells
    from core.training.stdata import read_section
    from core.wsi.cells import CELL_MPP

    section = read_section(SHARED / "her2st" / "B4")
    keep = np.zeros(len(section), bool)
    keep[[40, 80, 120, 160, 200]] = True
    records = spot_cells(section, keep, tile_um=112.0)
    assert len(records) == 5 and all(len(r) > 0 for r in records)
    centre, radius = 112.0 / CELL_MPP / 2, section.spot_diameter_um / 2 / CELL_MPP
    assert all(np.hypot(r[:, 0] - centre, r[:, 1] - centre).max() <= radius for r in records)
    ref = read_reference(SHARED / "reference" / "xenium_breast_cells_counts.csv.gz",
                         SHARED / "reference" / "xenium_breast_cells_types.csv")
    genes = ["ERBB2", "ESR1", "CD3E", "KRT8", "PTPRC"]
    profiles, types = reference_profiles(ref, genes)
    r = profiles.to_numpy(np.float64)
    comp = np.full((5, len(types)), 1 / len(types))
    agg = spot_aggregates(records, comp, np.tile(r.mean(axis=0), (5, 1)), r, types)
    start = 0
    for i, n in enumerate(agg["n_cells"]):
        counts = np.bincount(agg["cell_type"][start:start + n], minlength=len(types))
        np.testing.assert_allclose(agg["plain"][i], counts @ r / n, rtol=1e-5)
        start += n
    assert np.isfinite(agg["refined"]).all()


def test_evaluate_demo_without_cells_runs_says_what_to_run(demo_env, capsys):
    settings, _ = demo_env
    code, out = _cli(["evaluate-demo", "--demo-dir", settings.demo_dir, "--store", settings.store_path], capsys)
    assert code == 2 and "predict --cohort demo --cells" in out.err and "Traceback" not in out.err


def test_evaluate_demo_table_on_cells_runs(demo_env, cells_store, capsys):  # noqa: F811
    settings, _ = demo_env
    code, out = _cli(["evaluate-demo", "--demo-dir", settings.demo_dir, "--store", cells_store, "--slides", 2,
                      "--json", "-"], capsys)
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert len(doc["slides"]) == 2 and doc["matched_cells"] > 0
    methods = [r["method"] for r in doc["rows"]]
    assert methods[0].startswith("(a)") and any(m.startswith("(b)") for m in methods)
    for row in doc["rows"]:
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and -1 <= row["per_cell_pcc"] <= 1
    assert "| method |" in out.err
