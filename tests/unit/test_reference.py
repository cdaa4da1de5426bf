"""Single-cell references: good h5ad / CSV inputs, and every bad input as a ReferenceFormatError.

All files are tiny real files written in ``tmp_path`` (pandas, anndata); nothing is mocked.
"""
import gzip
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from core.errors import ReferenceFormatError, SectionFormatError, TesseraError
from core.training.reference import log_normalize, read_reference, reference_profiles
from tests.conftest import make_slide

GENES = ["EPCAM", "PTPRC", "COL1A1"]
CELLS = [f"c{i}" for i in range(6)]
TYPES = ["epi", "epi", "immune", "immune", "fibro", "fibro"]


def _counts() -> pd.DataFrame:
    x = np.array([[9, 0, 1], [7, 1, 0], [0, 8, 1], [1, 6, 0], [0, 1, 9], [1, 0, 7]], np.float32)
    return pd.DataFrame(x, index=pd.Index(CELLS, name="cell_id"), columns=GENES)


def _write_csv_pair(tmp_path, *, counts: pd.DataFrame | None = None, types: pd.DataFrame | None = None):
    counts_path, types_path = tmp_path / "counts.csv", tmp_path / "types.csv"
    (_counts() if counts is None else counts).to_csv(counts_path)
    if types is None:
        types = pd.DataFrame({"cell_type": TYPES}, index=pd.Index(CELLS, name="cell_id"))
    types.to_csv(types_path)
    return counts_path, types_path


def _write_h5ad(path, *, obs_column: str = "cell_type"):
    adata = ad.AnnData(_counts().to_numpy())
    adata.obs_names, adata.var_names = CELLS, GENES
    adata.obs[obs_column] = TYPES
    adata.write_h5ad(path)
    return path


def _names(path) -> str:
    """A regex matching the message when it names the file."""
    return re.escape(path.name)


# ---------------------------------------------------------------------------------------- good inputs


def test_csv_and_h5ad_give_the_same_profiles(tmp_path):
    counts_path, types_path = _write_csv_pair(tmp_path)
    from_csv = read_reference(counts_path, types_path)
    from_h5ad = read_reference(_write_h5ad(tmp_path / "ref.h5ad"))
    assert list(from_csv.obs["cell_type"]) == TYPES and list(from_csv.var_names) == GENES
    p_csv, types = reference_profiles(from_csv, ["PTPRC", "EPCAM"])
    p_h5ad, _ = reference_profiles(from_h5ad, ["PTPRC", "EPCAM"])
    assert types == ["epi", "fibro", "immune"]
    pd.testing.assert_frame_equal(p_csv, p_h5ad)
    expected = log_normalize(_counts().loc[["c0", "c1"], ["PTPRC", "EPCAM"]].mean().to_numpy()[None])
    np.testing.assert_allclose(p_csv.loc["epi"].to_numpy(), expected[0], rtol=1e-6)


def test_gzipped_csv_and_named_type_column(tmp_path):
    counts_path = tmp_path / "counts.csv.gz"
    with gzip.open(counts_path, "wt") as f:
        _counts().to_csv(f)
    types = pd.DataFrame({"batch": ["b1"] * 6, "cell_type": TYPES}, index=pd.Index(CELLS, name="cell_id"))
    types.to_csv(tmp_path / "types.csv")
    reference = read_reference(counts_path, tmp_path / "types.csv")
    assert list(reference.obs["cell_type"]) == TYPES  # the named column, not the first one


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["missing.h5ad", "missing.csv"])
def test_missing_reference_file(tmp_path, name):
    with pytest.raises(ReferenceFormatError, match=_names(tmp_path / name) + ".*no such"):
        read_reference(tmp_path / name, tmp_path / "types.csv")


def test_missing_types_file(tmp_path):
    counts_path, _ = _write_csv_pair(tmp_path)
    with pytest.raises(ReferenceFormatError, match="nope.csv.*no such cell-type"):
        read_reference(counts_path, tmp_path / "nope.csv")


def test_counts_csv_without_types(tmp_path):
    counts_path, _ = _write_csv_pair(tmp_path)
    with pytest.raises(ReferenceFormatError, match=_names(counts_path) + ".*--types"):
        read_reference(counts_path)


@pytest.mark.parametrize("name", ["ref.h5ad", "counts.csv", "counts.csv.gz"])
def test_binary_garbage(tmp_path, name):
    _, types_path = _write_csv_pair(tmp_path)
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))  # after the pair: replaces counts.csv
    with pytest.raises(ReferenceFormatError, match=_names(path) + ": not a readable"):
        read_reference(path, types_path)


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
def test_hdf5_that_is_not_anndata(tmp_path):
    import h5py

    path = tmp_path / "ref.h5ad"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ReferenceFormatError, match=_names(path) + ": not a readable .h5ad"):
        read_reference(path)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_counts_csv(tmp_path, content):
    _, types_path = _write_csv_pair(tmp_path)
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(ReferenceFormatError, match=_names(path) + ": the counts file is empty"):
        read_reference(path, types_path)


def test_counts_csv_with_header_only(tmp_path):
    _, types_path = _write_csv_pair(tmp_path)
    path = tmp_path / "header.csv"
    path.write_text("cell_id," + ",".join(GENES) + "\n")
    with pytest.raises(ReferenceFormatError, match=_names(path) + ": the counts table has 0 cells"):
        read_reference(path, types_path)


def test_empty_types_csv(tmp_path):
    counts_path, types_path = _write_csv_pair(tmp_path)
    types_path.write_text("")
    with pytest.raises(ReferenceFormatError, match=_names(types_path) + ": the cell-type file is empty"):
        read_reference(counts_path, types_path)


