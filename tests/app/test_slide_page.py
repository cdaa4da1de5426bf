"""The Slide page's viewer in AppTest: every control reaches the viewer component's arguments
(what the browser draws), compare views share one colour scale, a click opens the tile, and the
URL's query string reopens a view (a stale one falls back with a notice)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import ROOT, app_env, assert_clean, monkeypatch_module  # noqa: F401
from tests.cells_world import cells_store  # noqa: F401  (fixture)


def viewer_args(at: AppTest) -> dict:
    comps = [c for c in at.get("component_instance") if "tessera_viewer" in c.proto.component_name]
    assert comps, "the viewer component was not drawn"
    return json.loads(comps[-1].proto.json_args)


def open_slide(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("pages/slide.py")
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    assert_clean(at)
    return at


def test_single_view_controls_reach_the_viewer(app_env):
    at = open_slide()
    args = viewer_args(at)
    assert len(args["panels"]) == 1 and args["panels"][0]["title"].endswith("ERBB2")
    p = args["panels"][0]
    assert len(p["token"]) == 32 and "/" not in p["token"]         # a token, never a path
    assert p["overlay"]["url"].startswith("data:image/png;base64,")
    assert "Moran's I" in p["caption"]
    at.selectbox(key="layer_a").select("gene:CD8A").run()
    assert_clean(at)
    assert viewer_args(at)["panels"][0]["title"].endswith("CD8A")
    at.slider(key="opacity").set_value(0.9).run()
    assert viewer_args(at)["opacity"] == pytest.approx(0.9)
    before = viewer_args(at)["panels"][0]["overlay"]["url"]
    at.selectbox(key="cmap").select("magma").run()
    assert viewer_args(at)["panels"][0]["overlay"]["url"] != before
    assert viewer_args(at)["panels"][0]["legend"]["stops"][0] == "#000003"   # magma starts (near) black
    at.selectbox(key="scale").select("custom").run()
    at.number_input(key="vmin").set_value(1.0).run()
    at.number_input(key="vmax").set_value(2.0).run()
    legend = viewer_args(at)["panels"][0]["legend"]
    assert (legend["min"], legend["max"]) == ("1", "2")
    at.slider(key="tissue_min").set_value(1.0).run()
    assert_clean(at)
    assert at.query_params["layer"] == "gene:CD8A" and at.query_params["cmap"] == "magma"


def test_compare_slides_share_one_colour_scale(app_env):
    at = open_slide()
    at.segmented_control(key="view").set_value("Compare slides").run()
    assert_clean(at)
    args = viewer_args(at)
    assert len(args["panels"]) == 2 and args["sync"] is True
    legends = [p["legend"] for p in args["panels"]]
    assert legends[0] == legends[1]                       # the pair's range, one scale
    names = at.multiselect(key="cmp_slides").options[:4]
    at.multiselect(key="cmp_slides").set_value(names).run()
    assert len(viewer_args(at)["panels"]) == 4 and viewer_args(at)["columns"] == 2
    at.selectbox(key="scale").select("cohort").run()
    assert_clean(at)
    cohort_legend = viewer_args(at)["panels"][0]["legend"]
    assert all(p["legend"] == cohort_legend for p in viewer_args(at)["panels"])
    assert float(cohort_legend["max"]) >= max(float(l["max"]) for l in legends) - 1e-9
    assert at.query_params["view"] == "compare-slides" and len(at.query_params["slides"].split(",")) == 4


def test_compare_layers_and_a_click_opens_the_tile(app_env):
    at = open_slide()
    at.segmented_control(key="view").set_value("Compare layers").run()
    assert_clean(at)
    args = viewer_args(at)
    assert [p["title"].split(" · ")[-1] for p in args["panels"]] == ["ERBB2", "CD8A"]
    slide = at.selectbox(key="slide").value
    # the browser reports a click in level-0 px: the tile under it opens with its H&E and profile
    at.segmented_control(key="view").set_value("Slide").run()
    from core.store.db import Store
    settings = app_env
    with Store(settings.store_path, read_only=True) as store:
        runs = store.cohort_runs("demo", store.model_coverage("demo")["model_key"].iloc[-1])
        row = runs[runs["slide_name"] == slide].iloc[0]
        tiles = store.heatmap(row["model_key"] if "model_key" in row else store.model_coverage("demo")["model_key"].iloc[-1],
                              row["run_key"], "ERBB2")
    t = tiles.iloc[3]
    at.session_state[f"click_single_{slide}"] = {"panel": 0, "x": int(t["x"]) + 5, "y": int(t["y"]) + 5, "n": 1}
    at.run()
    assert_clean(at)
    assert any(f"Tile {int(t['tile_idx'])} of" in s.value for s in at.subheader)
    assert at.get("image") and at.get("plotly_chart")
    marker = viewer_args(at)["panels"][0]["marker"]
    assert (marker["x"], marker["y"]) == (int(t["x"]), int(t["y"]))


def test_a_link_reopens_the_view_and_a_stale_link_falls_back(app_env):
    at = open_slide()
    names = at.selectbox(key="slide").options
    at = open_slide({"cohort": "demo", "slide": names[2], "layer": "gene:CD8A", "cmap": "inferno"})
    assert at.selectbox(key="slide").value == names[2]
    assert at.selectbox(key="layer_a").value == "gene:CD8A"
    assert viewer_args(at)["panels"][0]["title"].endswith("CD8A")
    at = open_slide({"view": "compare-slides", "slides": ",".join(names[:3])})
    assert at.multiselect(key="cmp_slides").value == names[:3]
    assert len(viewer_args(at)["panels"]) == 3
    at = open_slide({"layer": "sig:CD8A,CD3E", "method": "mean_z"})      # a typed signature travels too
    assert at.selectbox(key="layer_a").value == "sig:*"
    assert at.text_input(key="layer_a_genes").value == "CD8A, CD3E"
    assert at.selectbox(key="layer_a_method").value == "mean_z"
    assert "mean_z" in viewer_args(at)["panels"][0]["title"] or viewer_args(at)["panels"][0]["overlay"]
    at = open_slide({"slide": "TCGA-NOT-A-SLIDE.svs", "layer": "gene:NOTAGENE", "cmap": "<script>"})
    notices = " ".join(i.value for i in at.info)
    assert "slide=TCGA" in notices.replace("\\", "") and "NOTAGENE" in notices.replace("\\", "")
    assert at.selectbox(key="slide").value == names[0]
    assert viewer_args(at)["panels"]


def test_a_bad_custom_signature_fails_only_the_viewer(app_env):
    at = open_slide()
    at.selectbox(key="layer_a").select("sig:*").run()
    at.text_input(key="layer_a_genes").input("CD8A, NOTAGENE").run()
    assert_clean(at)
    assert any("NOTAGENE" in e.value.replace("\\", "") for e in at.error)
    assert len(at.tabs) == 2 and at.get("image")     # the tissue-mask tab still renders


def test_domains_fit_from_the_page_show_as_a_layer_and_a_variable(demo_env, tmp_path, monkeypatch):
    """In a store of its own: the Slide page's Fit button fits the cohort's domains; the domain layer
    then colours every tile by its domain with one legend entry per domain, the same colours on every
    slide, and the domain fractions are offered as survival variables."""
    import shutil

    import streamlit as st

    settings, _ = demo_env
    path = tmp_path / "store.duckdb"
    shutil.copy(settings.store_path, path)
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch.setenv("TESSERA_STORE", str(path))
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        at = open_slide()
        assert "domain" not in at.selectbox(key="layer_a").options
        at.button(key="dom_fit").click().run()
        assert_clean(at)
        at = open_slide({"layer": "domain"})
        args = viewer_args(at)
        legend = args["panels"][0]["legend"]["categories"]
        assert len(legend) >= 2 and all(c["label"].startswith("D") for c in legend)
        assert at.get("arrow_data_frame") or at.dataframe
        at.segmented_control(key="view").set_value("Compare slides").run()
        at.selectbox(key="layer_c").select("domain").run()
        assert_clean(at)
        panels = viewer_args(at)["panels"]
        assert panels[0]["legend"] == panels[1]["legend"]           # D1 has one colour on every slide
        sv = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        sv.switch_page("pages/survival.py")
        sv.query_params["sv_km"] = "domain:D1"
        sv.run()
        assert_clean(sv)
        assert sv.selectbox(key="sv_km_kind").value.startswith("Spatial domain")
        assert sv.selectbox(key="sv_km_dom").value == "D1"
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


@pytest.fixture()
def cells_hires_env(demo_env, cells_store, tmp_path, monkeypatch):
    """A store of its own: the tiny world with cells runs (tests/cells_world.py) and a stride-½
    run of the first slide with cells; yields that slide's name."""
    import shutil

    import streamlit as st

    from core.config import load_settings
    from core.engine.access import StoreAccess
    from core.engine.modelhub import load_model
    from core.engine.plan import usable_slides
    from core.engine.predict import predict_slides

    settings, _ = demo_env
    path = tmp_path / "store.duckdb"
    shutil.copy(cells_store, path)
    s = load_settings(demo_dir=settings.demo_dir, store_path=path, device="cpu", workers=0, batch_size=64)
    model = load_model(s.default_model, s.model_dirs)
    with StoreAccess(path).open(wait_s=5.0, or_read_only=True) as store:
        pair = usable_slides(store, "demo")[0]
    [res] = predict_slides(path, [pair], model, tiling=model.tiling(stride=0.5), device="cpu", workers=0)
    assert res.status == "computed"
    from core.store.db import Store
    with Store(path, read_only=True) as store:
        key = store.model_coverage("demo")["model_key"].iloc[-1]
        runs = store.cohort_runs("demo", key)
        row = runs[runs["slide_path"] == str(pair[0])]
        name = row.iloc[0]["slide_name"]
        assert store.has_cells(row.iloc[0]["run_key"])
        assert len(store.high_res_runs(key, row.iloc[0]["fingerprint"], float(row.iloc[0]["mpp"]))) == 1
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch.setenv("TESSERA_STORE", str(path))
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield name
    st.cache_data.clear()
    st.cache_resource.clear()


