"""Exports (``python -m core.cli export`` and the pages' download): AnnData that scanpy draws on the
tissue, QuPath GeoJSON, tile tables, map figures, the cohort table, and bad input.

Expected values come from the store itself (``Store.run_expression``, ``Store.heatmap``), from the
slide thumbnail read independently with OpenSlide, and from QuPath's own GeoJSON writer
(``qupath.lib.io.PathObjectTypeAdapters`` v0.4+: Feature ``id`` a UUID, ``properties.objectType``
``tile``, ``measurements`` an object name → number, ``classification`` ``{name, color}``).
"""
from __future__ import annotations

import json
import shutil
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import main
from core.store.db import Store

COHORT = "demo"


@pytest.fixture(scope="module")
def world(demo_env):
    """(store path, model key, the cohort's predicted runs)."""
    settings, _ = demo_env
    with Store(settings.store_path, read_only=True) as store:
        model_key = store.model_coverage(COHORT)["model_key"].iloc[-1]
        runs = store.cohort_runs(COHORT, model_key).dropna(subset=["run_key"]).reset_index(drop=True)
    return settings.store_path, model_key, runs


def cli(world, *args) -> int:
    return main(["export", "--cohort", COHORT, "--store", str(world[0]), *map(str, args)])


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def expression(world, run_key: str, genes=None):
    with Store(world[0], read_only=True) as store:
        return store.run_expression(world[1], run_key, genes)


