"""Variable names, clinical columns as variables, measured tables in a real DuckDB store, exports.

Expected values are hand-computed from the small tables written in each test.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from core.analysis.cohort_stats import collapse_stage, covariate_column
from core.analysis.report import table_bytes, to_jsonable
from core.analysis.variables import clinical_variables, is_categorical, parse_variable, variable_values, zscore
from core.errors import AnalysisError
from core.store.db import Store

PANEL = ["CD8A", "MKI67", "ERBB2", "GZMA", "PRF1"]


def test_parse_variable_kinds():
    assert parse_variable("cd8a", panel=PANEL).name == "CD8A"
    assert parse_variable("predicted:MKI67", panel=PANEL).source == "predicted"
    v = parse_variable("signature:gzma, prf1", panel=PANEL)
    assert v.source == "signature" and v.genes == ("GZMA", "PRF1") and v.spec == "signature:GZMA,PRF1"
    v = parse_variable("signature:cytolytic", panel=PANEL, signatures={"cytolytic": ["GZMA", "PRF1", "NOPE"]})
    assert v.genes == ("GZMA", "PRF1")
    assert parse_variable("clinical:ajcc_pathologic_tumor_stage").source == "clinical"
    assert parse_variable("measured:ESR1").spec == "measured:ESR1"


@pytest.mark.parametrize("text,match", [("", "Name a variable"), ("FOO1", "not in the model's panel"),
                                        ("weird:x", "Unknown variable kind"), ("clinical:", "names no clinical")])
def test_parse_variable_errors(text, match):
    with pytest.raises(AnalysisError, match=match):
        parse_variable(text, panel=PANEL)


def test_zscore_hand():
    """[1, 2, 3]: mean 2, SD (ddof 1) 1 → [-1, 0, 1]; a constant column → 0; NaN kept."""
    z = zscore(pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0], "c": [1.0, np.nan, 3.0]}))
    assert z["a"].tolist() == [-1.0, 0.0, 1.0] and z["b"].tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(z["c"][1]) and z["c"][0] == pytest.approx(-0.7071067811865476)


def test_clinical_variables_kinds():
    df = pd.DataFrame({"bcr_patient_barcode": [f"P{i}" for i in range(12)], "OS": [0, 1] * 6,
                       "age": np.arange(40, 52), "stage": ["Stage I", "Stage II", "Stage III"] * 4,
                       "note": [f"free text {i}" for i in range(12)], "const": ["x"] * 12, "grade": [1, 2, 3] * 4})
    kinds = clinical_variables(df)
    assert kinds == {"age": "continuous", "stage": "categorical", "grade": "categorical"}
    assert is_categorical(df["grade"]) and not is_categorical(df["age"])


def test_collapse_stage():
    s = pd.Series(["Stage IIA", "Stage IIIC", "stage iv", "Stage I", "[Not Available]", None, "Stage X"])
    assert collapse_stage(s).tolist()[:4] == ["Stage II", "Stage III", "Stage IV", "Stage I"]
    assert collapse_stage(s).isna().tolist()[4:] == [True, True, True]


def test_covariate_aliases():
    df = pd.DataFrame({"bcr_patient_barcode": ["A", "B"], "age_at_initial_pathologic_diagnosis": [50, 60],
                       "ajcc_pathologic_tumor_stage": ["Stage IA", "Stage IIIB"]})
    name, values = covariate_column(df, "age")
    assert name == "age" and values.tolist() == [50, 60]
    assert covariate_column(df, "stage")[1].tolist() == ["Stage I", "Stage III"]
    with pytest.raises(AnalysisError, match="subtype"):
        covariate_column(df, "subtype")


def test_measured_roundtrip_in_store(tmp_path):
    clinical = pd.DataFrame({"bcr_patient_barcode": ["TCGA-A1-A001", "TCGA-A1-A002", "TCGA-A1-A003"],
                             "OS": [1.0, 0.0, 1.0], "OS.time": [100.0, 200.0, 300.0]})
    long = pd.DataFrame({"patient": ["TCGA-A1-A001", "TCGA-A1-A002", "TCGA-A1-A001"],
                         "gene": ["ESR1", "ESR1", "ERBB2"], "value": [1.5, 2.5, 7.0]})
    with Store(tmp_path / "s.duckdb") as store:
        store.save_cohort("c", pd.DataFrame(), clinical, {"kind": "test"})
        assert store.measured("c").empty and store.measured_genes("c") == []
        store.save_measured("c", long, {"file": "m.csv"})
        store.save_measured("c", long, {"file": "m.csv"})           # replaces, does not append
        m = store.measured("c")
        assert m.loc["TCGA-A1-A001", "ERBB2"] == 7.0 and np.isnan(m.loc["TCGA-A1-A002", "ERBB2"])
        assert store.measured_genes("c") == ["ERBB2", "ESR1"]
        assert store.measured_source("c")["n_patients"] == 2
        values = variable_values(store, "c", parse_variable("measured:esr1"))
        assert values.to_dict() == {"TCGA-A1-A001": 1.5, "TCGA-A1-A002": 2.5}
        with pytest.raises(AnalysisError, match="no measured expression"):
            store.save_cohort("d", pd.DataFrame(), clinical, {"kind": "test"})
            variable_values(store, "d", parse_variable("measured:ESR1"))


def test_exports_are_real_files():
    df = pd.DataFrame({"patient": ["A", "B"], "hr": [1.5, np.nan], "group": ["x", None]})
    assert table_bytes(df, "csv").decode().splitlines()[0] == "patient,hr,group"
    assert pd.read_excel(io.BytesIO(table_bytes(df, "xlsx")))["patient"].tolist() == ["A", "B"]
    assert pd.read_parquet(io.BytesIO(table_bytes(df, "parquet")))["hr"].iloc[0] == 1.5
    with pytest.raises(AnalysisError, match="Unknown table format"):
        table_bytes(df, "docx")
    text = json.dumps(to_jsonable({"a": np.float64("nan"), "b": np.int64(3), "c": df}), allow_nan=False)
    assert json.loads(text)["a"] is None and json.loads(text)["c"][1]["hr"] is None
