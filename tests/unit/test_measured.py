"""Measured expression import (orientation, id forms, samples, values, errors) and the demo's true bulk."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.cohort.measured import from_long, read_measured, to_long
from core.errors import ClinicalFormatError, MeasuredFormatError

COHORT = ["TCGA-A2-A0CM", "TCGA-BH-A0FJ", "TCGA-E2-A1B6", "TCGA-AR-A2LH"]


def _matrix(ids, genes=("ESR1", "ERBB2", "MKI67"), seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(5, 2, (len(ids), len(genes))), index=list(ids), columns=list(genes))


def _messages(result, severity=None) -> str:
    return " | ".join(i.message for i in result.issues if severity in (None, i.severity))


@pytest.fixture(scope="module")
def brca(shared_data) -> list[str]:
    return pd.read_csv(shared_data / "clinical" / "TCGA-CDR_BRCA.csv", usecols=["bcr_patient_barcode"],
                       dtype=str)["bcr_patient_barcode"].tolist()


def test_real_train_matrix_by_suffix(shared_data, brca):
    res = read_measured(shared_data / "bulk" / "train_mrna.csv", brca)
    assert res.orientation == "patients x genes" and res.key == "suffix4"
    assert res.matrix.shape == (150, 200) and res.n_ids_read == 150 and res.n_matched == 150
    assert res.matrix.index.str.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}").all()
    assert res.matrix.index.is_unique and set(res.matrix.index) <= set(brca)
    assert (res.matrix.dtypes == float).all() and res.matrix.notna().all(axis=None)
    raw = pd.read_csv(shared_data / "bulk" / "train_mrna.csv", index_col=0)
    assert res.matrix.iloc[0, 0] == pytest.approx(raw.iloc[0, 0])
    assert res.matrix.index[0].endswith(raw.index[0])
    assert res.summary() == "200 genes × 150 patients matched by the last 4 characters of the barcode; 0 unmatched"
    assert "patients x genes" in _messages(res, "info") and not _messages(res, "warning")


def test_real_matrix_transposed_gives_the_same(shared_data, brca, tmp_path):
    raw = pd.read_csv(shared_data / "bulk" / "train_mrna.csv", index_col=0)
    path = tmp_path / "genes_x_patients.tsv"
    raw.T.rename_axis("gene").to_csv(path, sep="\t")
    res = read_measured(path, brca)
    want = read_measured(shared_data / "bulk" / "train_mrna.csv", brca).matrix
    assert res.orientation == "genes x patients" and res.key == "suffix4"
    pd.testing.assert_frame_equal(res.matrix, want)
    assert "the header holds the patient ids" in _messages(res, "info")


def test_real_test_matrix(shared_data, brca):
    res = read_measured(shared_data / "bulk" / "test_mrna.csv", brca)
    assert res.matrix.shape == (70, 200) and res.n_matched == 70


def test_full_barcodes_prefer_primary_tumour(tmp_path):
    ids = ["TCGA-A2-A0CM-11A-22R-A034-07", "TCGA-A2-A0CM-01A-11R-A034-07", "TCGA-BH-A0FJ-01A-11R-A056-07",
           "TCGA-E2-A1B6-01A-31R-A12P-07"]
    m = _matrix(ids)
    path = tmp_path / "m.csv.gz"
    m.T.to_csv(path)  # genes × samples, gzipped
    res = read_measured(path, [p.lower() for p in COHORT])  # cohort ids are normalised too
    assert res.orientation == "genes x patients" and res.key == "barcode"
    assert list(res.matrix.index) == ["TCGA-A2-A0CM", "TCGA-BH-A0FJ", "TCGA-E2-A1B6"]
    assert res.matrix.loc["TCGA-A2-A0CM", "ESR1"] == pytest.approx(m.loc[ids[1], "ESR1"])  # 01A, not 11A
    info = _messages(res, "info")
    assert "several samples" in info and "TCGA-A2-A0CM-11A" in info and "primary-tumour" in info
    assert res.n_ids_read == 4 and res.n_matched == 4


def test_r_style_dotted_barcodes_and_patient_barcodes(tmp_path):
    m = _matrix(["TCGA.A2.A0CM.01A", "TCGA-BH-A0FJ"])
    path = tmp_path / "m.tsv"
    m.rename_axis("sample").to_csv(path, sep="\t")
    res = read_measured(path, COHORT)
    assert res.orientation == "patients x genes"
    assert list(res.matrix.index) == ["TCGA-A2-A0CM", "TCGA-BH-A0FJ"]


def test_patient_barcodes_in_parquet(tmp_path):
    m = _matrix(COHORT[:3], genes=[f"G{i}" for i in range(6)])
    path = tmp_path / "m.parquet"
    m.T.rename_axis("gene").to_parquet(path)  # ids in the index
    res = read_measured(path, COHORT)
    assert res.orientation == "genes x patients" and res.key == "patient"
    np.testing.assert_allclose(res.matrix.to_numpy(), m.to_numpy())
    path2 = tmp_path / "m2.parquet"
    m.rename_axis("patient").reset_index().to_parquet(path2, index=False)  # ids in a column
    res2 = read_measured(path2, COHORT)
    assert res2.orientation == "patients x genes"
    pd.testing.assert_frame_equal(res2.matrix, res.matrix)


def test_ambiguous_and_unmatched_suffixes(tmp_path):
    cohort = ["TCGA-A1-ABCD", "TCGA-B2-ABCD", "TCGA-C3-WXYZ", "TCGA-D4-0123"]
    path = tmp_path / "m.csv"
    _matrix(["ABCD", "WXYZ", "QQQQ", "0123"]).rename_axis("dim_0").to_csv(path)
    res = read_measured(path, cohort)
    assert res.key == "suffix4" and list(res.matrix.index) == ["TCGA-C3-WXYZ", "TCGA-D4-0123"]  # leading 0 kept
    warn = _messages(res, "warning")
    assert "ABCD → TCGA-A1-ABCD or TCGA-B2-ABCD" in warn and "full patient barcodes" in warn
    assert "1 of 4 id(s) match no patient" in warn and "QQQQ" in warn
    assert res.n_matched == 2 and res.summary().endswith("; 2 unmatched")


def test_duplicate_genes_keep_first(tmp_path):
    m = _matrix(COHORT, genes=["ESR1", "ERBB2", "ESR1"])
    path = tmp_path / "m.csv"
    m.T.to_csv(path)
    res = read_measured(path, COHORT)
    assert list(res.matrix.columns) == ["ESR1", "ERBB2"]
    np.testing.assert_allclose(res.matrix["ESR1"], m.iloc[:, 0])
    assert "duplicate gene name(s) (ESR1); kept the first" in _messages(res, "warning")


def test_non_numeric_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("patient,ESR1,ERBB2,note\n"
                    "TCGA-A2-A0CM,1.5,abc,x\n"
                    "TCGA-BH-A0FJ,NA,2.0,y\n"
                    "TCGA-E2-A1B6,3,4,z\n")
    res = read_measured(path, COHORT)
    assert list(res.matrix.columns) == ["ESR1", "ERBB2"]  # the text-only column is dropped
    assert np.isnan(res.matrix.loc["TCGA-A2-A0CM", "ERBB2"]) and np.isnan(res.matrix.loc["TCGA-BH-A0FJ", "ESR1"])
    assert res.matrix.loc["TCGA-E2-A1B6", "ERBB2"] == 4.0
    warn = _messages(res, "warning")
    assert "'abc'" in warn and "not numbers" in warn and "'NA'" not in warn  # NA is a missing marker
    assert "hold no numeric value (note)" in warn


def test_no_numeric_value_is_an_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("patient,ESR1,ERBB2\nTCGA-A2-A0CM,high,low\nTCGA-BH-A0FJ,low,high\n")
    with pytest.raises(MeasuredFormatError, match="no numeric expression value"):
        read_measured(path, COHORT)


def test_nothing_matched_names_forms_and_examples(tmp_path):
    path = tmp_path / "m.csv"
    _matrix(["S1", "S2", "S3"]).to_csv(path)
    with pytest.raises(MeasuredFormatError) as err:
        read_measured(path, COHORT)
    msg = str(err.value)
    assert "m.csv" in msg and "TCGA-A2-A0CM-01A" in msg and "12-character" in msg and "last 4 characters" in msg
    assert "S1" in msg and "ESR1" in msg and "TCGA-A2-A0CM" in msg and "cohort patients" in msg
    assert isinstance(err.value, ClinicalFormatError)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(MeasuredFormatError, match="No expression matrix"):
        read_measured(tmp_path / "missing.csv", COHORT)
    bad = tmp_path / "m.xlsx"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(MeasuredFormatError, match="unsupported file type"):
        read_measured(bad, COHORT)


def test_long_round_trip():
    m = _matrix(COHORT[:3]).rename_axis(index="patient", columns="gene")
    m.iloc[0, 1] = np.nan
    long = to_long(m)
    assert list(long.columns) == ["patient", "gene", "value"] and len(long) == m.size - 1
    back = from_long(long)  # genes in order of first appearance: MKI67 before the missing ERBB2
    assert list(back.columns) == ["ESR1", "MKI67", "ERBB2"]
    pd.testing.assert_frame_equal(back[m.columns], m)
    with pytest.raises(MeasuredFormatError, match="value"):
        from_long(long.drop(columns="value"))


# -- the demo world's true bulk -------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from core.synth.world import build_world

    root = tmp_path_factory.mktemp("bulkworld")
    build_world(root, seed=5, workers=1, n_patients=10, slide_size_px=(1024, 768), n_sections=1,
                section_size_px=(800, 800))
    return root


def test_true_bulk_shape_and_planted_composition(world):
    from core.synth.bulk import true_bulk
    from core.synth.reference import GENES

    bulk = true_bulk(world)
    patients = pd.read_csv(world / "truth" / "patients.csv").set_index("bcr_patient_barcode")
    assert bulk.shape == (len(GENES), len(patients)) and list(bulk.index) == GENES
    assert set(bulk.columns) == set(patients.index) and np.isfinite(bulk.to_numpy()).all()
    assert (bulk.to_numpy() >= 0).all() and bulk.to_numpy().max() < np.log1p(1e4)
    for gene, frac in [("CD3E", "frac_t_cell"), ("COL1A1", "frac_fibroblast")]:
        r = np.corrcoef(bulk.loc[gene, patients.index], patients[frac])[0, 1]
        assert r > 0.5, (gene, r)


def test_true_bulk_without_slides_uses_cell_tiles(world, tmp_path):
    import shutil

    from core.synth.bulk import true_bulk

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    for f in (copy / "slides").iterdir():
        f.unlink()
    a, b = true_bulk(world), true_bulk(copy)
    assert list(a.columns) == list(b.columns)
    assert np.corrcoef(a.to_numpy().ravel(), b.to_numpy().ravel())[0, 1] > 0.99
