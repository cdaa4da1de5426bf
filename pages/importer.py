"""Import: a folder of slides and/or a clinical table → a cohort, with a link report; µm/px fixes;
a measured expression matrix for a cohort."""
from pathlib import Path

import pandas as pd
import streamlit as st

from core.safety import md_escape
from core.store.db import Store
from core.vocab import ENDPOINTS, SlideStatus
from pages import _ui


def mapping_widgets(clinical_path: Path):
    """For generic tables: choose the patient, time and event columns."""
    from core.cohort.clinical import ColumnMapping, preview_columns, suggest_mapping

    columns = preview_columns(clinical_path)
    guess = suggest_mapping(columns)
    guess_ep = next(iter(guess.endpoints.items()), (None, (None, None))) if guess else (None, (None, None))

    def pick(label, default, key):
        options = ["—", *columns]
        return st.selectbox(label, options, index=options.index(default) if default in options else 0, key=key)

    c1, c2, c3, c4, c5 = st.columns(5)
    with c1:
        patient = pick("Patient id", guess.patient if guess else None, "imp_pat")
    endpoint = c2.selectbox("Endpoint", list(ENDPOINTS), key="imp_ep")
    with c3:
        time_col = pick("Time", guess_ep[1][0] if isinstance(guess_ep[1][0], str) else None, "imp_time")
    with c4:
        event_col = pick("Event", guess_ep[1][1], "imp_event")
    unit = c5.selectbox("Time unit", ["days", "months", "years"], key="imp_unit",
                        index=["days", "months", "years"].index(guess.time_unit) if guess else 0)
    if patient == "—":
        st.warning("Choose the column that holds the patient id.")
        return None
    endpoints = {endpoint: (time_col, event_col)} if "—" not in (time_col, event_col) else {}
    return ColumnMapping(patient=patient, endpoints=endpoints, time_unit=unit)


def import_form() -> None:
    from core.cohort.importer import import_cohort, read_mpp_overrides

    name = st.text_input("Cohort name", value="my-cohort", key="imp_name", max_chars=80)
    slides_dir = st.text_input("Slides folder on this server (searched recursively; leave empty for a "
                               "clinical-only cohort)", key="imp_slides")
    c1, c2 = st.columns(2)
    clinical_path = c1.text_input("Clinical file on this server (TCGA-CDR, GDC export, CSV/TSV/XLSX)", key="imp_clin")
    upload = c2.file_uploader("…or upload it", type=["csv", "tsv", "txt", "xlsx", "gz"], key="imp_upload")
    mpp_upload = st.file_uploader("Optional µm/px overrides (CSV with columns slide,mpp)", type=["csv"], key="imp_mpp")
    c1, c2 = st.columns(2)
    fmt = c1.selectbox("Clinical format", ["auto-detect", "tcga-cdr", "gdc", "generic"], key="imp_fmt")
    coding = c2.selectbox("Event coding", ["auto", "0/1", "1/2"], key="imp_coding",
                          help="auto: detected per column and stated in the report. 0/1: 1 = event, 0 = censored. "
                               "1/2: the R Surv convention, 2 = event, 1 = censored. Words (Dead/Alive, "
                               "TRUE/FALSE, 1:DECEASED) are always read as they say.")
    clinical = (_ui.saved_upload(upload) if upload else
                _ui.server_path(clinical_path, kind="clinical file") if clinical_path else None)
    replace = st.checkbox("Replace the cohort if it exists", key="imp_replace",
                          help="Importing under an existing name replaces its slides and clinical table.")
    mapping = None
    if clinical is not None and fmt == "generic":
        if not clinical.is_file():
            st.error("The clinical path is not a file.")
            return
        mapping = mapping_widgets(clinical)
    if st.button("Import cohort", type="primary", key="imp_go"):
        if not slides_dir and clinical is None:
            st.error("Give a clinical file (a clinical-only cohort), a slides folder (slides for an existing "
                     "cohort), or both.")
            return
        folder = _ui.server_path(slides_dir, kind="slides folder") if slides_dir else None
        if folder is not None and not folder.is_dir():
            st.error("The slides path is not a folder.")
            return
        if clinical is not None and not clinical.is_file():
            st.error("The clinical path is not a file.")
            return
        overrides = read_mpp_overrides(_ui.saved_upload(mpp_upload)) if mpp_upload else None
        bar = st.progress(0.0, text="Scanning slides…")
        with _ui.write_store() as store:
            report = import_cohort(store, name, folder, clinical, mapping=mapping, replace=replace,
                                   fmt=None if fmt == "auto-detect" else fmt, mpp_overrides=overrides,
                                   event_coding=coding,
                                   progress=lambda i, n, f: bar.progress(i / max(n, 1), text=f"Probing {f}"))
        bar.empty()
        counts = report.counts()
        st.success(f"Imported '{md_escape(name)}': {counts['files']} files found, {counts.get('ok', 0)} slides ready, "
                   f"{counts['linked']} slides linked to a patient; the clinical table "
                   f"({report.clinical_format}) has {counts['patients']} patients.")
        for issue in report.issues:
            if issue["kind"] == "slides":
                (st.info if issue["severity"] == "info" else st.warning)(md_escape(issue["message"]))
            elif issue["kind"] == "clinical" and issue["subject"] in ENDPOINTS and issue["severity"] != "warning":
                # how each event column was read (or why it could not be): said up front, not in a table
                (st.error if issue["severity"] == "error" else st.info)(md_escape(issue["message"]))
        st.session_state["imp_report_cohort"] = name   # the link report below shows the new cohort


