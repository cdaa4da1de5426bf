"""Cells exports (``python -m core.cli export --level cells``) of the tiny demo world predicted with
cells (tests/cells_world.py): AnnData, QuPath GeoJSON detections, cell tables, and bad input.

Expected values come from the store through :func:`core.analysis.cell_layers.run_cells` (the
cells and per-cell gene values the Slide page draws) and from the ellipse geometry itself: the 16
vertices of an ellipse are symmetric about its centre (their mean is the centroid) and the first
lies on the major axis, half the major axis (µm / µm-per-px) from the centre. QuPath's GeoJSON
(``qupath.lib.io.PathObjectTypeAdapters`` v0.4+): ``objectType`` ``detection``, a closed Polygon
ring, ``classification`` ``{name, color}``, ``measurements`` an object name → number.
"""
from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pandas as pd
import pytest

from core.cli import main
from core.store.db import Store
from tests.cells_world import cells_store  # noqa: F401  (fixture)

COHORT = "demo"
GENES = ["ERBB2", "CD8A"]


@pytest.fixture(scope="module")
def cworld(cells_store):  # noqa: F811
    """(store path, model key, a slide row with cells, a slide row without)."""
    from core.analysis.cell_biomarkers import cells_runs

    with Store(cells_store, read_only=True) as store:
        model_key = store.model_coverage(COHORT)["model_key"].iloc[-1]
        with_cells = cells_runs(store, COHORT, model_key)
        runs = store.cohort_runs(COHORT, model_key).dropna(subset=["run_key"])
        without = runs[~runs["run_key"].isin(with_cells["run_key"])]
    return cells_store, model_key, with_cells.iloc[0], without.iloc[0], with_cells


def cli(cworld, *args) -> int:
    return main(["export", "--cohort", COHORT, "--store", str(cworld[0]), *map(str, args)])


def cells_of(cworld, row, genes):
    from core.analysis.cell_layers import run_cells

    with Store(cworld[0], read_only=True) as store:
        return run_cells(store, cworld[1], row["run_key"], genes)


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_h5ad_cells(cworld, tmp_path, capsys):
    """X = the cells' values of the chosen genes, obsm['spatial'] = centroids (level-0 px),
    obs.cell_type = the model's types, uns['spatial'] with the thumbnail's scale."""
    import anndata as ad

    row = cworld[2]
    out = tmp_path / "cells.h5ad"
    assert cli(cworld, "--level", "cells", "--slide", row["slide_name"], "--genes", "erbb2,CD8A", "--out", out,
               "--json", "-") == 0
    s = summary(capsys)
    rc = cells_of(cworld, row, GENES)
    assert s["level"] == "cells" and s["n_cells"] == len(rc) > 0 and s["layers"] == GENES
    a = ad.read_h5ad(out)
    assert list(a.var_names) == GENES and a.n_obs == len(rc)
    np.testing.assert_allclose(a.X, rc.frame[[f"gene:{g}" for g in GENES]].to_numpy(np.float32), rtol=0, atol=0)
    np.testing.assert_allclose(a.obsm["spatial"], rc.frame[["x", "y"]].to_numpy(np.float64), rtol=1e-6)
    assert list(a.obs["cell_type"].cat.categories) == rc.cell_types
    assert (a.obs["cell_type"].astype(str).to_numpy() == rc.frame["cell_type"].astype(str).to_numpy()).all()
    np.testing.assert_allclose(a.obs["confidence"], rc.frame["confidence"], rtol=1e-6)
    for col in ("major_um", "minor_um", "area_um2", "eccentricity", "solidity", "nucleus_class"):
        assert col in a.obs
    sp = a.uns["spatial"][row["slide_name"]]
    img = sp["images"]["hires"]
    assert sp["scalefactors"]["tissue_hires_scalef"] == pytest.approx(img.shape[1] / row["width"])
    assert sp["scalefactors"]["spot_diameter_fullres"] > 0
    assert len(a.uns["cell_type_colors"]) == len(rc.cell_types)
    assert a.uns["tessera"]["level"] == "cells"
    # the whole panel by default
    assert cli(cworld, "--level", "cells", "--slide", row["slide_name"], "--out", tmp_path / "all.h5ad") == 0
    with Store(cworld[0], read_only=True) as store:
        assert ad.read_h5ad(tmp_path / "all.h5ad").n_vars == len(store.model_info(cworld[1]).genes)


