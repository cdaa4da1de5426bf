"""AppTest of the Survival and Associations pages on the tiny demo cohort (predicted + measured),
and of a clinical-only cohort with a 1/2-coded event column imported through the Import page."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.app.test_pages import app_env, assert_clean, monkeypatch_module, run_page  # noqa: F401  (fixtures)
from tests.cells_world import cells_store  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def frame_with(at, column):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_km_every_control(app_env):  # noqa: F811
    at = run_page("pages/survival.py")
    assert_clean(at)
    assert metric(at, "Patients (events)")
    groups = frame_with(at, "HR vs reference")
    assert len(groups) == 2 and groups["n"].sum() == int(metric(at, "Patients (events)").split()[0])
    for split in ("tertile", "quartile", "optimal"):
        at.selectbox(key="sv_km_split").select(split).run()
        assert_clean(at)
        assert len(frame_with(at, "HR vs reference")) == {"tertile": 3, "quartile": 4, "optimal": 2}[split]
    assert "Optimal-cut p (corrected)" in [m.label for m in at.metric]
    at.selectbox(key="sv_km_split").select("custom value").run()
    at.number_input(key="sv_km_cut").set_value(2.5).run()
    assert_clean(at)
    at.selectbox(key="sv_km_gene").select("MKI67").run()
    at.selectbox(key="sv_unit").select("years").run()
    at.number_input(key="sv_horizon").set_value(5.0).run()
    at.selectbox(key="sv_stat").select("q90").run()
    at.selectbox(key="sv_endpoint").select("PFI").run()
    assert_clean(at)
    assert "median (years)" in frame_with(at, "HR vs reference").columns
    # a categorical clinical column: one curve per group, a multi-group log-rank test
    at.selectbox(key="sv_km_kind").select("Clinical column").run()
    at.selectbox(key="sv_km_clin").select("ajcc_pathologic_tumor_stage").run()
    assert_clean(at)
    labels = set(frame_with(at, "HR vs reference")["group"])
    assert labels <= {"Stage I", "Stage II", "Stage III", "Stage IV"} and len(labels) >= 3
    at.text_input(key="sv_km_ref").input("Stage II").run()
    assert_clean(at)
    assert frame_with(at, "HR vs reference").set_index("group").loc["Stage II", "HR vs reference"] == 1.0
    at.text_input(key="sv_km_ref").input("Stage IX").run()           # a typo: a clear message, not a traceback
    assert any("Stage IX" in e.value.replace("\\", "") for e in at.error)
    at.text_input(key="sv_km_ref").input("").run()
    at.selectbox(key="sv_km_kind").select("Signature").run()
    at.selectbox(key="sv_km_sig").select("custom…").run()
    at.text_input(key="sv_km_sig_genes").input("CD8A, NOTAGENE").run()
    assert any("NOTAGENE" in e.value.replace("\\", "") for e in at.error)
    at.text_input(key="sv_km_sig_genes").input("CD8A, GZMB").run()
    at.selectbox(key="sv_km_kind").select("Measured gene").run()
    assert_clean(at)
    assert at.get("download_button")


def test_cox_screen_and_multivariable(app_env):  # noqa: F811
    at = run_page("pages/survival.py")
    screen = frame_with(at, "q")
    assert {"variable", "source", "hr", "ci_lower", "ci_upper", "p", "q", "c_index"} <= set(screen.columns)
    assert (screen["q"].dropna() >= screen["p"].dropna().min()).all()
    at.radio(key="sv_screen_vars").set_value("all").run()
    assert_clean(at)
    assert set(frame_with(at, "q")["source"]) >= {"predicted", "measured"}
    at.selectbox(key="sv_screen_pick").select(frame_with(at, "q")["variable"].iloc[1]).run()
    assert_clean(at)
    at.multiselect(key="sv_mv_covs").set_value(["age", "stage"]).run()
    assert_clean(at)
    terms = frame_with(at, "covariate")
    assert {"biomarker", "age", "stage"} <= set(terms["covariate"])
    assert any(t.startswith("stage[") for t in terms["term"])
    at.number_input(key="sv_mv_pen").set_value(0.1).run()
    assert_clean(at)
    at.selectbox(key="sv_mv_kind").select("Signature").run()
    assert_clean(at)


def test_associations_every_tab(app_env):  # noqa: F811
    at = run_page("pages/associations.py")
    assert_clean(at)
    at.selectbox(key="as_with_clin").select("ajcc_pathologic_tumor_stage").run()
    assert_clean(at)
    assert any(m.label == "Kruskal–Wallis" or "Kruskal" in m.label for m in at.metric)
    at.selectbox(key="as_with_clin").select("age_at_initial_pathologic_diagnosis").run()
    assert_clean(at)
    assert any("Spearman" in m.label for m in at.metric)
    at.selectbox(key="as_with_kind").select("Measured gene").run()
    assert_clean(at)
    at.selectbox(key="as_scr_with_clin").select("PAM50").run()
    at.radio(key="as_scr_vars").set_value("measured").run()
    assert_clean(at)
    assert "q" in frame_with(at, "q").columns
    val = frame_with(at, "pearson_r")
    assert len(val) > 50 and val["pearson_r"].median() > 0.5          # the demo's measurement is the truth
    at.selectbox(key="as_val_gene").select(val["gene"].iloc[-1]).run()
    at.multiselect(key="as_tbl_vars").set_value(["CD8A", "signature:cytolytic", "measured:CD8A"]).run()
    assert_clean(at)
    table = frame_with(at, "bcr_patient_barcode")
    assert "CD8A (predicted mean)" in table.columns and "measured:CD8A" in table.columns
    at.selectbox(key="as_stat").select("median").run()
    assert_clean(at)


@pytest.fixture
def empty_app(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(tmp_path / "nodemo"))
    monkeypatch.setenv("TESSERA_STORE", str(tmp_path / "store.duckdb"))
    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield tmp_path
    st.cache_data.clear()
    st.cache_resource.clear()


def test_clinical_only_cohort_with_r_coding(empty_app):
    """91 patients, 9 deaths coded 2: imported as 9 events, the report says how, KM works without slides."""
    rng = np.random.default_rng(3)
    n = 91
    df = pd.DataFrame({"patient_id": [f"TCGA-ZZ-{i:04d}" for i in range(n)],
                       "time": rng.integers(30, 3000, n), "status": [2] * 9 + [1] * 82,
                       "grade": rng.choice(["G1", "G2", "G3"], n)})
    path = empty_app / "r_table.csv"
    df.to_csv(path, index=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/importer.py")
    at.run()
    at.text_input(key="imp_name").input("rtable")
    at.text_input(key="imp_clin").input(str(path))
    at.button(key="imp_go").click().run()
    assert_clean(at)
    shown = [i.value.replace("\\", "") for i in at.info]     # messages are Markdown-escaped on the page
    assert any("1/2 coding read as 2 = event, 1 = censored" in m and "9 events" in m for m in shown), shown
    at.switch_page("pages/survival.py")
    at.run()
    assert_clean(at)
    assert metric(at, "Patients (events)") == "91 (9)"
    assert set(frame_with(at, "HR vs reference")["group"]) == {"G1", "G2", "G3"}
    # measured expression for the clinical-only cohort, through the Import page, then a measured KM
    genes = pd.DataFrame(rng.normal(5, 1, (3, n)), index=["ESR1", "ERBB2", "MKI67"],
                         columns=[f"TCGA-ZZ-{i:04d}-01A" for i in range(n)])
    genes.iloc[0, :9] += 3                         # the 9 who died: high ESR1
    genes.to_csv(empty_app / "bulk.csv")
    at.switch_page("pages/importer.py")
    at.run()
    at.text_input(key="meas_path").input(str(empty_app / "bulk.csv"))
    at.button(key="meas_go").click().run()
    assert_clean(at)
    assert any("3 genes × 91 patients" in s.value.replace("\\", "") for s in at.success)
    at.switch_page("pages/survival.py")
    at.run()
    at.selectbox(key="sv_km_kind").select("Measured gene").run()
    at.selectbox(key="sv_km_meas").select("ESR1").run()
    assert_clean(at)
    groups = frame_with(at, "HR vs reference").set_index("group")
    assert groups["events"].sum() == 9 and groups["events"].iloc[1] > groups["events"].iloc[0]   # high ESR1 = the deaths
    # the override: read as 0/1, the 2s are unknown codes and 82 "events" — said, not silent
    at.switch_page("pages/importer.py")
    at.run()
    at.text_input(key="imp_name").input("rtable01")
    at.text_input(key="imp_clin").input(str(path))
    at.selectbox(key="imp_coding").select("0/1").run()
    at.button(key="imp_go").click().run()
    assert any("as chosen" in i.value.replace("\\", "") for i in at.info)


def test_real_tcga_cdr_with_real_bulk_as_measured(empty_app, shared_data):
    """The real TCGA-CDR BRCA table (clinical only) with the real TCGA-BRCA bulk mRNA (keyed by the
    barcode's last 4 characters): KM, the measured Cox screen, a multivariable model and an
    association, all on the pages."""
    import os

    from core.cohort.importer import import_cohort, import_measured
    from core.store.db import Store

    bulk = pd.concat([pd.read_csv(shared_data / "bulk" / f) for f in ("train_mrna.csv", "test_mrna.csv")])
    bulk.to_csv(empty_app / "bulk.csv", index=False)
    with Store(os.environ["TESSERA_STORE"]) as store:
        import_cohort(store, "tcga-brca", None, shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
        result = import_measured(store, "tcga-brca", empty_app / "bulk.csv")
    assert result.matrix.shape == (220, 200) and result.key == "suffix4"
    st.cache_data.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/survival.py")
    at.run()
    at.selectbox(key="sv_km_kind").select("Measured gene").run()
    assert_clean(at)
    assert int(metric(at, "Patients (events)").split()[0]) == 219          # 220 with bulk, 1 without OS.time
    screen = frame_with(at, "q")
    assert len(screen) == 200 and set(screen["source"]) == {"measured"}
    at.selectbox(key="sv_mv_kind").select("Measured gene").run()
    at.multiselect(key="sv_mv_covs").set_value(["age", "stage"]).run()
    assert_clean(at)
    assert {"biomarker", "age", "stage"} <= set(frame_with(at, "covariate")["covariate"]), [e.value for e in at.error]
    at.switch_page("pages/associations.py")
    at.run()
    at.selectbox(key="as_by_kind").select("Measured gene").run()
    at.selectbox(key="as_with_clin").select("histological_type").run()
    assert_clean(at)
    assert any("Kruskal" in m.label for m in at.metric)


@pytest.fixture
def cells_app(demo_env, cells_store, tmp_path, monkeypatch):  # noqa: F811
    """The app on a copy of the tiny demo store whose first slides have cells runs."""
    import shutil

    settings, _ = demo_env
    path = tmp_path / "store.duckdb"
    shutil.copy(cells_store, path)
    monkeypatch.setenv("TESSERA_DEMO_DIR", str(settings.demo_dir))
    monkeypatch.setenv("TESSERA_STORE", str(path))
    monkeypatch.chdir(ROOT)
    st.cache_data.clear()
    st.cache_resource.clear()
    yield path
    st.cache_data.clear()
    st.cache_resource.clear()


def test_cell_biomarkers_in_survival_and_associations(cells_app):
    """A cell biomarker picked on the Survival page splits exactly the patients that have cells,
    at the median of the values :func:`core.analysis.variables.variable_values` gives (the same
    function as ``cells biomarkers``); on Associations its Spearman ρ with age is scipy's on
    those values (an independent computation)."""
    from scipy.stats import spearmanr

    from core.analysis.variables import parse_variable, variable_values
    from core.store.db import Store

    at = run_page("pages/survival.py")
    assert_clean(at)
    assert "Cell biomarker" in at.selectbox(key="sv_km_kind").options
    at.selectbox(key="sv_km_kind").select("Cell biomarker").run()
    assert_clean(at)
    at.selectbox(key="sv_km_cellkind").select("Cell-type fraction").run()
    at.selectbox(key="sv_km_celltype").select("t_cell").run()
    assert_clean(at)
    with Store(cells_app, read_only=True) as store:
        key = store.model_coverage("demo")["model_key"].iloc[-1]
        values = variable_values(store, "demo", parse_variable("cellfrac:t_cell"), model_key=key)
    groups = frame_with(at, "HR vs reference")
    assert len(groups) == 2
    n_total = int(metric(at, "Patients (events)").split()[0])
    assert groups["n"].sum() == n_total and 2 <= n_total <= len(values.dropna())
    # density near another type, by distance
    at.selectbox(key="sv_km_cellkind").select("Density of a type near another").run()
    at.selectbox(key="sv_km_cellnear").select("malignant_epithelial").run()
    at.number_input(key="sv_km_celld").set_value(30.0).run()
    assert_clean(at)
    assert len(frame_with(at, "HR vs reference")) == 2

    at = run_page("pages/associations.py")
    at.selectbox(key="as_by_kind").select("Cell biomarker").run()
    at.selectbox(key="as_by_cellkind").select("Cell-type fraction").run()
    at.selectbox(key="as_by_celltype").select("t_cell").run()
    at.selectbox(key="as_with_clin").select("age_at_initial_pathologic_diagnosis").run()
    assert_clean(at)
    rho = next(float(m.value) for m in at.metric if "Spearman" in m.label)
    with Store(cells_app, read_only=True) as store:
        age = variable_values(store, "demo", parse_variable("clinical:age_at_initial_pathologic_diagnosis"),
                              model_key=key)
    both = pd.concat([values.rename("v"), age.rename("age")], axis=1).dropna()
    assert rho == pytest.approx(spearmanr(both["v"], both["age"]).statistic, abs=5e-3)
