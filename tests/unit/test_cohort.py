import pandas as pd
import pytest

from core.analysis.survival import survival_frame
from core.cohort.barcodes import parse_barcode
from core.cohort.importer import link
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
    slides = pd.DataFrame({"slide_name": ["TCGA-AA-0001-01Z-00-DX1.x.svs", "TCGA-ZZ-9999-01Z-00-DX1.y.svs",
                                          "random.svs"], "status": "ok"})
    report = link(slides, clinical)
    assert list(report["link"]) == ["linked", "no clinical", "no barcode"]
    assert list(report["selected"]) == [True, True, False]


def test_survival_frame_on_real_brca(shared_data):
    from core.cohort.clinical import read_clinical

    clinical = read_clinical(shared_data / "clinical" / "TCGA-CDR_BRCA.csv").table
    surv = survival_frame(clinical, "OS")
    # 1,092 non-redacted patients, one (TCGA-OL-A66H) without OS.time
    assert len(surv) == 1091 and surv["event"].sum() == 151
    assert surv["time"].min() >= 0 and set(surv["event"].unique()) <= {0, 1}
    with pytest.raises(ClinicalFormatError, match="Unknown endpoint"):
        survival_frame(clinical, "XYZ")
