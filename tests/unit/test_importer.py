"""Cohort import on the real fixtures: good, no-µm/px and broken slides with a real TCGA-CDR table.

The cohort folder is built at test time in a temp dir from renamed copies (GDC-style names).
"""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import main as cli
from core.cohort.importer import fix_slide_mpp, import_cohort, read_mpp_overrides
from core.store.db import Store
from tests.conftest import make_slide

GOOD = "TCGA-A2-A0T2-01Z-00-DX1.0A8F7B2C-1111-4C2D-9E3F-0123456789AB.svs"
FROZEN_SAME_PATIENT = "TCGA-A2-A0T2-01A-01-TS1.5B2C7D1E-2222-4C2D-9E3F-0123456789AB.svs"


@pytest.fixture(scope="module")
def cohort_dir(shared_data, tmp_path_factory) -> Path:
    wsi = shared_data / "wsi"
    root = tmp_path_factory.mktemp("cohort") / "slides"
    (root / "batch2").mkdir(parents=True)
    shutil.copy(wsi / "CMU-1-Small-Region.svs", root / GOOD)
    # the frozen section, renamed onto the same patient: two slides, DX selected by default
    shutil.copy(wsi / "tcga-cr-7395-01a-01-ts1.svs", root / "batch2" / FROZEN_SAME_PATIENT)
    shutil.copy(wsi / "kidney-48-5.tif", root / "TCGA-A2-A0T3-01Z-00-DX1.tif")
    shutil.copy(wsi / "pathml_small_dicom.dcm", root / "TCGA-A2-A0T4-01Z-00-DX1.dcm")
    (root / "TCGA-A2-A0T5-01Z-00-DX1.svs").write_bytes((wsi / "CMU-1-Small-Region.svs").read_bytes()[:300_000])
    shutil.copy(wsi / "CMU-1-Small-Region.svs", root / "batch2" / "TCGA-A2-A0T6-01Z-00-DX1.svs")  # duplicate
    (root / "README.txt").write_text("scanner notes")
    blank = np.full((1200, 1600, 3), 244, np.uint8)
    from core.synth.tiff import write_pyramidal_tiff

    write_pyramidal_tiff(root / "TCGA-A2-A0T7-01Z-00-DX1.tiff", blank, mpp=0.5)
    make_slide(root / "TCGA-ZZ-0000-01Z-00-DX1.tiff")  # readable, but no such patient
    return root


