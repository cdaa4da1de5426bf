import pandas as pd
import pytest

from core.cohort import link_slides, load_cdr, parse_barcode, survival_frame
from core.errors import ClinicalFormatError


def test_parse_gdc_slide_name():
    bc = parse_barcode("TCGA-A2-A0T2-01Z-00-DX1.7E1E5A43-3F4A-4D39-9A9D-3D3D0C2A2F11.svs")
    assert bc.patient == "TCGA-A2-A0T2" and bc.sample == "01" and bc.slide_id == "DX1"
    assert bc.sample_type == "primary tumour" and bc.slide_type == "diagnostic (FFPE)"
    frozen = parse_barcode("tcga-cr-7395-01a-01-ts1.svs")
    assert frozen.patient == "TCGA-CR-7395" and frozen.slide_type == "frozen"
    assert parse_barcode("TCGA-AA-0001-11A-01-BS1.svs").sample_type == "solid tissue normal"
    assert parse_barcode("CMU-1-Small-Region.svs") is None


def test_link_reports_every_slide(tmp_path):
    clinical = pd.DataFrame({"bcr_patient_barcode": ["TCGA-AA-0001", "TCGA-AA-0002"]})
    paths = [tmp_path / "TCGA-AA-0001-01Z-00-DX1.x.svs", tmp_path / "TCGA-ZZ-9999-01Z-00-DX1.y.svs",
             tmp_path / "random.svs"]
    report = link_slides(paths, clinical)
    assert list(report["status"]) == ["linked", "no clinical", "unlinked"]
    assert report["message"].iloc[2] == "no TCGA barcode in the file name"


def test_load_real_cdr_brca(shared_data):
    df = load_cdr(shared_data / "clinical" / "TCGA-CDR_BRCA.csv")
    # 1,097 patients of which 5 are marked "Redacted" (dropped, as the CDR authors advise).
    assert len(df) == 1092 and df["OS"].sum() == 151
    surv = survival_frame(df, "OS")
    assert surv["time"].min() >= 0 and set(surv["event"].unique()) <= {0, 1}


def test_cdr_without_barcode_is_rejected(tmp_path):
    path = tmp_path / "x.csv"
    pd.DataFrame({"id": [1]}).to_csv(path, index=False)
    with pytest.raises(ClinicalFormatError, match="bcr_patient_barcode"):
        load_cdr(path)
