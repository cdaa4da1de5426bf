"""Cell-type-specific biomarkers (core.analysis.cell_biomarkers) and their variable names.

Golden values are hand computations on the tiny cell tables written in each test:

- means and fractions: arithmetic on the listed values;
- neighbourhood areas: one disc of radius d has area π d²; two discs whose centres are s apart
  (s < 2d) overlap in a lens of area 2 d² acos(s / 2d) − (s / 2) √(4d² − s²) (the circle–circle
  intersection formula), so their union is 2 π d² − lens;
- counts: Pythagoras on the listed coordinates.

On the tiny demo world predicted with cells (tests/cells_world.py) the cohort values are checked
against independent computations from the stored cells: fractions from ``Store.cell_type_counts``,
means from ``run_cells``' per-cell values, densities from brute-force all-pairs distances and a
brute-force raster of the same grid.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.analysis.cell_biomarkers import (CellMeasure, density_near, normalise, patient_means, resolve_type,
                                           slide_value, type_fraction, type_mean, union_area_um2)
from core.analysis.variables import parse_variable
from core.errors import AnalysisError
from tests.cells_world import cells_store  # noqa: F401  (fixture)

TYPES = ["malignant_epithelial", "cycling_malignant", "fibroblast", "t_cell"]
PANEL = ["ERBB2", "CD8A", "ACTB"]


def test_type_mean_and_fraction_by_hand():
    """types [A, A, B, A], values [1, 2, 10, 6]: mean in A = (1 + 2 + 6) / 3 = 3, in B = 10, in C none;
    fractions A 3/4, B 1/4, C 0; an empty slide has no fraction."""
    types = np.array(["A", "A", "B", "A"])
    values = np.array([1.0, 2.0, 10.0, 6.0])
    assert type_mean(types, values, "A") == 3.0
    assert type_mean(types, values, "B") == 10.0
    assert math.isnan(type_mean(types, values, "C"))
    assert type_fraction(types, "A") == 0.75 and type_fraction(types, "B") == 0.25 and type_fraction(types, "C") == 0
    assert math.isnan(type_fraction(np.array([], dtype=str), "A"))


def test_union_area_one_disc_and_two_overlapping():
    """d = 10: one disc π·100 = 314.159 µm²; centres 10 apart: lens = 200·acos(1/2) − 5·√300 =
    209.440 − 86.603 = 122.837, union 628.319 − 122.837 = 505.482 µm²; far apart: 628.319."""
    d = 10.0
    assert union_area_um2(np.array([[0.0, 0.0]]), d) == pytest.approx(math.pi * 100, rel=0.01)
    assert union_area_um2(np.array([[0.0, 0.0]]), d, raster_um=0.05) == pytest.approx(math.pi * 100, rel=1e-3)
    lens = 2 * d * d * math.acos(10 / (2 * d)) - 5 * math.sqrt(4 * d * d - 100)
    assert lens == pytest.approx(122.837, abs=1e-3)
    two = np.array([[0.0, 0.0], [10.0, 0.0]])
    assert union_area_um2(two, d) == pytest.approx(2 * math.pi * 100 - lens, rel=0.01)
    assert union_area_um2(two, d, raster_um=0.05) == pytest.approx(505.482, rel=1e-3)
    far = np.array([[0.0, 0.0], [1000.0, 37.0]])
    assert union_area_um2(far, d, raster_um=0.05) == pytest.approx(2 * math.pi * 100, rel=1e-3)
    # off the grid's anchor and in negative coordinates: the same area
    assert union_area_um2(two + [-333.3, 71.7], d, raster_um=0.05) == pytest.approx(505.482, rel=1e-3)
    assert union_area_um2(np.zeros((0, 2)), d) == 0.0


def test_density_near_by_hand():
    """d = 10 µm; B cells at (0, 0) and (100, 0) (disjoint discs, N = 2π·100 = 628.319 µm²).
    A cells: (3, 4) at 5 µm → in; (0, 10) at exactly 10 µm → in (≤ d); (50, 0) at 50 µm → out;
    (100, 9.9) at 9.9 µm → in: 3 cells / 628.319e-6 mm² = 4774.6 per mm²."""
    xy = np.array([[0, 0], [100, 0], [3, 4], [0, 10], [50, 0], [100, 9.9]], float)
    types = np.array(["B", "B", "A", "A", "A", "A"])
    dens, n, area = density_near(xy, types, "A", "B", 10.0, raster_um=0.05)
    assert n == 3
    assert area == pytest.approx(2 * math.pi * 100, rel=1e-3)
    assert dens == pytest.approx(3 / (2 * math.pi * 100 / 1e6), rel=1e-3) and dens == pytest.approx(4774.6, rel=1e-3)
    # the default raster (d / 20) is within 1 %
    assert density_near(xy, types, "A", "B", 10.0)[0] == pytest.approx(4774.6, rel=0.01)
    # A = B: each B cell is within 0 of itself → 2 cells in 628.3 µm²
    assert density_near(xy, types, "B", "B", 10.0, raster_um=0.05)[1] == 2
    # no B: undefined; B but no A near: 0
    assert math.isnan(density_near(xy, types, "A", "C", 10.0)[0])
    dens0, n0, _ = density_near(xy[:2], types[:2], "A", "B", 10.0)
    assert n0 == 0 and dens0 == 0.0


def test_slide_value_converts_pixels_to_um():
    """At 0.5 µm/px, B at (0, 0) px and A at (16, 12) px are 10 µm apart (8 · 6 · 10 triangle):
    in at d = 10, out at d = 9.9 → 1 cell / (π·100 µm²) = 3183.1 per mm², then 0."""
    frame = pd.DataFrame({"x": [0.0, 16.0], "y": [0.0, 12.0], "cell_type": ["t_cell", "malignant_epithelial"],
                          "gene:ERBB2": [1.0, 7.0]})
    near = CellMeasure("dens", "malignant_epithelial", near="t_cell", distance_um=10.0)
    assert slide_value(frame, near, 0.5, raster_um=0.05) == pytest.approx(1e6 / (math.pi * 100), rel=1e-3)
    assert slide_value(frame, CellMeasure("dens", "malignant_epithelial", near="t_cell", distance_um=9.9), 0.5) == 0
    assert slide_value(frame, CellMeasure("mean", "malignant_epithelial", "ERBB2"), 0.5) == 7.0
    assert slide_value(frame, CellMeasure("frac", "t_cell"), 0.5) == 0.5


def test_patient_mean_over_slides():
    """P1 slides 1 and 3 → 2; P2 (missing, 5) → 5; P3 only a missing value → left out."""
    slides = pd.DataFrame({"patient": ["P1", "P1", "P2", "P2", "P3"], "value": [1.0, 3.0, np.nan, 5.0, np.nan]})
    out = patient_means(slides)
    assert out.to_dict() == {"P1": 2.0, "P2": 5.0} and out.index.name == "patient"


def test_resolve_type_names():
    assert resolve_type("T_CELL", TYPES) == "t_cell"
    assert resolve_type("malignant", TYPES) == "malignant_epithelial"       # unique prefix
    assert resolve_type("t cell", TYPES) == "t_cell"
    with pytest.raises(AnalysisError, match="is not a cell type.*malignant_epithelial, cycling_malignant"):
        resolve_type("neutrophil", TYPES)
    with pytest.raises(AnalysisError, match="matches"):
        resolve_type("t", TYPES + ["t_reg"])


def test_parse_cell_variables():
    v = parse_variable("cell:malignant:erbb2", panel=PANEL, cell_types=TYPES)
    assert (v.source, v.name, v.genes) == ("cell", "malignant_epithelial", ("ERBB2",))
    assert v.spec == "cell:malignant_epithelial:ERBB2" and v.label == "ERBB2 in malignant_epithelial cells (predicted)"
    v = parse_variable("cellfrac:T_cell", panel=PANEL, cell_types=TYPES)
    assert v.spec == "cellfrac:t_cell"
    v = parse_variable("celldens:t_cell@malignant", panel=PANEL, cell_types=TYPES)
    assert (v.name, v.near, v.distance_um) == ("t_cell", "malignant_epithelial", 50.0)
    assert v.spec == "celldens:t_cell@malignant_epithelial:50"
    assert parse_variable("celldens:t@malignant:25um", panel=PANEL, cell_types=TYPES).distance_um == 25.0
    # without the model's types (as cohort_stats.resolve parses): kept as typed, matched later
    assert parse_variable("cellfrac:t", panel=PANEL).name == "t"
    m = normalise(parse_variable("celldens:t@malig:30", panel=PANEL).cell_measure, TYPES, PANEL)
    assert m.spec == "celldens:t_cell@malignant_epithelial:30"


@pytest.mark.parametrize("text,match", [
    ("cell:malignant", "name a cell type and a gene"),
    ("cell:malignant:NOPE", "not in the model's panel"),
    ("cell:neutrophil:ERBB2", "is not a cell type"),
    ("cellfrac:t@malignant", "name one cell type"),
    ("celldens:t_cell", "A@B"),
    ("celldens:t_cell@", "a cell type is missing"),
    ("celldens:t_cell@malignant:far", "not a number"),
    ("celldens:t_cell@malignant:0", r"\(0, 1000\]"),
    ("celldens:t_cell@malignant:5000", r"\(0, 1000\]"),
    ("cellfrac:", "names no cellfrac"),
])
def test_parse_cell_variable_errors(text, match):
    with pytest.raises(AnalysisError, match=match):
        parse_variable(text, panel=PANEL, cell_types=TYPES)


# ---------------------------------------------------------------- on a store with cells runs

def _runs(store, model_key):
    from core.analysis.cell_biomarkers import cells_runs

    return cells_runs(store, "demo", model_key)


def test_cohort_values_match_the_stored_cells(cells_store):  # noqa: F811
    from core.analysis.cell_layers import run_cells
    from core.analysis.cohort_stats import resolve
    from core.store.db import Store

    with Store(cells_store, read_only=True) as store:
        model_key = store.model_coverage("demo")["model_key"].iloc[-1]
        info = store.model_info(model_key)
        runs = _runs(store, model_key)
        assert 0 < len(runs) < len(store.cohort_runs("demo", model_key))   # some slides have no cells: left out
        # fraction: from the store's counts per type
        counts = store.cell_type_counts(list(runs["run_key"]))
        t = info.cell_types.index("t_cell")
        per_run = counts.groupby("run_key")["n"].sum()
        t_runs = counts[counts["cell_type"] == t].set_index("run_key")["n"].reindex(per_run.index).fillna(0)
        frac = (t_runs / per_run).rename("v").to_frame().join(runs.set_index("run_key")["patient"])
        expected = frac.groupby("patient")["v"].mean()
        variable, got = resolve(store, "demo", "cellfrac:t_cell", model_key=model_key)
        assert variable.source == "cellfrac"
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False, rtol=1e-12)
        # mean of ERBB2 in malignant cells, and the density, on one slide against brute force
        single = runs[~runs["patient"].duplicated(keep=False)]
        assert len(single), "every patient has several cells slides"
        row = single.iloc[0]
        rc = run_cells(store, model_key, row["run_key"], ["ERBB2"])
        f = rc.frame
        mal = f["cell_type"].astype(str) == "malignant_epithelial"
        _, means = resolve(store, "demo", "cell:malignant:ERBB2", model_key=model_key)
        assert means[row["patient"]] == pytest.approx(float(f.loc[mal, "gene:ERBB2"].astype(float).mean()), rel=1e-6)
        xy = f[["x", "y"]].to_numpy(float) * float(row["mpp"])
        a, b = xy[(f["cell_type"].astype(str) == "t_cell").to_numpy()], xy[mal.to_numpy()]
        assert len(b) > 0
        d = 50.0
        dist = np.sqrt(((a[:, None, :] - b[None]) ** 2).sum(-1)).min(axis=1) if len(a) else np.zeros(0)
        n_near = int((dist <= d).sum())
        step = d / 20
        lo, hi = np.floor((b.min(0) - d) / step), np.ceil((b.max(0) + d) / step)
        gx, gy = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5, indexing="ij")
        centres = np.stack([gx.ravel(), gy.ravel()], 1) * step
        inside = np.zeros(len(centres), bool)
        for k in range(0, len(b), 256):
            inside |= (((centres[:, None, :] - b[None, k:k + 256]) ** 2).sum(-1) <= d * d).any(1)
        area = inside.sum() * step * step
        dens, n, area_got = density_near(xy, f["cell_type"].astype(str).to_numpy(), "t_cell", "malignant_epithelial", d)
        assert n == n_near and area_got == pytest.approx(area, rel=1e-3)
        assert dens == pytest.approx(n_near / (area / 1e6), rel=1e-3)
        _, dens_pat = resolve(store, "demo", "celldens:t_cell@malignant_epithelial:50", model_key=model_key)
        assert dens_pat[row["patient"]] == pytest.approx(dens, rel=1e-9)


def test_cohort_without_cells_says_what_to_do(demo_env):
    from core.analysis.cohort_stats import resolve
    from core.store.db import Store

    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        model_key = store.model_coverage("demo")["model_key"].iloc[-1]
        with pytest.raises(AnalysisError, match="predict --cohort demo --cells"):
            resolve(store, "demo", "cellfrac:t_cell", model_key=model_key)
        with pytest.raises(AnalysisError, match="is not a cell type"):
            resolve(store, "demo", "cellfrac:neutrophil", model_key=model_key)


def test_cli_cells_commands(cells_store, capsys):  # noqa: F811
    import json

    from core.cli import main

    base = ["--cohort", "demo", "--store", str(cells_store)]
    assert main(["cells", "biomarkers", *base, "--variable", "cellfrac:t", "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variable"] == "cellfrac:t_cell" and out["n_patients"] == len(out["patients"]) > 0
    assert all(0 <= p["value"] <= 1 for p in out["patients"])
    slide = out["slides"][0]["slide_name"]
    assert main(["cells", "show", *base, "--slide", slide, "--json", "-"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_cells"] == out["slides"][0]["n_cells"] == sum(t["n"] for t in shown["types"])
    t = next(x for x in shown["types"] if x["cell_type"] == "t_cell")
    assert t["fraction"] == pytest.approx(out["slides"][0]["value"])
    for args, message in [(["biomarkers", "--variable", "cell:nope:ERBB2"], "not a cell type"),
                          (["biomarkers", "--variable", "CD8A"], "not a cell biomarker"),
                          (["biomarkers", "--variable", "celldens:t@malignant:x"], "not a number"),
                          (["show", "--slide", "NOSUCHSLIDE"], "No slide NOSUCHSLIDE")]:
        assert main(["cells", args[0], *base, *args[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
