"""What a new user tripped over (issue 10): pickers that reset on a page switch, a newer model
without predictions taken as the default, the old cohort in the link report after an import, a CLI
command as the only pointer for an unpredicted slide, a bad signature blanking the whole page."""
import shutil
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import assert_clean

ROOT = Path(__file__).resolve().parents[2]
from tests.app.test_import_page import TEST_ROOTS  # noqa: E402


@pytest.fixture
def store_copy(demo_env, tmp_path, monkeypatch):
    """The tiny demo cohort in a store of this test's own (so registering a model leaves the others alone)."""
    settings, _ = demo_env
    path = tmp_path / "store.duckdb"
    shutil.copy(settings.store_path, path)
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch.setenv("TESSERA_STORE", str(path))
    monkeypatch.setenv("TESSERA_DATA_ROOTS", TEST_ROOTS)
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield path
    st.cache_data.clear()
    st.cache_resource.clear()


def _second_model_without_predictions(path: Path) -> str:
    from core.store.db import Store

    with Store(path) as store:
        genes = store.model_info(store.models()["model_key"].iloc[0]).genes
        return store.register_model("newer-model", "0123456789ab", genes, ["tumour"], {"tile_um": 112.0, "mpp": 1.0})


def test_default_model_has_predictions_and_the_other_says_it_has_none(store_copy):
    newer = _second_model_without_predictions(store_copy)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert_clean(at)
    picker = at.selectbox(key="model")
    assert picker.value.startswith("demo-synthetic@"), picker.value       # not the newest, which has none
    assert any("no predictions for demo" in o for o in picker.options), picker.options
    assert any(o.startswith("newer-model · v 01234567") for o in picker.options), picker.options
    assert int(at.metric[2].value) > 0                                     # Cohort page: slides predicted


def test_choices_survive_a_page_switch(store_copy):
    newer = _second_model_without_predictions(store_copy)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.selectbox(key="model").set_value(newer).run()
    assert_clean(at)
    at.switch_page("pages/slide.py").run()
    assert_clean(at)
    assert at.selectbox(key="model").value == newer
    # an unpredicted slide points to the Predictions page first, the CLI second
    assert any("Predictions page" in i.value.replace("\\", "") for i in at.info), [i.value for i in at.info]
    assert at.get("page_link"), "no link to the Predictions page"
    at.switch_page("pages/survival.py").run()
    assert at.selectbox(key="model").value == newer


def test_link_report_shows_the_new_import(store_copy, cohort_dir, shared_data):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/importer.py").run()
    assert at.selectbox(key="imp_report_cohort").value == "demo"
    at.text_input(key="imp_name").input("brca-new")
    at.text_input(key="imp_slides").input(str(cohort_dir))
    at.text_input(key="imp_clin").input(str(shared_data / "clinical" / "TCGA-CDR_BRCA.csv"))
    at.button(key="imp_go").click().run()
    assert_clean(at)
    assert at.selectbox(key="imp_report_cohort").value == "brca-new"
    done = next(s.value.replace("\\", "") for s in at.success if "Imported 'brca-new'" in s.value.replace("\\", ""))
    assert "slides linked to a patient" in done and "the clinical table" in done and "1092 patients" in done


def test_tertile_split_keeps_every_patient(store_copy):
    """Tertiles are three curves (low / mid / high), so no patient silently leaves the comparison."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/survival.py").run()
    at.selectbox(key="sv_km_split").select("tertile").run()
    assert_clean(at)
    groups = next(d.value for d in at.dataframe if "HR vs reference" in d.value.columns)
    n = int(next(m.value for m in at.metric if m.label == "Patients (events)").split()[0])
    assert len(groups) == 3 and groups["n"].sum() == n


from tests.unit.test_importer import cohort_dir  # noqa: E402,F401  (fixture)