def test_non_numeric_counts(tmp_path):
    counts = _counts().astype(object)
    counts.loc["c3", "PTPRC"] = "six"
    counts_path, types_path = _write_csv_pair(tmp_path, counts=counts)
    with pytest.raises(ReferenceFormatError, match=_names(counts_path) + r": non-numeric counts in 1 gene column.*'six' for cell 'c3'"):
        read_reference(counts_path, types_path)


def test_empty_count_values(tmp_path):
    counts = _counts()
    counts.loc["c2", "EPCAM"] = np.nan
    counts_path, types_path = _write_csv_pair(tmp_path, counts=counts)
    with pytest.raises(ReferenceFormatError, match=_names(counts_path) + ": 1 empty count value"):
        read_reference(counts_path, types_path)


def test_types_csv_with_no_type_column(tmp_path):
    types = pd.DataFrame(index=pd.Index(CELLS, name="cell_id"))
    counts_path, types_path = _write_csv_pair(tmp_path, types=types)
    with pytest.raises(ReferenceFormatError, match=_names(types_path) + ": no cell-type column"):
        read_reference(counts_path, types_path)


def test_types_with_no_overlap(tmp_path):
    types = pd.DataFrame({"cell_type": TYPES}, index=pd.Index([f"other{i}" for i in range(6)], name="cell_id"))
    counts_path, types_path = _write_csv_pair(tmp_path, types=types)
    with pytest.raises(ReferenceFormatError, match=_names(types_path) + ": no cell id is also in .*"
                       + _names(counts_path)):
        read_reference(counts_path, types_path)


def test_h5ad_without_type_column(tmp_path):
    path = _write_h5ad(tmp_path / "ref.h5ad", obs_column="label")
    with pytest.raises(ReferenceFormatError, match=_names(path) + r": no obs column 'cell_type'.*label"):
        read_reference(path)
    assert read_reference(path, type_column="label").obs["label"].tolist() == TYPES


def test_reference_lacking_panel_genes(tmp_path):
    path = _write_h5ad(tmp_path / "ref.h5ad")
    reference = read_reference(path)
    with pytest.raises(ReferenceFormatError, match=_names(path) + r": lacks 2 of the 3 panel genes.*ERBB2"):
        reference_profiles(reference, ["EPCAM", "ERBB2", "ESR1"])


def test_reference_lacking_a_requested_cell_type(tmp_path):
    path = _write_h5ad(tmp_path / "ref.h5ad")
    with pytest.raises(ReferenceFormatError, match=_names(path) + r": no cell of type \['plasma'\]"):
        reference_profiles(read_reference(path), GENES, ["epi", "plasma"])


def test_reference_errors_are_tessera_errors():
    assert issubclass(ReferenceFormatError, TesseraError) and not issubclass(ReferenceFormatError, ValueError)


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture
def st_folder(tmp_path):
    """One tiny HEST-style section (section.h5ad + he.tiff) that find_sections reads."""
    folder = tmp_path / "st" / "S1"
    folder.mkdir(parents=True)
    make_slide(folder / "he.tiff", width=400, height=300)
    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(3, (12, len(GENES))).astype(np.float32))
    adata.obs_names, adata.var_names = [f"s{i}" for i in range(12)], GENES
    adata.obsm["spatial"] = np.column_stack([np.linspace(100, 300, 12), np.full(12, 150.0)])
    adata.uns["mpp"] = 0.5
    adata.write_h5ad(folder / "section.h5ad")
    return tmp_path / "st"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("command", ["loso", "train-st"])
def test_cli_bad_reference_is_one_error_line(st_folder, tmp_path, capsys, command):
    from core.cli import main

    bad = tmp_path / "reference.h5ad"
    bad.write_bytes(np.random.default_rng(1).bytes(1024))
    argv = [command, "--st", str(st_folder), "--reference", str(bad), "--out", str(tmp_path / "x.json")]
    if command == "train-st":
        argv += ["--model-id", "m"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "not a readable .h5ad" in line
    assert not (tmp_path / "x.json").exists()


def test_cli_reference_without_panel_genes(st_folder, tmp_path, capsys):
    from core.cli import main

    counts = pd.DataFrame(np.ones((2, 2)), index=pd.Index(["a", "b"], name="cell_id"), columns=["X1", "X2"])
    counts.to_csv(tmp_path / "counts.csv")
    pd.DataFrame({"cell_type": ["t1", "t2"]}, index=pd.Index(["a", "b"], name="cell_id")).to_csv(tmp_path / "types.csv")
    argv = ["loso", "--st", str(st_folder), "--reference", str(tmp_path / "counts.csv"), "--types",
            str(tmp_path / "types.csv"), "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "counts.csv: lacks 3 of the 3 panel genes" in line


@pytest.mark.parametrize("content", [None, "", "# comments only\n\n"])
def test_cli_missing_or_empty_panel_file(st_folder, tmp_path, capsys, content):
    from core.cli import main

    panel = tmp_path / "panel.txt"
    if content is not None:
        panel.write_text(content)
    argv = ["loso", "--st", str(st_folder), "--reference", str(_write_h5ad(tmp_path / "ref.h5ad")),
            "--panel", str(panel), "--out", str(tmp_path / "x.json")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(panel) in line and ("no such gene-panel file" if content is None else "lists no gene") in line
    with pytest.raises(SectionFormatError):  # the same error, raised by the library
        from core.training.stdata import find_sections, panel_genes

        panel_genes(find_sections(st_folder), panel)
