"""Cohort: patients × slides × clinical × prediction status, with filters and CSV export."""
import streamlit as st

from core.store.db import Store
from pages import _ui

st.header("Cohort")
with _ui.guard():
    _ui.flash()
    cohort, model = _ui.sidebar()
    if cohort:
        runs = _ui.query(Store.cohort_runs, cohort, model)
        clinical = _ui.query(Store.clinical, cohort)
        table = runs.assign(predicted=runs["run_key"].notna()).merge(
            clinical, left_on="patient", right_on="bcr_patient_barcode", how="left")
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("Patients", clinical["bcr_patient_barcode"].nunique())
        c2.metric("Slides", len(runs))
        c3.metric("Predicted", int(table["predicted"].sum()))
        c4.metric("Tiles", int(runs["n_tiles"].fillna(0).sum()))

        f1, f2, f3 = st.columns(3)
        status = f1.multiselect("Slide status", sorted(table["status"].dropna().unique()), key="f_status")
        stages = f2.multiselect("Stage", sorted(table["ajcc_pathologic_tumor_stage"].dropna().astype(str).unique())
                                if "ajcc_pathologic_tumor_stage" in table else [], key="f_stage")
        only_pred = f3.checkbox("Predicted slides only", key="f_pred")
        search = st.text_input("Search patient or slide", key="f_search")
        shown = table
        if status:
            shown = shown[shown["status"].isin(status)]
        if stages:
            shown = shown[shown["ajcc_pathologic_tumor_stage"].astype(str).isin(stages)]
        if only_pred:
            shown = shown[shown["predicted"]]
        if search:
            hit = shown["patient"].fillna("").str.contains(search, case=False, regex=False) | \
                  shown["slide_name"].str.contains(search, case=False, regex=False)
            shown = shown[hit]
        cols = [c for c in ["patient", "slide_name", "status", "link", "selected", "predicted", "n_tiles", "type",
                            "ajcc_pathologic_tumor_stage", "PAM50", "OS", "OS.time", "PFI", "PFI.time",
                            "message"] if c in shown.columns]
        st.dataframe(shown[cols], hide_index=True, width="stretch", key="cohort_table")
        st.download_button("Export CSV", shown.drop(columns=["slide_path", "fingerprint", "run_key"],
                                                    errors="ignore").to_csv(index=False),
                           file_name=f"tessera_{cohort}_cohort.csv", mime="text/csv", key="export_csv")
        if model is not None and bool(runs["run_key"].notna().any()):
            from pages._export_ui import export_panel

            with st.expander("Export the predictions of every predicted slide (AnnData, QuPath GeoJSON, CSV, Parquet)"):
                export_panel(cohort, model, [], [], key="cohort_export")

        multi = runs[runs["patient"].notna()].groupby("patient")["slide_name"].count()
        multi = sorted(multi[multi > 1].index)
        if multi:
            with st.expander(f"Patients with several slides ({len(multi)}): choose the one used in analyses"):
                patient = st.selectbox("Patient", multi, key="sel_patient")
                own = runs[runs["patient"] == patient]
                current = own[own["selected"].fillna(False).astype(bool)]["slide_name"]
                names = list(own["slide_name"])
                choice = st.radio("Slide", names, key="sel_slide",
                                  index=names.index(current.iloc[0]) if len(current) else 0)
                if st.button("Use this slide", key="sel_go", disabled=_ui.role() != "operator",
                             help="Operators only, when login is on."):
                    with _ui.write_store() as store:
                        store.select_slide(cohort, patient, own[own["slide_name"] == choice]["slide_path"].iloc[0])
                    st.session_state["flash"] = f"{patient}: analyses now use {choice}."
                    st.rerun()