def no_partials(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial" in p.name]


# ---------------------------------------------------------------- AnnData

def test_h5ad_is_scanpy_spatial_on_the_tissue(world, tmp_path, capsys):
    """X = the store's matrix, obsm['spatial'] = tile centres; every tile's box, mapped onto the
    embedded thumbnail with ``tissue_hires_scalef``, covers tissue in proportion to the store's
    tissue fraction (independent check: non-glass pixels, mean RGB < 235, of the thumbnail; the
    demo's glass is ~248). A wrong scale, an x/y swap or top-left instead of centres breaks it
    (swapping x and y gives r ≈ 0.2 on this world). A tile's centre pixel alone is no test: a tile
    kept at 40 % tissue may have glass in its middle."""
    import anndata
    import matplotlib

    from core.export.collect import domains_for

    matplotlib.use("Agg")
    import scanpy as sc

    out = tmp_path / "cohort.h5ad"
    _, model_key, runs = world
    runs = runs.iloc[:16]   # ~160 tiles: enough for the tissue check, cheap on a shared CPU
    assert cli(world, "--format", "h5ad", "--slide", *runs["slide_name"], "--layers", "ERBB2;sig:cytolytic",
               "--hires-px", 300, "--out", out, "--json", "-") == 0
    info = summary(capsys)
    adata = anndata.read_h5ad(out)
    with Store(world[0], read_only=True) as store:
        panel = store.model_info(model_key).genes
    assert info["files"] == [str(out)] and info["n_tiles"] == adata.n_obs == int(runs["n_tiles"].sum())
    assert adata.shape == (int(runs["n_tiles"].sum()), len(panel)) and adata.X.dtype == np.float32
    assert list(adata.var_names) == panel
    assert {"slide", "patient", "tile_idx", "tissue", "domain", "sig:cytolytic"} <= set(adata.obs.columns)
    assert isinstance(adata.obs["domain"].dtype, pd.CategoricalDtype)
    with Store(world[0], read_only=True) as store:   # the demo store has no domain fit
        assert domains_for(store, COHORT, world[1], list(runs["run_key"])) is None
    assert set(adata.obs["domain"]) == {"unassigned"}
    tessera = adata.uns["tessera"]
    assert tessera["model_key"] == model_key and tessera["version"] == model_key.split("@")[1] and tessera["exported_at"]
    fractions, tissue = [], []
    for run in runs.itertuples():
        tiles, matrix, _ = expression(world, run.run_key)
        sub = adata[adata.obs["slide"] == run.slide_name]
        np.testing.assert_array_equal(sub.X, matrix)
        np.testing.assert_array_equal(sub.obs["tile_idx"], tiles["tile_idx"])
        np.testing.assert_array_equal(sub.obsm["spatial"], tiles[["x", "y"]].to_numpy() + run.tile_size / 2)
        lib = adata.uns["spatial"][run.slide_name]
        image, scale = lib["images"]["hires"], lib["scalefactors"]["tissue_hires_scalef"]
        assert image.dtype == np.uint8 and max(image.shape[:2]) <= 300 and lib["metadata"]["model_key"] == model_key
        assert lib["scalefactors"]["spot_diameter_fullres"] == run.tile_size
        assert lib["metadata"]["tile_um"] == 112.0 and lib["metadata"]["mpp"] == pytest.approx(run.mpp)
        glass = image.astype(float).mean(axis=2) >= 235
        half = run.tile_size / 2
        for cx, cy in sub.obsm["spatial"]:
            box = glass[int((cy - half) * scale):int((cy + half) * scale), int((cx - half) * scale):int((cx + half) * scale)]
            fractions.append(1 - box.mean())
        tissue += list(sub.obs["tissue"])
    fractions, tissue = np.array(fractions), np.array(tissue)
    assert np.corrcoef(fractions, tissue)[0, 1] > 0.9
    assert np.abs(fractions - tissue).mean() < 0.1 and fractions.min() > 0.15
    first = runs["slide_name"].iloc[0]
    sc.pl.spatial(adata[adata.obs["slide"] == first], library_id=first, color="ERBB2", show=False)
    sc.pl.spatial(adata[adata.obs["slide"] == first], library_id=first, color="domain", show=False)
    matplotlib.pyplot.close("all")


def test_domains_reach_geojson_and_anndata(world, tmp_path, capsys):
    """With a domain fit in the store (a copy of the demo store, k-means, 3 domains), every tile's
    label is ``core.analysis.domains.tile_domains``' and QuPath gets one colour per class."""
    domains = pytest.importorskip("core.analysis.domains")
    import anndata

    path = tmp_path / "store.duckdb"
    shutil.copy(world[0], path)
    _, model_key, runs = world
    with Store(path) as store:
        domains.fit_domains(store, COHORT, model_key, method="kmeans", n_domains=3, n_sample=300)
    slide = runs.iloc[0]
    with Store(path, read_only=True) as store:
        truth = np.asarray(domains.tile_domains(store, COHORT, model_key, slide.run_key)).astype(str)
    base = ["export", "--cohort", COHORT, "--store", str(path), "--slide", slide.slide_name]
    assert main(base + ["--format", "geojson", "--out", str(tmp_path / "s.geojson")]) == 0
    feats = json.loads((tmp_path / "s.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == list(truth)
    colors = {}
    for f in feats:
        c = f["properties"]["classification"]
        assert len(c["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
        assert colors.setdefault(c["name"], c["color"]) == c["color"]
    assert len(set(map(tuple, colors.values()))) == len(colors)
    assert main(base + ["--format", "h5ad", "--out", str(tmp_path / "s.h5ad")]) == 0
    adata = anndata.read_h5ad(tmp_path / "s.h5ad")
    assert list(adata.obs["domain"]) == list(truth) and len(adata.uns["domain_colors"]) == len(set(truth))
    capsys.readouterr()


# ---------------------------------------------------------------- QuPath GeoJSON

def test_geojson_follows_qupath(world, tmp_path, capsys):
    from core.export.api import export

    _, model_key, runs = world
    slide = runs.iloc[1]
    out = tmp_path / "tiles.geojson"
    assert cli(world, "--format", "geojson", "--slide", slide.slide_name, "--layers", "erbb2,CD8A", "--out", out) == 0
    doc = json.loads(out.read_text())
    tiles, matrix, _ = expression(world, slide.run_key, ["ERBB2", "CD8A"])
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(tiles)
    ts = int(slide.tile_size)
    for feat, tile in zip(doc["features"], tiles.itertuples()):
        assert feat["type"] == "Feature" and uuid.UUID(feat["id"]).version == 5
        ring = feat["geometry"]["coordinates"]
        assert feat["geometry"]["type"] == "Polygon" and len(ring) == 1 and len(ring[0]) == 5
        assert ring[0][0] == ring[0][-1]
        x, y = int(tile.x), int(tile.y)
        assert ring[0] == [[x, y], [x + ts, y], [x + ts, y + ts], [x, y + ts], [x, y]]
        props = feat["properties"]
        assert props["objectType"] == "tile" and props["name"] == f"{slide.slide_name} {tile.tile_idx}"
        assert set(props["measurements"]) == {"ERBB2", "CD8A"} and "classification" not in props
        assert all(isinstance(v, float) for v in props["measurements"].values())
    k = len(tiles) // 2   # a sampled tile against the viewer's own query
    with Store(world[0], read_only=True) as store:
        heat = store.heatmap(model_key, slide.run_key, "CD8A")
    assert np.float32(doc["features"][k]["properties"]["measurements"]["CD8A"]) == np.float32(heat["value"].iloc[k])
    assert len({f["id"] for f in doc["features"]}) == len(tiles)

    # several slides: one file each in a folder; default measurements = the whole panel
    folder = tmp_path / "qupath"
    assert cli(world, "--format", "geojson", "--slide", *runs["slide_name"].iloc[:3], "--out", folder) == 0
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted(n.rsplit(".", 1)[0] + ".geojson" for n in runs["slide_name"].iloc[:3])
    with Store(world[0], read_only=True) as store:
        panel = store.model_info(model_key).genes
        # domains handed in directly ({run_key: labels}), as the pages may
        labels = np.array(["tumour", "stroma"] * len(tiles))[:len(tiles)]
        export(store, COHORT, model_key, "geojson", tmp_path / "d.geojson", slides=[slide.slide_name],
               layers=["gene:ERBB2"], domains={slide.run_key: labels})
    one = json.loads(files[0].read_text())["features"][0]["properties"]
    assert list(one["measurements"]) == panel
    named = [f["properties"]["classification"]["name"] for f in json.loads((tmp_path / "d.geojson").read_text())["features"]]
    assert named == list(labels)
    capsys.readouterr()


# ---------------------------------------------------------------- tables

def test_tile_tables_round_trip(world, tmp_path, capsys):
    """CSV and Parquet hold exactly the store's values (float32 written at full precision)."""
    _, _, runs = world
    names = list(runs["slide_name"].iloc[:2])
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"tiles.{fmt}"
        assert cli(world, "--format", fmt, "--slide", *names, "--out", out, "--json", "-") == 0
        assert summary(capsys)["n_tiles"] == int(runs["n_tiles"].iloc[:2].sum())
        table = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
        assert list(table.columns[:9]) == ["slide", "patient", "tile_idx", "x", "y", "x_center", "y_center",
                                           "tissue", "domain"]
        for run in runs.iloc[:2].itertuples():
            tiles, matrix, genes = expression(world, run.run_key)
            part = table[table["slide"] == run.slide_name].reset_index(drop=True)
            assert list(table.columns[9:]) == genes and (part["patient"] == run.patient).all()
            np.testing.assert_array_equal(part[genes].to_numpy(np.float32), matrix)
            np.testing.assert_array_equal(part[["tile_idx", "x", "y"]], tiles[["tile_idx", "x", "y"]])
            np.testing.assert_array_equal(part["x_center"], tiles["x"] + run.tile_size / 2)
            np.testing.assert_array_equal(part["tissue"].to_numpy(np.float32), tiles["tissue"].to_numpy(np.float32))


# ---------------------------------------------------------------- figures

def test_png_and_svg_honour_the_colour_scale(world, tmp_path, capsys):
    """The tile colours are the viewer's (``overlay.colorize``) on the asked scale: at opacity 1
    a tile's centre pixel in the PNG is exactly its colour; SVG ``<rect>`` fills likewise."""
    from PIL import Image

    from core.analysis.overlay import colorize
    from core.export.figures import FIGURE_PX, TITLE_H
    from core.wsi.slide import Slide

    _, _, runs = world
    slide = runs.iloc[2]
    tiles, matrix, _ = expression(world, slide.run_key, ["ERBB2"])
    values = matrix[:, 0].astype(np.float64)
    with Slide(slide.slide_path) as wsi:   # the figure's thumbnail, read independently
        thumb_w, thumb_h = wsi.thumbnail(FIGURE_PX).size
    sx, sy = thumb_w / slide.width, thumb_h / slide.height
    for lo, hi in [(0.0, 10.0), (float(np.median(values)), float(values.max()) + 1)]:
        png = tmp_path / f"map_{lo:g}.png"
        assert cli(world, "--format", "png", "--slide", slide.slide_name, "--layers", "ERBB2", "--opacity", 1,
                   "--vmin", lo, "--vmax", hi, "--out", png, "--json", "-") == 0
        info = summary(capsys)
        assert (info["vmin"], info["vmax"]) == (lo, hi)
        with Image.open(png) as img:
            img.verify()
        rgb = np.asarray(Image.open(png).convert("RGB"))
        expected = colorize(values[None, :], lo, hi)[0, :, :3]
        for (x, y), colour in zip(tiles[["x", "y"]].to_numpy(), expected):   # thumbnail drawn at (0, TITLE_H)
            cx, cy = int((x + slide.tile_size / 2) * sx), int((y + slide.tile_size / 2) * sy) + TITLE_H
            assert tuple(rgb[cy, cx]) == tuple(colour)
        assert rgb.shape[0] >= TITLE_H + thumb_h and rgb.shape[1] > thumb_w
        svg = tmp_path / f"map_{lo:g}.svg"
        assert cli(world, "--format", "svg", "--slide", slide.slide_name, "--layers", "ERBB2", "--vmin", lo,
                   "--vmax", hi, "--out", svg) == 0
        assert capsys.readouterr().out.startswith(f"written {svg} (svg)")
        root = ET.parse(svg).getroot()
        ns = {"s": "http://www.w3.org/2000/svg"}
        rects = root.findall(".//s:g[@id='tiles']/s:rect", ns)
        assert [int(r.get("data-tile")) for r in rects] == list(tiles["tile_idx"])
        assert [r.get("fill") for r in rects] == ["#%02x%02x%02x" % tuple(c) for c in expected]
        href = root.find(".//s:image", ns).get("{http://www.w3.org/1999/xlink}href")
        assert href.startswith("data:image/png;base64,")
        assert f"vmin {lo:.6g}, vmax {hi:.6g}" in root.find("s:desc", ns).text
        assert slide.slide_name in root.find("s:text", ns).text
    capsys.readouterr()


# ---------------------------------------------------------------- the cohort table (former export)

def test_cohort_table_export_still_works(world, tmp_path, capsys):
    from core.analysis.cohort_stats import cohort_table
    from core.cli import build_parser
    from core.cli_export import cmd_export

    store_path, model_key, _ = world
    out = tmp_path / "cohort.csv"
    assert cli(world, "--variables", "CD8A;signature:cytolytic", "--out", out) == 0
    assert "written" in capsys.readouterr().out
    with Store(store_path, read_only=True) as store:
        expected = cohort_table(store, COHORT, ["CD8A", "signature:cytolytic"], model_key=model_key)
    got = pd.read_csv(out)
    assert len(got) == len(expected) == 60 and "CD8A (predicted mean)" in got.columns
    np.testing.assert_allclose(got["CD8A (predicted mean)"], expected["CD8A (predicted mean)"])
    assert cli(world, "--format", "table", "--out", tmp_path / "c.xlsx", "--json", "-") == 0
    assert summary(capsys)["n_rows"] == 60 and pd.read_excel(tmp_path / "c.xlsx").shape[0] == 60
    assert build_parser().parse_args(["export", "--cohort", "x", "--out", "y.csv"]).func is cmd_export


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,message", [
    (["--cohort", "nope", "--format", "csv"], "No cohort 'nope'"),
    (["--slide", "TCGA-ZZ-NONE", "--format", "csv"], "TCGA-ZZ-NONE"),
    (["--layers", "ERBB2,NOTAGENE", "--format", "csv"], "NOTAGENE"),
    (["--layers", "sig:no_such_set", "--format", "csv"], "no_such_set"),
    (["--format", "png", "--layers", "ERBB2"], "one layer of one slide"),
    (["--format", "geojson", "--out-suffix", ".geojson"], "one file per slide"),
    (["--format", "csv", "--model", "ghost"], "ghost"),
    (["--format", "csv", "--variables", "CD8A"], "--variables is for the cohort table"),
    (["--format", "h5ad", "--out-suffix", ".csv"], "should end in .h5ad"),
    (["--format", "csv", "--layers", "nuclei:all"], "no nucleus counts"),   # found while gathering
])
def test_bad_input_is_exit_2_and_no_file(world, tmp_path, capsys, args, message):
    if "--out-suffix" in args:
        i = args.index("--out-suffix")
        out, args = tmp_path / f"out{args[i + 1]}", args[:i] + args[i + 2:]
    else:
        out = tmp_path / f"out.{args[args.index('--format') + 1]}"
    argv = ["export", "--store", str(world[0]), "--out", str(out)] + (["--cohort", COHORT] if "--cohort" not in args else [])
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_stores(world, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert cli(world, "--format", "csv", "--out", tmp_path) == 2                                  # a folder
    assert "is a folder" in capsys.readouterr().err
    assert cli(world, "--format", "csv", "--out", tmp_path / "a_file" / "t.csv") == 2             # under a file
    assert "Cannot create the folder" in capsys.readouterr().err
    assert main(["export", "--cohort", COHORT, "--store", str(tmp_path / "none.duckdb"), "--format", "csv",
                 "--out", str(tmp_path / "t.csv")]) == 2
    assert "No store at" in capsys.readouterr().err
    assert cli(world, "--format", "png", "--slide", world[2]["slide_name"].iloc[0], "--layers", "ERBB2",
               "--vmin", 3, "--vmax", 1, "--out", tmp_path / "f.png") == 2
    assert "vmin < vmax" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli(world, "--format", "docx", "--out", tmp_path / "t.docx")
    assert stop.value.code == 2 and "invalid choice: 'docx'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    from core.errors import TesseraError
    from core.export.files import atomic_paths, atomic_write

    old = tmp_path / "map.png"
    old.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half")
        raise TesseraError("the slide could not be read")

    with pytest.raises(TesseraError):
        atomic_write(old, half)
    with pytest.raises(TesseraError):
        atomic_write(tmp_path / "new.h5ad", half)
    with pytest.raises(RuntimeError):   # several GeoJSON files: none appears if one fails
        with atomic_paths([tmp_path / "a.geojson", tmp_path / "b.geojson"]) as (a, b):
            a.write_text("{}")
            raise RuntimeError("disk full")
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
    assert not no_partials(tmp_path)


# ---------------------------------------------------------------- the page widget

def _panel_app(slides, layers):
    from pages._export_ui import export_panel

    export_panel("demo", st_model(), slides, layers, key="t")


def st_model():
    from core.store.db import Store as S
    from pages import _ui

    return _ui.query(S.model_coverage, "demo")["model_key"].iloc[-1]


def test_export_panel_offers_the_same_file(world, demo_env, tmp_path, monkeypatch):
    """The page's button names the file ``export_bytes`` makes, whose bytes are ``export``'s file."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core.export.api import export, export_bytes

    settings, _ = demo_env
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch.delenv("TESSERA_STORE", raising=False)
    st.cache_data.clear()
    st.cache_resource.clear()
    slide = world[2]["slide_name"].iloc[0]
    src = "from tests.unit.test_export import _panel_app\n_panel_app({!r}, {!r})\n"
    at = AppTest.from_string(src.format([slide], ["gene:ERBB2"]), default_timeout=60).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.selectbox(key="t_export_fmt").select("csv").run()
    button = at.get("download_button")[0]
    assert button.proto.label.endswith(".csv")
    bad = AppTest.from_string(src.format([slide], ["NOTAGENE"]), default_timeout=60).run()
    assert not bad.exception and "NOTAGENE" in bad.error[0].value
    with Store(world[0], read_only=True) as store:
        data, name, mime = export_bytes(store, COHORT, world[1], "csv", slides=[slide], layers=["gene:ERBB2"])
        export(store, COHORT, world[1], "csv", tmp_path / name, slides=[slide], layers=["gene:ERBB2"])
    assert button.proto.label == f"Download {name}" and mime == "text/csv"
    assert data == (tmp_path / name).read_bytes()
    st.cache_data.clear()
    st.cache_resource.clear()
