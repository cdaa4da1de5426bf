"""Streamlit AppTest: every page renders on a tiny demo cohort, and key widgets work."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["pages/cohort.py", "pages/slide.py", "pages/crossmodal.py", "pages/survival.py", "pages/associations.py",
         "pages/measured.py", "pages/predictions.py"]


@pytest.fixture(scope="module")
def app_env(demo_env, monkeypatch_module):
    settings, _ = demo_env
    monkeypatch_module.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch_module.chdir(ROOT)
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    return settings


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def assert_clean(at: AppTest) -> None:
    """No exception, and nothing the pages' guard had to catch as unexpected."""
    assert not at.exception, [e.value for e in at.exception]
    assert not any("Something went wrong" in e.value for e in at.error), [e.value for e in at.error]


def run_page(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    if page != PAGES[0]:
        at.switch_page(page)
        at.run()
    return at


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_exception(app_env, page):
    at = run_page(page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="cohort").value == "demo"


def test_cohort_table_filter_and_export(app_env):
    at = run_page("pages/cohort.py")
    assert at.metric[0].value == "60"
    at.text_input(key="f_search").input("TCGA").run()
    assert_clean(at)
    assert at.get("download_button")


def test_crossmodal_gallery_and_profile(app_env):
    at = run_page("pages/crossmodal.py")
    images = at.get("image")
    assert len(images) >= 24 + 1 + 12  # gene gallery, the query tile, similar tiles
    at.number_input(key="xm_tile").set_value(2).run()
    assert_clean(at)
    captions = [c for img in at.get("image") for c in img.captions]
    assert any(c.startswith("tile 2 at") for c in captions)
    at.radio(key="xm_kind").set_value("Signature").run()
    at.text_input(key="xm_sig").input("CD8A, cd3e").run()          # gene → morphology by a signature
    assert_clean(at)
    assert any("CD8A, CD3E" in c.value for c in at.caption)


def test_crossmodal_profile_in_the_joint_space_with_caps_filter_and_composition(app_env):
    """A pasted profile → tiles closest in the joint space, at most one per slide, the composition
    table; every result links to the Slide page at its tile; the predicted space says its score."""
    at = run_page("pages/crossmodal.py")
    at.radio(key="xm_kind").set_value("Profile").run()
    at.text_area(key="xm_profile_text").input("CD8A 4\nGZMB 3\nCD3E 3.5\nNOTAGENE 2").run()
    assert_clean(at)
    assert at.radio(key="xm_find_profile_space").value == "joint"
    at.number_input(key="xm_find_profile_cap_slide").set_value(1).run()
    at.toggle(key="xm_find_profile_composition").set_value(True).run()
    assert_clean(at)
    assert any("closest in the joint space" in c.value for c in at.caption)
    assert any("NOTAGENE" in i.value for i in at.info)
    frames = [d.value for d in at.dataframe]  # in page order: the find tab's table comes first
    results = next(v for v in frames if "open" in v.columns)
    assert at.number_input(key="xm_find_profile_cap_slide").value == 1, [n.key for n in at.number_input]
    assert results["slide"].is_unique, (len(results), results["slide"].value_counts().head(3))
    assert results["open"].str.startswith("slide?slide=").all()
    comp = next(v for v in frames if "cell type" in v.columns)
    assert comp["cohort"].sum() == pytest.approx(1.0, abs=1e-3)
    at.radio(key="xm_find_profile_space").set_value("predicted").run()
    assert_clean(at)
    assert any("z-projection" in c.value.replace("\\", "") for c in at.caption), [c.value for c in at.caption]


def test_survival_reports_hr_and_p(app_env):
    at = run_page("pages/survival.py")
    labels = [m.label for m in at.metric]
    assert "Log-rank p" in labels and "Patients (events)" in labels
    at.selectbox(key="sv_endpoint").select("PFI").run()
    assert_clean(at)


def test_no_store_gives_guidance(tmp_path, monkeypatch):
    import streamlit as st

    monkeypatch.setenv("TESSERA_DEMO_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(ROOT)
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    st.cache_resource.clear()
    assert_clean(at)
    assert any("make run" in i.value for i in at.info)


def test_an_older_store_is_upgraded_on_first_page_load(tmp_path, monkeypatch):
    """A v3 store (written by an older Tessera) is upgraded in place by the app, not an error page."""
    import streamlit as st

    from core.store.db import SCHEMA_VERSION, Store
    from tests.unit.test_store_layout import _make_v3

    path = tmp_path / "old.duckdb"
    _make_v3(path)
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("TESSERA_STORE", str(path))
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    st.cache_resource.clear()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]
    assert any("no cohort yet" in i.value for i in at.info)
    with Store(path, read_only=True) as store:
        assert store.con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert store.run_ids(["f3a1", "0b7c", "9e22"]) == {"f3a1": 1, "0b7c": 2, "9e22": 3}