def measured_form(cohorts: list[str]) -> None:
    """A genes × patients matrix (CSV/TSV/Parquet) for a cohort: the measured variables."""
    from core.cohort.importer import import_measured

    c1, c2, c3 = st.columns(3)
    cohort = c1.selectbox("Cohort", cohorts, key="meas_cohort")
    path = c2.text_input("Matrix file on this server", key="meas_path")
    upload = c3.file_uploader("…or upload it", type=["csv", "tsv", "txt", "gz", "parquet"], key="meas_upload")
    st.caption("Genes × patients or patients × genes, keyed by full barcode, patient barcode, or the barcode's "
               "last 4 characters; the orientation is detected from the ids.")
    if st.button("Import matrix", key="meas_go"):
        matrix = _ui.saved_upload(upload) if upload else _ui.server_path(path, kind="matrix file") if path else None
        if matrix is None or not matrix.is_file():
            st.error("Give a matrix file inside the server's data folders, or upload one.")
            return
        with _ui.write_store() as store:
            result = import_measured(store, cohort, matrix)
        st.success(md_escape(f"{cohort}: {result.summary()}"))
        for issue in result.issues:
            (st.warning if issue.severity != "info" else st.info)(md_escape(issue.message))


def report(cohort: str) -> None:
    slides = _ui.query(Store.cohort_slides, cohort)
    clinical = _ui.query(Store.clinical, cohort)
    issues = _ui.query(Store.cohort_issues, cohort)
    patients = set(clinical["bcr_patient_barcode"].astype(str))
    without = sorted(patients - set(slides["patient"].dropna()))
    counts = slides["status"].value_counts()
    cols = st.columns(5)
    cols[0].metric("Files", len(slides))
    cols[1].metric("Ready", int(counts.get(SlideStatus.OK, 0)))
    cols[2].metric("Slides linked", int((slides["link"] == "linked").sum()),
                   help="Slides whose TCGA barcode names a patient of the clinical table.")
    cols[3].metric("Patients in the table", len(patients))
    cols[4].metric("Patients without slides", len(without))
    summary = pd.DataFrame({"status": counts.index, "slides": counts.values,
                            "meaning": [SlideStatus(s).help for s in counts.index]})
    st.dataframe(summary, hide_index=True, key="imp_summary")
    shown = ["slide_name", "patient", "status", "link", "selected", "slide_type", "mpp", "mpp_source", "vendor",
             "levels", "n_tiles", "tissue_fraction", "message"]
    st.dataframe(slides[shown], hide_index=True, width="stretch", key="imp_slides_table")
    with st.expander(f"Patients without slides ({len(without)})"):
        st.dataframe(pd.DataFrame({"patient": without}), hide_index=True, key="imp_without")
    if not issues.empty:
        with st.expander(f"Clinical table: {len(issues)} notes"):
            st.dataframe(issues, hide_index=True, width="stretch", key="imp_issues")
    st.download_button("Export link report (CSV)", slides.drop(columns=["fingerprint"]).to_csv(index=False),
                       file_name=f"tessera_{cohort}_link_report.csv", mime="text/csv", key="imp_export")
    needs = slides[slides["status"] == SlideStatus.NEEDS_MPP]
    if not needs.empty:
        st.subheader("Slides that need µm/px")
        choice = st.selectbox("Slide", list(needs["slide_name"]), key="imp_fix_slide")
        row = needs[needs["slide_name"] == choice].iloc[0]
        _ui.mpp_fix_form(cohort, row["slide_name"], row["slide_path"], key="imp")


st.header("Import a cohort")
with _ui.guard():
    _ui.flash()
    _ui.require_operator("Importing cohorts")
    with st.expander("New import", expanded=not _ui.store_path().exists()), _ui.guard():
        import_form()
    cohorts = _ui.query(Store.cohorts) if _ui.store_path().exists() else []
    if cohorts:
        st.subheader("Link report")
        if st.session_state.get("imp_report_cohort") not in cohorts:
            st.session_state.pop("imp_report_cohort", None)
        cohort = st.selectbox("Cohort", cohorts, key="imp_report_cohort")
        report(cohort)
        with st.expander("Measured expression (bulk RNA for validation and measured variables)"):
            source = _ui.query(Store.measured_source, cohort)
            if source:
                st.caption(f"{cohort} has a measured matrix: {source.get('summary', '')} (from {source.get('file')}).")
            with _ui.guard():
                measured_form(cohorts)
