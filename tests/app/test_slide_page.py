"""The Slide page's viewer in AppTest: every control reaches the viewer component's arguments
(what the browser draws), compare views share one colour scale, a click opens the tile, and the
URL's query string reopens a view (a stale one falls back with a notice)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import ROOT, app_env, assert_clean, monkeypatch_module  # noqa: F401


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