@pytest.fixture(scope="module")
def report(cohort_dir, shared_data, tmp_path_factory):
    store_path = tmp_path_factory.mktemp("store") / "s.duckdb"
    with Store(store_path) as store:
        rep = import_cohort(store, "brca", cohort_dir, shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
    return rep, store_path


def status(rep, name):
    return rep.slides.set_index("slide_name").loc[name]


def test_every_file_has_a_status(report):
    rep, _ = report
    assert len(rep.slides) == 9 and rep.slides["status"].notna().all()
    assert (rep.slides["message"].fillna("") != "").sum() >= 6


def test_good_slide(report):
    row = status(report[0], GOOD)
    assert row["status"] == "ok" and row["link"] == "linked" and row["selected"]
    assert row["mpp"] == pytest.approx(0.499) and row["mpp_source"] == "openslide.mpp-x"
    assert row["vendor"] == "aperio" and row["n_tiles"] > 20


def test_missing_mpp_is_never_guessed(report):
    row = status(report[0], FROZEN_SAME_PATIENT)
    assert row["status"] == "needs_mpp" and np.isnan(row["mpp"])
    assert "--mpp" in row["message"] and row["slide_type"] == "frozen"
    assert not row["selected"]  # the patient's DX slide is the default


def test_bad_files(report):
    rep = report[0]
    assert status(rep, "TCGA-A2-A0T3-01Z-00-DX1.tif")["status"] == "unsupported"
    assert status(rep, "TCGA-A2-A0T4-01Z-00-DX1.dcm")["status"] == "unsupported"
    truncated = status(rep, "TCGA-A2-A0T5-01Z-00-DX1.svs")
    assert truncated["status"] == "unreadable" and "truncated" in truncated["message"]
    dup = status(rep, "TCGA-A2-A0T6-01Z-00-DX1.svs")
    assert dup["status"] == "duplicate" and GOOD in dup["message"]
    assert status(rep, "README.txt")["status"] == "not_a_slide"
    assert status(rep, "TCGA-A2-A0T7-01Z-00-DX1.tiff")["status"] == "no_tissue"
    stranger = status(rep, "TCGA-ZZ-0000-01Z-00-DX1.tiff")
    assert stranger["status"] == "ok" and stranger["link"] == "no clinical"


def test_link_report_patients_and_clinical_notes(report):
    rep, store_path = report
    # 1,092 non-redacted BRCA patients; 6 of them (A0T2..A0T7) have a file in the folder
    assert len(rep.patients_without_slides) == 1092 - 6
    assert any("Redaction" in i["message"] or "redacted" in i["message"].lower() for i in rep.issues)
    with Store(store_path, read_only=True) as store:
        saved = store.cohort_slides("brca")
        assert len(saved) == 9 and set(saved["status"]) == set(rep.slides["status"])
        assert len(store.cohort_issues("brca")) == len(rep.issues)


def test_fix_mpp_makes_slide_usable(report):
    rep, store_path = report
    path = status(rep, FROZEN_SAME_PATIENT)["slide_path"]
    with Store(store_path) as store:
        row = fix_slide_mpp(store, "brca", path, 0.5)
        saved = store.cohort_slides("brca").set_index("slide_name").loc[FROZEN_SAME_PATIENT]
    assert row.status == "ok" and saved["mpp_source"] == "override" and saved["mpp"] == 0.5
    assert saved["n_tiles"] > 0


def test_mpp_override_file(cohort_dir, shared_data, tmp_path):
    overrides = tmp_path / "mpp.csv"
    pd.DataFrame({"slide": [FROZEN_SAME_PATIENT], "mpp": [0.25]}).to_csv(overrides, index=False)
    with Store(tmp_path / "s.duckdb") as store:
        rep = import_cohort(store, "x", cohort_dir, shared_data / "clinical" / "TCGA-CDR_BRCA.csv",
                            mpp_overrides=read_mpp_overrides(overrides))
    row = status(rep, FROZEN_SAME_PATIENT)
    assert row["status"] == "ok" and row["mpp"] == 0.25 and row["mpp_source"] == "override"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,um\nx,1\n")
    with pytest.raises(Exception, match="slide,mpp"):
        read_mpp_overrides(bad)


def test_cli_import_prints_report(cohort_dir, shared_data, tmp_path, capsys):
    code = cli(["import", "--slides", str(cohort_dir), "--clinical", str(shared_data / "clinical" / "TCGA-CDR_BRCA.csv"),
                "--name", "cli", "--store", str(tmp_path / "s.duckdb")])
    out = capsys.readouterr().out
    assert code == 0
    for word in ("needs_mpp", "unsupported", "unreadable", "duplicate", "no_tissue", "not_a_slide",
                 "patients without slides: 1086"):
        assert word in out


def test_cli_import_bad_clinical_is_a_clean_error(cohort_dir, tmp_path, capsys):
    bad = tmp_path / "clinical.csv"
    bad.write_text("foo,bar\n1,2\n")
    code = cli(["import", "--slides", str(cohort_dir), "--clinical", str(bad), "--store", str(tmp_path / "s.duckdb")])
    assert code == 2 and "error:" in capsys.readouterr().err


def test_one_selected_slide_per_patient_and_reselect(report):
    rep, store_path = report
    with Store(store_path) as store:
        slides = store.cohort_slides("brca")
        a0t2 = slides[slides["patient"] == "TCGA-A2-A0T2"]
        assert len(a0t2) == 2 and a0t2["selected"].sum() == 1
        frozen = a0t2[a0t2["slide_name"] == FROZEN_SAME_PATIENT]["slide_path"].iloc[0]
        store.select_slide("brca", "TCGA-A2-A0T2", frozen)
        again = store.cohort_slides("brca").set_index("slide_name")
    assert again.loc[FROZEN_SAME_PATIENT, "selected"] and not again.loc[GOOD, "selected"]
    assert again["selected"].fillna(False).sum() == slides["selected"].fillna(False).sum()


def test_import_of_an_empty_folder_ends_with_its_report(tmp_path, shared_data, capsys):
    """Issue 10: an import whose folder holds no slide used to crash in _select_per_patient."""
    from core.cli import main
    from core.vocab import SlideStatus

    empty = tmp_path / "empty"
    empty.mkdir()
    with Store(tmp_path / "s.duckdb") as store:
        report = import_cohort(store, "clin", empty, shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
        assert report.slides.empty and report.counts()["patients"] == 1092
        assert any(i["kind"] == "slides" and "No file found" in i["message"] for i in report.issues)
        assert store.cohorts() == ["clin"] and store.cohort_slides("clin").empty
    (empty / "notes.txt").write_text("not a slide")
    code = main(["import", "--slides", str(empty), "--clinical", str(shared_data / "clinical" / "TCGA-CDR_BRCA.csv"),
                 "--store", str(tmp_path / "cli.duckdb"), "--name", "c2"])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err
    assert SlideStatus.NOT_A_SLIDE in out.out and "No slide under" in out.out
