"""Clinical import: real TCGA-CDR / GDC files (skipped without ../shared/data) and synthetic bad input.

Golden numbers come from the files themselves, recomputed here with plain pandas, or from the
shared data README (BRCA: 1,097 rows, 5 ``Redacted``, 151 OS events).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.cohort.clinical import (ENDPOINT_COLUMNS, ColumnMapping, detect_format, preview_columns, read_clinical,
                           suggest_mapping)
from core.errors import ClinicalFormatError

CDR_XLSX = "TCGA-CDR-SupplementalTableS1.xlsx"


def messages(result, severity=None) -> str:
    return "\n".join(i.message for i in result.issues if severity in (None, i.severity))


def write_csv(path, rows: dict, sep=","):
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


@pytest.fixture(scope="module")
def cdr_xlsx(shared_data):
    """The 11,160-patient workbook, read once for the module (~7 s)."""
    return read_clinical(shared_data / "clinical" / CDR_XLSX)


# ---------------------------------------------------------------- real files

def test_cdr_brca_csv(shared_data):
    """README: 1,097 patients, 5 Redacted, 151 OS events (all 151 among the kept 1,092)."""
    res = read_clinical(shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
    assert res.format == "tcga-cdr" and res.n_rows_read == 1097 and res.n_patients == 1092
    assert res.n_events["OS"] == 151
    assert list(res.table.columns[:9]) == ["bcr_patient_barcode", *ENDPOINT_COLUMNS]
    redacted = [i for i in res.issues if i.column == "Redaction"]
    assert len(redacted) == 1 and len(redacted[0].patients) == 5 and redacted[0].severity == "warning"
    assert res.table["bcr_patient_barcode"].str.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}").all()
    assert {"type", "gender", "ajcc_pathologic_tumor_stage"} <= set(res.table.columns)
    assert (res.table["OS.time"].dropna() >= 0).all()


def test_cdr_lihc_csv_matches_plain_pandas(shared_data):
    path = shared_data / "clinical" / "TCGA-CDR_LIHC.csv"
    raw = pd.read_csv(path)
    kept = raw[raw["Redaction"].isna()]
    res = read_clinical(path)
    assert res.n_patients == len(kept) and res.n_events["OS"] == int((kept["OS"] == 1).sum())
    assert res.n_events["PFI"] == int((kept["PFI"] == 1).sum())


def test_cdr_xlsx_sheet_matches_brca_csv(shared_data, cdr_xlsx):
    """README: sheet TCGA-CDR holds 11,160 patients; the redacted ones are all reported."""
    (redacted,) = [i for i in cdr_xlsx.issues if i.column == "Redaction"]
    assert cdr_xlsx.n_rows_read == 11160 == cdr_xlsx.n_patients + len(redacted.patients)
    assert "Unnamed: 0" not in cdr_xlsx.table.columns
    brca_x = cdr_xlsx.table[cdr_xlsx.table["type"] == "BRCA"].reset_index(drop=True)
    brca_c = read_clinical(shared_data / "clinical" / "TCGA-CDR_BRCA.csv").table
    pd.testing.assert_frame_equal(brca_x, brca_c, check_dtype=False)


def test_gdc_example(shared_data):
    """OS events = distinct cases with vital_status Dead in the raw export (plain pandas)."""
    path = shared_data / "clinical" / "gdc_clinical_example.csv"
    raw = pd.read_csv(path, na_values=["'--"])
    dead = raw.loc[raw["vital_status"] == "Dead", "case_submitter_id"].nunique()
    assert detect_format(path) == "gdc"
    res = read_clinical(path)
    assert res.format == "gdc" and res.n_rows_read == 28 and res.n_patients == 14
    assert res.table["bcr_patient_barcode"].is_unique
    assert res.n_events["OS"] == dead
    t = res.table.set_index("bcr_patient_barcode")
    first = raw.groupby("case_submitter_id").agg(death=("days_to_death", "max"),
                                                 follow=("days_to_last_follow_up", "max"),
                                                 vital=("vital_status", "first"), age=("age_at_diagnosis", "first"))
    expected = np.where(first["vital"] == "Dead", first["death"], first["follow"])
    np.testing.assert_array_equal(t.loc[first.index, "OS.time"].to_numpy(), expected)
    np.testing.assert_allclose(t.loc[first.index, "age_at_diagnosis_years"], first["age"] / 365.25)
    assert t[["DSS", "DFI", "PFI", "PFI.time"]].isna().all().all()
    assert {"gender", "ajcc_pathologic_stage", "primary_diagnosis"} <= set(t.columns)
    assert "treatment_type" in messages(res) and "DSS" in messages(res, "info")


def test_detect_and_preview_real_files(shared_data, cdr_xlsx):
    d = shared_data / "clinical"
    assert detect_format(d / "TCGA-CDR_BRCA.csv") == "tcga-cdr" and cdr_xlsx.format == "tcga-cdr"
    cols = preview_columns(d / CDR_XLSX)
    assert "bcr_patient_barcode" in cols and "PFI.time" in cols and len(cols) == 34


# ---------------------------------------------------------------- generic tables

def test_cbioportal_months_guessed(tmp_path):
    path = write_csv(tmp_path / "cbio.tsv", {
        "SAMPLE_ID": ["TCGA-AA-0001-01", "TCGA-AA-0002-01", "TCGA-AA-0003-01"],
        "OS_MONTHS": [12.0, 24.0, None], "OS_STATUS": ["1:DECEASED", "0:LIVING", "0:LIVING"],
        "PFS_MONTHS": [6, 24, 30], "PFS_STATUS": ["1:PROGRESSION", "0:CENSORED", "0:CENSORED"],
        "AGE": [50, 60, 70]}, sep="\t")
    mapping = suggest_mapping(preview_columns(path))
    assert mapping.patient == "SAMPLE_ID" and mapping.time_unit == "months"
    assert mapping.endpoints == {"OS": ("OS_MONTHS", "OS_STATUS"), "PFI": ("PFS_MONTHS", "PFS_STATUS")}
    res = read_clinical(path)
    t = res.table
    assert res.format == "generic" and list(t["bcr_patient_barcode"]) == ["TCGA-AA-0001", "TCGA-AA-0002",
                                                                         "TCGA-AA-0003"]
    np.testing.assert_allclose(t["OS.time"][:2], [12 * 30.4375, 24 * 30.4375])
    assert list(t["OS"]) == [1, 0, 0] and list(t["PFI"]) == [1, 0, 0] and list(t["AGE"]) == [50, 60, 70]
    assert "OS_MONTHS" not in t.columns and "shortened" in messages(res, "info")
    assert any(i.column == "OS.time" and i.patient == "TCGA-AA-0003" for i in res.issues_of("info"))


def test_xlsx_generic_with_mapping(tmp_path):
    path = tmp_path / "cohort.xlsx"
    pd.DataFrame({"Patient": ["p01", "p02", "p03"], "FollowUpYears": [1.5, 2.0, 0.5],
                  "Died": ["yes", "no", "verstorben"], "Grade": ["G1", "G2", "G3"], "Noise": [1, 2, 3]}
                 ).to_excel(path, index=False)
    mapping = ColumnMapping(patient="patient", endpoints={"OS": ("FollowUpYears", "Died")}, time_unit="years",
                            event_values={"verstorben": 1}, covariates=["Grade"])
    res = read_clinical(path, mapping=mapping)
    t = res.table
    assert list(t.columns) == ["bcr_patient_barcode", *ENDPOINT_COLUMNS, "Grade"]
    assert list(t["bcr_patient_barcode"]) == ["p01", "p02", "p03"] and list(t["OS"]) == [1, 0, 1]
    np.testing.assert_allclose(t["OS.time"], [1.5 * 365.25, 2 * 365.25, 0.5 * 365.25])


def test_death_or_follow_up_columns(tmp_path):
    path = write_csv(tmp_path / "c.csv", {"patient_id": ["a", "b"], "vital_status": ["Dead", "Alive"],
                                          "days_to_death": [300, None], "days_to_last_follow_up": [100, 900]})
    res = read_clinical(path)
    assert list(res.table["OS"]) == [1, 0] and list(res.table["OS.time"]) == [300, 900]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name,content", [
    ("binary.csv", b"\x00\x01\x02\xff" * 50), ("empty.csv", b""), ("one.csv", b"just\none\ncolumn\n"),
    ("notzip.xlsx", b"a,b\n1,2\n"), ("notes.pdf", b"%PDF-1.4"), ("old.xls", b"\xd0\xcf\x11\xe0")])
def test_not_a_table(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ClinicalFormatError) as err:
        read_clinical(path)
    assert name in str(err.value) and len(str(err.value)) > 40


def test_missing_file():
    with pytest.raises(ClinicalFormatError, match="No clinical file"):
        read_clinical("/nonexistent/clinical.csv")


def test_missing_columns_are_named(tmp_path):
    path = write_csv(tmp_path / "c.csv", {"bcr_patient_barcode": ["TCGA-AA-0001"], "OS": [1], "age": [3]})
    with pytest.raises(ClinicalFormatError, match=r"OS\.time.*Columns present: bcr_patient_barcode, OS, age"):
        read_clinical(path, fmt="tcga-cdr")
    mapping = ColumnMapping(patient="id", endpoints={"OS": ("time", "event")})
    with pytest.raises(ClinicalFormatError, match=r"id, time, event.*present: bcr_patient_barcode"):
        read_clinical(path, mapping=mapping)
    with pytest.raises(ClinicalFormatError, match="vital_status"):
        read_clinical(write_csv(tmp_path / "g.csv", {"case_submitter_id": ["TCGA-AA-0001"], "x": [1]}))
    with pytest.raises(ClinicalFormatError, match="column mapping"):
        read_clinical(write_csv(tmp_path / "n.csv", {"foo": [1], "bar": [2]}))


def test_bad_mapping_arguments():
    with pytest.raises(ClinicalFormatError, match="weeks"):
        ColumnMapping(patient="id", time_unit="weeks")
    with pytest.raises(ClinicalFormatError, match="EFS"):
        ColumnMapping(patient="id", endpoints={"EFS": ("t", "e")})


def test_duplicates_negative_odd_and_missing(tmp_path):
    path = write_csv(tmp_path / "c.csv", {
        "bcr_patient_barcode": ["tcga-aa-0001", "TCGA-AA-0002", "TCGA-AA-0001", None, "TCGA-AA-0003", "TCGA-AA-0004"],
        "OS": ["1", "0", "0", "1", "maybe", "2"], "OS.time": ["500", "-3", "400", "10", "", "800"],
        "Redaction": [None, None, None, None, None, "Redacted"]})
    res = read_clinical(path)
    t = res.table.set_index("bcr_patient_barcode")
    assert list(t.index) == ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert t.loc["TCGA-AA-0001", "OS.time"] == 500 and np.isnan(t.loc["TCGA-AA-0002", "OS.time"])
    assert np.isnan(t.loc["TCGA-AA-0003", "OS"]) and np.isnan(t.loc["TCGA-AA-0003", "OS.time"])
    warn = messages(res, "warning")
    assert "1 duplicate row(s) for 1 patient id(s) (TCGA-AA-0001)" in warn
    assert "without a patient id (file lines 5)" in warn and "negative" in warn and "'maybe'" in warn
    assert "TCGA-AA-0004" in warn  # redacted
    assert any(i.column == "OS.time" and "TCGA-AA-0003" in i.patients for i in res.issues_of("info"))


def test_days_with_short_median_hints_at_months(tmp_path):
    path = write_csv(tmp_path / "c.csv", {"id": ["a", "b", "c"], "time": [5, 20, 40], "status": [1, 0, 1]})
    res = read_clinical(path, mapping=ColumnMapping("id", {"OS": ("time", "status")}, time_unit="days"))
    assert "median time is 20.0 days" in messages(res, "warning")
    res = read_clinical(path, mapping=ColumnMapping("id", {"OS": ("time", "status")}, time_unit="months"))
    assert "median" not in messages(res)


def test_malformed_lines_skipped_and_semicolons(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id;time;status\na;100;1\nb;200;0;extra\nc;300;0\n")
    res = read_clinical(path)
    assert list(res.table["bcr_patient_barcode"]) == ["a", "c"] and "malformed" in messages(res, "warning")


def test_gdc_dotted_names_and_conflicts(tmp_path):
    path = write_csv(tmp_path / "clinical.tsv", {
        "cases.submitter_id": ["TCGA-AA-0001", "TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003", "TCGA-AA-0003"],
        "demographic.vital_status": ["Alive", "Alive", "Dead", "Alive", "Dead"],
        "demographic.days_to_death": ["'--", "'--", "'--", "'--", "700"],
        "diagnoses.days_to_last_follow_up": ["100", "'--", "'--", "50", "'--"],
        "follow_ups.days_to_follow_up": ["80", "350", "'--", "'--", "'--"],
        "diagnoses.ajcc_pathologic_stage": ["Stage I", "Stage II", "Stage III", "'--", "'--"],
        "diagnoses.age_at_diagnosis": ["18262", "18262", "'--", "'--", "'--"],
        "diagnoses.submitter_id": ["x_diag", "x_diag", "y_diag", "z_diag", "z_diag"],
        "demographic.submitter_id": ["x_demo", "x_demo", "y_demo", "z_demo", "z_demo"]}, sep="\t")
    res = read_clinical(path)
    t = res.table.set_index("bcr_patient_barcode")
    assert res.format == "gdc" and list(t["OS"]) == [0, 1, 1]
    assert t.loc["TCGA-AA-0001", "OS.time"] == 350 and np.isnan(t.loc["TCGA-AA-0002", "OS.time"])
    assert t.loc["TCGA-AA-0003", "OS.time"] == 700
    assert t.loc["TCGA-AA-0001", "age_at_diagnosis_years"] == pytest.approx(50, abs=0.01)
    assert t.loc["TCGA-AA-0001", "ajcc_pathologic_stage"] == "Stage I"
    assert {"diagnoses.submitter_id", "demographic.submitter_id"} <= set(t.columns)
    warn = messages(res, "warning")
    assert "ajcc_pathologic_stage: differing values" in warn and "without days_to_death (TCGA-AA-0002)" in warn
    assert "both Alive and Dead" in warn