def overlay_image(panel: dict) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    data = base64.b64decode(panel["overlay"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def composition_table(at):
    """The page's cell-type composition table (AppTest exposes no key on dataframes)."""
    frames = [d.value for d in at.dataframe if "cell type" in d.value.columns]
    assert len(frames) == 1, [list(d.value.columns) for d in at.dataframe]
    return frames[0]


def test_cell_layer_by_type_and_by_gene_with_composition(cells_hires_env):
    at = open_slide({"slide": cells_hires_env})
    options = at.selectbox(key="layer_a").options
    assert "Cells · by type" in options and "Cells · a gene…" in options
    at.selectbox(key="layer_a").select("cells:type").run()
    assert_clean(at)
    p = viewer_args(at)["panels"][0]
    assert p["title"].endswith("Cells · by type") and "cells" in p["caption"]
    chips = p["legend"]["categories"]
    assert len(chips) >= 3 and len({c["color"] for c in chips}) == len(chips)     # one colour per type
    img = overlay_image(p)
    assert img.shape[1] == p["width"] and (img[..., 3] > 0).mean() > 0.01       # slide resolution, cells drawn
    drawn = {"#%02x%02x%02x" % tuple(c) for c in np.unique(img[img[..., 3] > 0][:, :3], axis=0)}
    assert drawn <= {c["color"] for c in chips}
    comp = composition_table(at)
    assert comp["slide"].sum() == pytest.approx(1.0) and "tile" not in comp.columns
    assert at.query_params["layer"] == "cells:type"
    # outlines only: fewer pixels drawn
    at.toggle(key="cell_outline").set_value(True).run()
    assert (overlay_image(viewer_args(at)["panels"][0])[..., 3] > 0).sum() < (img[..., 3] > 0).sum()
    # a click: the tile's H&E and profile, and the tile's composition next to the slide's
    from core.store.db import Store
    with Store(__import__("os").environ["TESSERA_STORE"], read_only=True) as store:
        key = store.model_coverage("demo")["model_key"].iloc[-1]
        runs = store.cohort_runs("demo", key)
        run_key = runs.loc[runs["slide_name"] == cells_hires_env, "run_key"].iloc[0]
        cells = store.run_cells(run_key, ["x", "y"])
    c = cells.iloc[len(cells) // 2]
    at.session_state[f"click_cells_{cells_hires_env}"] = {"panel": 0, "x": int(c["x"]), "y": int(c["y"]), "n": 1}
    at.run()
    assert_clean(at)
    assert any(f"Tile {int(c['tile_idx'])} of" in s.value for s in at.subheader)
    comp = composition_table(at)
    assert comp["tile"].sum() == pytest.approx(1.0) and comp["tile n"].sum() >= 1
    # by gene: a colour bar, the gene picker, and the link carries it
    at.selectbox(key="layer_a").select("cells:gene").run()
    at.selectbox(key="layer_a_cell_gene").select("CD8A").run()
    assert_clean(at)
    p = viewer_args(at)["panels"][0]
    assert p["title"].endswith("Cells · CD8A") and "stops" in p["legend"]
    assert at.query_params["layer"] == "cells:gene:CD8A"
    at2 = open_slide({"slide": cells_hires_env, "layer": "cells:gene:CD8A"})
    assert at2.selectbox(key="layer_a").value == "cells:gene"
    assert at2.selectbox(key="layer_a_cell_gene").value == "CD8A"


def test_resolution_control_draws_the_high_res_run(cells_hires_env):
    at = open_slide({"slide": cells_hires_env, "layer": "gene:ERBB2"})
    assert at.segmented_control(key="resolution").options == ["default grid", "½ tile"]
    default = viewer_args(at)["panels"][0]
    assert default["overlay"]["x_px"] == 0
    at.segmented_control(key="resolution").set_value("½ tile").run()
    assert_clean(at)
    p = viewer_args(at)["panels"][0]
    step = p["overlay"]["width_px"] / overlay_image(default).shape[1] / 2        # half the default pitch
    assert p["overlay"]["x_px"] == pytest.approx(step / 2) and p["overlay"]["y_px"] == p["overlay"]["x_px"]
    assert "summary on the default grid" in p["caption"] and "Moran's I" in p["caption"]
    # the summary strip is the default grid's
    assert p["caption"].split("default grid: ")[1] == default["caption"]
    smooth = overlay_image(p)
    at.toggle(key="hr_smooth").set_value(False).run()
    crisp = overlay_image(viewer_args(at)["panels"][0])
    assert crisp.shape[1] == 2 * overlay_image(default).shape[1] and smooth.shape[1] == 4 * crisp.shape[1]
    # other views and layers have no resolution control; a click picks the tile whose centre was hit
    at.selectbox(key="layer_a").select("gene:CD8A").run()
    assert_clean(at)
    assert at.segmented_control(key="resolution").value == "½ tile"


def test_a_large_slide_draws_its_cells_tile_by_tile(cells_hires_env, monkeypatch):
    """Beyond cell_view.MAX_PX (lowered here so the tiny slide counts as large) the cell layer is a
    tiled overlay of the endpoint: the panel carries a token, and the endpoint's full-zoom tiles
    draw the cells at the slide's resolution."""
    import io
    import urllib.request

    from PIL import Image

    from core.analysis import cell_view

    monkeypatch.setattr(cell_view, "MAX_PX", 256)
    at = open_slide({"slide": cells_hires_env, "layer": "cells:type"})
    p = viewer_args(at)["panels"][0]
    tiled = p["overlay"]["tiled"]
    assert "url" not in p["overlay"] and tiled["format"] == "png" and "tile by tile" in p["caption"]
    port = viewer_args(at)["tile_port"]
    level = int(np.ceil(np.log2(max(p["width"], p["height"]))))
    drawn = 0
    for col in range(int(np.ceil(p["width"] / tiled["tile_size"]))):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/overlay/{tiled['token']}_files/{level}/{col}_0.png") as r:
            drawn += int((np.asarray(Image.open(io.BytesIO(r.read())).convert("RGBA"))[..., 3] > 0).sum())
    assert drawn > 1000
    at.toggle(key="cell_outline").set_value(True).run()          # another drawing: another layer token
    assert viewer_args(at)["panels"][0]["overlay"]["tiled"]["token"] != tiled["token"]
