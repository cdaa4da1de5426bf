"""Event columns are read the way they are coded, and the import report says how.

Expected counts are hand-counted from the tables written in each test. The R convention (1 =
censored, 2 = event) is that of ``survival::Surv`` (R documentation of ``Surv``: "status … 1/2
(1 = alive, 2 = dead)"), as in R's ``lung`` data in ``../shared/data/golden/lung.csv``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.cohort.clinical import parse_event_coding, read_clinical
from core.cohort.clinical_values import detect_event_coding
from core.errors import ClinicalFormatError


def table(tmp_path, status, *, name="t.csv", time=None, extra=None):
    n = len(status)
    df = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)],
                       "time": time if time is not None else np.arange(n) * 10 + 100, "status": status,
                       **(extra or {})})
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def info(result, column="OS"):
    return [i.message for i in result.issues if i.column == column and i.severity in ("info", "error")]


def test_r_coding_91_patients_9_deaths(tmp_path):
    """The user's table: 91 patients, 9 deaths coded 2, 82 censored coded 1 → 9 events, never 82."""
    res = read_clinical(table(tmp_path, [2] * 9 + [1] * 82))
    assert res.n_events["OS"] == 9
    assert int((res.table["OS"] == 0).sum()) == 82
    assert any("1/2 coding read as 2 = event, 1 = censored" in m and "9 events" in m for m in info(res))


@pytest.mark.parametrize("values,events,censored,coding", [
    ([0, 1, 1, 0, 0], 2, 3, "0/1"),
    ([1, 2, 2, 1, 1], 2, 3, "1/2"),
    (["TRUE", "FALSE", "true", "False", "FALSE"], 2, 3, "words"),
    (["Dead", "Alive", "DEAD", "alive", "Alive"], 2, 3, "words"),
    (["Deceased", "Living", "Living", "deceased", "Living"], 2, 3, "words"),
    (["1:DECEASED", "0:LIVING", "0:LIVING", "1:DECEASED", "0:LIVING"], 2, 3, "cbioportal"),
    (["1:Recurred/Progressed", "0:DiseaseFree", "0:DiseaseFree", "1:Recurred/Progressed", "0:DiseaseFree"],
     2, 3, "cbioportal"),
    (["Dead", "Alive", "1", "0", "0"], 2, 3, "0/1+words"),
    ([2, 2, 2, 2, 2], 5, 0, "1/2"),
    ([0, 0, 0, 0, 0], 0, 5, "0/1"),
])
def test_every_coding(tmp_path, values, events, censored, coding):
    res = read_clinical(table(tmp_path, values))
    assert res.n_events["OS"] == events and int((res.table["OS"] == 0).sum()) == censored
    decided = detect_event_coding(pd.Series([str(v) for v in values]), "OS")
    assert decided.coding == coding and not decided.ambiguous


@pytest.mark.parametrize("values", [[1, 1, 1, 1], [0, 1, 2, 1]])
def test_ambiguous_columns_ask_for_the_coding(tmp_path, values):
    """Only 1s (all events under 0/1, all censored under 1/2) and {0, 1, 2} cannot be decided."""
    res = read_clinical(table(tmp_path, values))
    assert res.table["OS"].isna().all()
    errors = [i.message for i in res.issues if i.severity == "error" and i.column == "OS"]
    assert errors and "ambiguous" in errors[0] and "0/1 or 1/2" in errors[0]


def test_user_override(tmp_path):
    path = table(tmp_path, [1, 1, 1, 1])
    assert read_clinical(path, event_coding="0/1").n_events["OS"] == 4
    assert read_clinical(path, event_coding="1/2").n_events["OS"] == 0
    res = read_clinical(path, event_coding={"OS": "1/2"})
    assert int((res.table["OS"] == 0).sum()) == 4
    assert any("as chosen" in m for m in info(res))


def test_override_against_the_data_is_reported(tmp_path):
    """Forcing 0/1 on a 1/2 column keeps 1 → event but flags every 2 as an unknown code."""
    res = read_clinical(table(tmp_path, [2, 1, 1]), event_coding="0/1")
    assert res.n_events["OS"] == 2
    warn = [i.message for i in res.issues if i.severity == "warning" and i.column == "OS"]
    assert warn and "'2'" in warn[0]


def test_cdr_format_with_r_coding_is_not_read_as_one_is_event(tmp_path):
    """A CDR-shaped table whose OS is {1, 2}: 2 = event, and the report says the CDR documents 0/1."""
    df = pd.DataFrame({"bcr_patient_barcode": [f"TCGA-A1-A{i:03d}" for i in range(6)],
                       "OS": [1, 1, 2, 1, 2, 1], "OS.time": [100, 200, 300, 400, 500, 600]})
    df.to_csv(tmp_path / "cdr.csv", index=False)
    res = read_clinical(tmp_path / "cdr.csv")
    assert res.format == "tcga-cdr" and res.n_events["OS"] == 2
    assert any("documents 0/1" in m for m in info(res))


def test_cdr_only_ones_follow_the_format(tmp_path):
    df = pd.DataFrame({"bcr_patient_barcode": [f"TCGA-A1-A{i:03d}" for i in range(3)],
                       "OS": [1, 1, 1], "OS.time": [100, 200, 300]})
    df.to_csv(tmp_path / "cdr.csv", index=False)
    res = read_clinical(tmp_path / "cdr.csv")
    assert res.n_events["OS"] == 3 and any("as the file format prescribes" in m for m in info(res))


def test_lung_golden_file_reads_165_deaths(shared_data, tmp_path):
    """R's lung: 228 patients, 165 deaths coded 2 (golden README)."""
    lung = pd.read_csv(shared_data / "golden" / "lung.csv")
    lung.insert(0, "patient_id", [f"L{i}" for i in range(len(lung))])
    lung.to_csv(tmp_path / "lung.csv", index=False)
    res = read_clinical(tmp_path / "lung.csv")
    assert res.n_events["OS"] == 165 and int((res.table["OS"] == 0).sum()) == 63


def test_parse_event_coding_text():
    assert parse_event_coding("auto") == "auto"
    assert parse_event_coding("1/2") == "1/2"
    assert parse_event_coding("OS=1/2, pfi=0/1") == {"OS": "1/2", "PFI": "0/1"}
    with pytest.raises(ClinicalFormatError, match="not one of"):
        parse_event_coding("2/1")
    with pytest.raises(ClinicalFormatError, match="Unknown endpoint"):
        parse_event_coding("XYZ=1/2")


def test_months_hint_still_given(tmp_path):
    """Times are days unless said otherwise; a median of 30 'days' gets the unit hint."""
    res = read_clinical(table(tmp_path, [0, 1, 0, 1], time=[20, 30, 40, 25]))
    assert any("months or years" in i.message for i in res.issues)