def test_geojson_cells_are_qupath_detections(cworld, tmp_path, capsys):
    row = cworld[2]
    out = tmp_path / "cells.geojson"
    assert cli(cworld, "--level", "cells", "--slide", row["slide_name"], "--genes", "ERBB2,CD8A", "--out", out) == 0
    fc = json.loads(out.read_text())
    rc = cells_of(cworld, row, GENES)
    f = rc.frame
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == len(f)
    ids = [feat["id"] for feat in fc["features"]]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i) for i in ids)
    mpp = float(row["mpp"])
    for i in [0, len(f) // 2, len(f) - 1]:
        feat = fc["features"][i]
        p = feat["properties"]
        assert p["objectType"] == "detection"
        assert p["classification"]["name"] == str(f["cell_type"].iloc[i]) and len(p["classification"]["color"]) == 3
        assert set(p["measurements"]) == {*GENES, "confidence"}
        assert p["measurements"]["ERBB2"] == pytest.approx(float(f["gene:ERBB2"].iloc[i]), rel=1e-6)
        assert p["measurements"]["confidence"] == pytest.approx(float(f["confidence"].iloc[i]), rel=1e-6)
        ring = np.array(feat["geometry"]["coordinates"][0])
        assert feat["geometry"]["type"] == "Polygon" and len(ring) == 17 and (ring[0] == ring[-1]).all()
        cx, cy = float(f["x"].iloc[i]), float(f["y"].iloc[i])
        assert ring[:-1].mean(0) == pytest.approx([cx, cy], abs=0.02)
        assert math.dist(ring[0], (cx, cy)) == pytest.approx(float(f["major_um"].iloc[i]) / 2 / mpp, abs=0.02)
    # several slides into a folder, one file each
    names = list(cworld[4]["slide_name"][:2])
    folder = tmp_path / "many"
    assert cli(cworld, "--level", "cells", "--format", "geojson", "--slide", *names, "--genes", "ERBB2",
               "--out", folder) == 0
    assert len(list(folder.glob("*.geojson"))) == 2 and not [p for p in folder.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_cell_tables_round_trip(cworld, tmp_path, suffix):
    row = cworld[2]
    out = tmp_path / f"cells.{suffix}"
    assert cli(cworld, "--level", "cells", "--slide", row["slide_name"], "--genes", "CD8A,ERBB2", "--out", out) == 0
    table = pd.read_csv(out) if suffix == "csv" else pd.read_parquet(out)
    f = cells_of(cworld, row, GENES).frame
    assert len(table) == len(f)
    assert list(table.columns[:7]) == ["slide", "patient", "tile_idx", "x", "y", "cell_type", "confidence"]
    assert list(table.columns[-2:]) == GENES                      # panel order
    assert (table["cell_type"].to_numpy() == f["cell_type"].astype(str).to_numpy()).all()
    for g in GENES:
        np.testing.assert_allclose(table[g].to_numpy(np.float32), f[f"gene:{g}"].to_numpy(np.float32), rtol=1e-6)
    np.testing.assert_allclose(table["x"], f["x"], rtol=1e-6)


def test_cells_bad_input_is_exit_2_and_no_file(cworld, tmp_path, capsys):
    row, without = cworld[2], cworld[3]
    cases = [
        (["--level", "cells", "--slide", without["slide_name"], "--out", tmp_path / "a.h5ad"], "No cells for 1 chosen"),
        (["--level", "cells", "--slide", row["slide_name"], "--format", "png", "--out", tmp_path / "a.png"], "tiles only"),
        (["--level", "cells", "--slide", row["slide_name"], "--genes", "NOPE1", "--out", tmp_path / "a.csv"], "NOPE1"),
        (["--level", "cells", "--slide", row["slide_name"], "--layers", "sig:cytolytic", "--out", tmp_path / "a.csv"],
         "genes only"),
        (["--slide", row["slide_name"], "--genes", "ERBB2", "--out", tmp_path / "a.h5ad"], "--level cells"),
        (["--slide", row["slide_name"], "--stride", "0.5", "--out", tmp_path / "a.h5ad"], "--stride 0.5"),
        (["--slide", row["slide_name"], "--stride", "0.3", "--out", tmp_path / "a.h5ad"], "0.5 or 0.25"),
        (["--level", "cells", "--out", tmp_path / "a.geojson"], "one file per slide"),
    ]
    for args, message in cases:
        assert cli(cworld, *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert list(tmp_path.iterdir()) == []


def test_tile_export_unchanged_by_default(cworld, tmp_path, capsys):
    """Without --level the tile export is as before (and reads the cells runs' tiles)."""
    import anndata as ad

    row = cworld[2]
    out = tmp_path / "tiles.h5ad"
    assert cli(cworld, "--slide", row["slide_name"], "--out", out, "--json", "-") == 0
    s = summary(capsys)
    assert s["level"] == "tiles" and s["n_tiles"] == int(row["n_tiles"]) and s["stride"] == 1.0
    assert ad.read_h5ad(out).n_obs == int(row["n_tiles"])
