"""The Import page: a real folder of mixed slides + the real TCGA-CDR table, through the UI."""
import os
import tempfile
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.unit.test_importer import FROZEN_SAME_PATIENT, cohort_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
# the folders the tests' servers may read: pytest's temporary folders and the shared real data
TEST_ROOTS = os.pathsep.join([tempfile.gettempdir(), str(ROOT.parent / "shared")])


def slides_table(at):
    return next(d.value for d in at.dataframe if "slide_name" in d.value.columns)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(tmp_path / "nodemo"))
    monkeypatch.setenv("TESSERA_STORE", str(tmp_path / "store.duckdb"))
    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TESSERA_DATA_ROOTS", TEST_ROOTS)
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/importer.py")
    at.run()
    yield at
    st.cache_data.clear()
    st.cache_resource.clear()


def test_import_through_the_ui(app, cohort_dir, shared_data):  # noqa: F811
    at = app
    assert not at.exception
    at.text_input(key="imp_name").input("brca-ui")
    at.text_input(key="imp_slides").input(str(cohort_dir))
    at.text_input(key="imp_clin").input(str(shared_data / "clinical" / "TCGA-CDR_BRCA.csv"))
    at.button(key="imp_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("Imported 'brca-ui'" in s.value.replace("\\", "") for s in at.success)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Files"] == "9" and metrics["Patients without slides"] == "1086"
    table = slides_table(at)
    assert {"needs_mpp", "unsupported", "unreadable", "duplicate", "no_tissue", "not_a_slide", "ok"} <= set(table["status"])

    # fix the frozen slide's µm/px in the UI
    at.selectbox(key="imp_fix_slide").select(FROZEN_SAME_PATIENT).run()
    at.number_input(key="mpp_imp").set_value(0.5).run()
    at.button(key="FormSubmitter:mppfix_imp-Save µm/px").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Saved 0.5 µm/px" in s.value.replace("\\", "") for s in at.success)
    table = slides_table(at).set_index("slide_name")
    assert table.loc[FROZEN_SAME_PATIENT, "status"] == "ok"


def test_bad_folder_is_a_clear_message(app, shared_data, tmp_path):
    at = app
    at.text_input(key="imp_slides").input(str(tmp_path / "nonexistent"))
    at.text_input(key="imp_clin").input(str(shared_data / "clinical" / "TCGA-CDR_BRCA.csv"))
    at.button(key="imp_go").click().run()
    assert not at.exception
    assert any("No such slides folder" in e.value.replace("\\", "") for e in at.error)


@pytest.mark.parametrize("typed", ["/", "/etc", "../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "link"])
def test_paths_outside_the_data_roots_are_refused(app, tmp_path, typed):
    """The browser is untrusted: nothing outside the data roots is walked, listed or read, and the
    refusal echoes nothing about the file (not even whether it exists)."""
    import duckdb

    at = app
    if typed == "link":   # a symlink inside the roots that points outside them
        (tmp_path / "link").symlink_to("/etc")
        typed = str(tmp_path / "link")
    at.text_input(key="imp_name").input("probe")
    at.text_input(key="imp_slides").input(typed)
    at.text_input(key="imp_clin").input("/etc/passwd")
    at.button(key="imp_go").click().run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "reads only inside its data folders" in errors and "root:" not in errors
    store = tmp_path / "store.duckdb"
    if store.exists():
        with duckdb.connect(str(store), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM cohorts").fetchone()[0] == 0


def test_slide_page_previews_mask_and_grid_of_a_real_svs(app, cohort_dir, shared_data):  # noqa: F811
    from core.cohort.importer import import_cohort
    from core.store.db import Store
    import os

    with Store(os.environ["TESSERA_STORE"]) as store:
        import_cohort(store, "real", cohort_dir, shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
    st.cache_data.clear()
    at = app
    at.switch_page("pages/slide.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="slide").value.startswith("TCGA-A2-A0T2-01Z-00-DX1")
    captions = [c for img in at.get("image") for c in img.captions]
    assert any("57 tiles of 112 µm (224 px at level 0)" in c for c in captions), captions
