"""Input checks: implausible µm/px, tile-count cap, cohort table keys and replacement, and capped,
safe reading of clinical tables and measured matrices (size, gzip and xlsx bombs, XML entities,
encodings, gene names that differ only by case)."""
from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import main as cli
from core.cohort import clinical_io, importer, measured
from core.cohort.clinical_io import read_raw
from core.cohort.importer import fix_slide_mpp, import_cohort, probe_slide, read_mpp_overrides
from core.cohort.measured import read_measured
from core.errors import (ClinicalFormatError, CohortExistsError, ImplausibleMppError, MeasuredFormatError,
                         MissingMppError, StoreError)
from core.store.db import Store
from core.vocab import (MAX_CLINICAL_FILE_BYTES, MAX_MEASURED_FILE_BYTES, MAX_TILES_PER_SLIDE, MPP_MAX, MPP_MIN,
                        SlideStatus)
from core.wsi.slide import Slide
from core.wsi.tiling import TilingParams
from tests.conftest import make_slide


def _no_tissue_mask(*args, **kwargs):
    raise AssertionError("the tissue mask must not be decoded for this slide")


# -- µm/px -------------------------------------------------------------------------------------

def _tiff_72dpi(path: Path) -> Path:
    """A tiled pyramidal TIFF whose resolution is 72 px per inch (an image editor's default)."""
    import tifffile

    from core.synth.tiff import pyramid

    rgb = np.full((600, 800, 3), 242, np.uint8)
    rgb[150:450, 200:600] = (200, 120, 180)
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid(rgb)):
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(72 / 2 ** i, 72 / 2 ** i), resolutionunit="INCH",
                     subfiletype=0 if i == 0 else 1, metadata=None)
    return path


def test_range_constants():
    assert (MPP_MIN, MPP_MAX) == (0.05, 5.0)


def test_72dpi_tiff_needs_mpp_without_decoding(tmp_path, monkeypatch):
    path = _tiff_72dpi(tmp_path / "TCGA-AA-0001-01Z-00-DX1.tiff")
    monkeypatch.setattr(importer, "tissue_mask", _no_tissue_mask)
    probe = probe_slide(path, tiling=TilingParams())
    assert probe.status == SlideStatus.NEEDS_MPP and probe.mpp is None
    assert "352.8 µm/px" in probe.message and "72 px per inch" in probe.message
    assert "0.05–5 µm/px" in probe.message
    with Slide(path) as slide, pytest.raises(ImplausibleMppError):
        slide.mpp
    assert issubclass(ImplausibleMppError, MissingMppError)
    monkeypatch.undo()  # a plausible override fixes it
    assert probe_slide(path, tiling=TilingParams(), mpp_override=0.5).status == SlideStatus.OK


def test_override_30_refused(tmp_path, slide_file, monkeypatch):
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"slide,mpp\n{slide_file.name},30\n")
    with pytest.raises(ClinicalFormatError, match=r"between 0.05 and 5 .*got 30"):
        read_mpp_overrides(csv)
    csv.write_text(f"slide,mpp\n{slide_file.name},4.5\n")
    assert read_mpp_overrides(csv) == {slide_file.name: 4.5}
    monkeypatch.setattr(importer, "tissue_mask", _no_tissue_mask)
    probe = probe_slide(slide_file, tiling=TilingParams(), mpp_override=30.0)
    assert probe.status == SlideStatus.NEEDS_MPP and "30 µm/px" in probe.message and "override" in probe.message
    with Store(tmp_path / "s.duckdb") as store, pytest.raises(ClinicalFormatError, match="between 0.05 and 5"):
        fix_slide_mpp(store, "c", str(slide_file), 30.0)


# -- tile-count cap ----------------------------------------------------------------------------

def test_absurd_tile_grid_refused_before_decoding(slide_file, monkeypatch):
    # 1 µm tiles at 0.5 µm/px: 2-px tiles, a grid of 800 × 600 = 480,000 tiles
    monkeypatch.setattr(importer, "tissue_mask", _no_tissue_mask)
    probe = probe_slide(slide_file, tiling=TilingParams(tile_um=1.0))
    assert probe.status == SlideStatus.TOO_LARGE and probe.n_tiles is None
    assert "480,000 tiles" in probe.message and f"{MAX_TILES_PER_SLIDE:,}" in probe.message


def test_more_tissue_tiles_than_the_cap(slide_file, monkeypatch):
    monkeypatch.setattr(importer, "MAX_TILES_PER_SLIDE", 5)
    monkeypatch.setattr(importer, "MAX_GRID_FACTOR", 1000)
    probe = probe_slide(slide_file, tiling=TilingParams())
    assert probe.status == SlideStatus.TOO_LARGE and probe.n_tiles > 5
    assert "more than the 5 one slide may have" in probe.message
    assert SlideStatus.TOO_LARGE.help


# -- cohort tables and replacement -------------------------------------------------------------

def _clinical(path: Path, patients: list[str]) -> Path:
    rows = "".join(f"{p},{i % 2},{100 + i}\n" for i, p in enumerate(patients))
    path.write_text("bcr_patient_barcode,OS,OS.time\n" + rows)
    return path


def test_names_that_slug_alike_keep_their_own_tables(tmp_path):
    a = _clinical(tmp_path / "a.csv", ["TCGA-AA-0001", "TCGA-AA-0002"])
    b = _clinical(tmp_path / "b.csv", ["TCGA-BB-0001", "TCGA-BB-0002", "TCGA-BB-0003"])
    with Store(tmp_path / "s.duckdb") as store:
        import_cohort(store, "TCGA-BRCA", None, a)
        import_cohort(store, "tcga brca", None, b)
        assert sorted(store.clinical("TCGA-BRCA")["bcr_patient_barcode"]) == ["TCGA-AA-0001", "TCGA-AA-0002"]
        assert len(store.clinical("tcga brca")) == 3
        tables = dict(store.con.execute("SELECT name, clinical_table FROM cohorts").fetchall())
        assert len(set(tables.values())) == 2 and all(t.startswith("clinical_tcga_brca_") for t in tables.values())


def test_old_store_table_names_still_read(tmp_path):
    a = _clinical(tmp_path / "a.csv", ["TCGA-AA-0001", "TCGA-AA-0002"])
    with Store(tmp_path / "s.duckdb") as store:
        store.con.execute("CREATE TABLE clinical_old AS SELECT 'TCGA-AA-0009' AS bcr_patient_barcode")
        store.con.execute("INSERT INTO cohorts VALUES ('old', 'clinical_old', '{}', now())")
        assert store.clinical("old")["bcr_patient_barcode"].tolist() == ["TCGA-AA-0009"]
        import_cohort(store, "old", None, a, replace=True)
        assert len(store.clinical("old")) == 2
        assert not store.con.execute("SELECT 1 FROM information_schema.tables "
                                     "WHERE table_name = 'clinical_old'").fetchall()  # the unused table went


def test_reimport_needs_replace(tmp_path):
    a = _clinical(tmp_path / "a.csv", ["TCGA-AA-0001", "TCGA-AA-0002"])
    b = _clinical(tmp_path / "b.csv", ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"])
    slides = tmp_path / "slides"
    slides.mkdir()
    make_slide(slides / "TCGA-AA-0001-01Z-00-DX1.tiff", width=800, height=600)
    with Store(tmp_path / "s.duckdb") as store:
        import_cohort(store, "c", None, a)
        with pytest.raises(CohortExistsError, match="already a cohort 'c'"):
            import_cohort(store, "c", None, b)
        assert issubclass(CohortExistsError, StoreError) and len(store.clinical("c")) == 2
        rep = import_cohort(store, "c", slides, None)  # adding slides without a clinical table: allowed
        assert (rep.slides["link"] == "linked").sum() == 1
        import_cohort(store, "c", None, b, replace=True)
        assert len(store.clinical("c")) == 3


def test_cli_import_replace(tmp_path, capsys):
    a = _clinical(tmp_path / "a.csv", ["TCGA-AA-0001", "TCGA-AA-0002"])
    store = tmp_path / "s.duckdb"
    base = ["import", "--clinical", str(a), "--name", "c", "--store", str(store)]
    assert cli(base) == 0
    assert cli(base) == 2 and "--replace" in capsys.readouterr().err
    assert cli([*base, "--replace"]) == 0


# -- clinical uploads --------------------------------------------------------------------------

def _gzip_bomb(path: Path, inflated: int, header: bytes = b"a,b\n") -> Path:
    """A small .gz of ``header`` then "0," repeated to ``inflated`` bytes, streamed through gzip."""
    chunk = b"0," * (1 << 17)
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(header)
        for _ in range(inflated // len(chunk) + 1):
            gz.write(chunk)
    return path


def test_gzip_bomb_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(clinical_io, "MAX_CLINICAL_INFLATED_BYTES", 2 * 2**20)
    bomb = _gzip_bomb(tmp_path / "clin.csv.gz", 3 * 2**20)
    assert bomb.stat().st_size < 20_000
    with pytest.raises(ClinicalFormatError, match="decompresses to more than 2 MB"):
        read_raw(bomb)
    small = tmp_path / "ok.csv.gz"
    small.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    assert read_raw(small).shape == (1, 2)


def test_oversized_file_refused(tmp_path):
    big = tmp_path / "clin.csv"
    with open(big, "wb") as fh:  # sparse: no 50 MB written
        fh.write(b"a,b\n")
        fh.truncate(MAX_CLINICAL_FILE_BYTES + 1)
    with pytest.raises(ClinicalFormatError, match="more than the 50 MB"):
        read_raw(big)


def _xlsx(path: Path, sheet_xml: bytes | None = None) -> Path:
    """A real workbook; ``sheet_xml`` replaces its first sheet's XML."""
    pd.DataFrame({"bcr_patient_barcode": ["TCGA-AA-0001"], "OS": ["1"]}).to_excel(path, index=False)
    if sheet_xml is None:
        return path
    with zipfile.ZipFile(path) as src:
        parts = {i.filename: src.read(i) for i in src.infolist()}
    parts["xl/worksheets/sheet1.xml"] = sheet_xml
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in parts.items():
            dst.writestr(name, data)
    return path


_SHEET = (b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData>'
          b'<row r="1"><c r="A1" t="inlineStr"><is><t>bcr_patient_barcode</t></is></c>'
          b'<c r="B1" t="inlineStr"><is><t>OS</t></is></c></row>'
          b'<row r="2"><c r="A2" t="inlineStr"><is><t>&lol9;</t></is></c><c r="B2"><v>1</v></c></row>'
          b'</sheetData></worksheet>')
_LAUGHS = (b'<!DOCTYPE worksheet [<!ENTITY lol "lol">'
           + b"".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
                      for i in range(1, 10)) + b"]>")


def test_xlsx_bomb_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(clinical_io, "MAX_CLINICAL_INFLATED_BYTES", 2 * 2**20)
    assert read_raw(_xlsx(tmp_path / "ok.xlsx")).shape == (1, 2)
    filler = b"<!-- " + b" " * (3 * 2**20) + b" -->"
    bomb = _xlsx(tmp_path / "bomb.xlsx", _SHEET.replace(b"&lol9;", b"x").replace(b"<sheetData>", filler + b"<sheetData>"))
    assert bomb.stat().st_size < 50_000
    with pytest.raises(ClinicalFormatError, match="decompresses to .* more than the 2 MB"):
        read_raw(bomb)


def test_xlsx_billion_laughs_refused(tmp_path):
    book = _xlsx(tmp_path / "laughs.xlsx", b'<?xml version="1.0"?>' + _LAUGHS + _SHEET)
    with pytest.raises(ClinicalFormatError, match="DTD"):
        read_raw(book)


def test_xlsx_entities_refused_by_defusedxml(tmp_path):
    """A DTD past the first 4 KB (behind a comment) escapes the quick check; openpyxl, parsing with
    defusedxml, refuses it."""
    import openpyxl.xml

    assert openpyxl.xml.DEFUSEDXML is True  # defusedxml is installed (requirements.txt)
    padding = b"<!-- " + b"x" * 8000 + b" -->"
    book = _xlsx(tmp_path / "laughs.xlsx", b'<?xml version="1.0"?>' + padding + _LAUGHS + _SHEET)
    with pytest.raises(ClinicalFormatError, match="cannot be opened as an Excel workbook"):
        read_raw(book)


def test_non_utf8_csv_read(tmp_path):
    cp1252 = tmp_path / "win.csv"
    cp1252.write_bytes("bcr_patient_barcode,name\nTCGA-AA-0001,Müller–Smith “x”\n".encode("cp1252"))
    from core.cohort.clinical_values import Issues

    issues = Issues()
    assert read_raw(cp1252, issues=issues)["name"].iloc[0] == "Müller–Smith “x”"
    assert any("Windows-1252" in i.message for i in issues)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"bcr_patient_barcode,name\nTCGA-AA-0001,M\xfcller\x81\n")  # 0x81: undefined in cp1252
    assert read_raw(latin1)["name"].iloc[0] == "Müller\x81"
    utf16 = tmp_path / "unicode.txt"  # Excel's "Unicode text": UTF-16 with a BOM, tab-separated
    utf16.write_bytes("bcr_patient_barcode\tname\nTCGA-AA-0001\tMüller\n".encode("utf-16"))
    df = read_raw(utf16)
    assert list(df.columns) == ["bcr_patient_barcode", "name"] and df["name"].iloc[0] == "Müller"


# -- measured matrices -------------------------------------------------------------------------

COHORT = ["TCGA-A2-A0CM", "TCGA-BH-A0FJ", "TCGA-E2-A1B6"]


def test_measured_caps(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "MAX_MEASURED_INFLATED_BYTES", 2 * 2**20)
    bomb = _gzip_bomb(tmp_path / "m.csv.gz", 3 * 2**20, header=b"gene," + ",".join(COHORT).encode() + b"\n")
    with pytest.raises(MeasuredFormatError, match="decompresses to more than 2 MB"):
        read_measured(bomb, COHORT)
    big = tmp_path / "m.csv"
    with open(big, "wb") as fh:
        fh.truncate(MAX_MEASURED_FILE_BYTES + 1)
    with pytest.raises(MeasuredFormatError, match="more than the"):
        read_measured(big, COHORT)
    df = pd.DataFrame(np.ones((3, 400)), index=COHORT, columns=[f"G{i}" for i in range(400)])
    df.to_parquet(tmp_path / "m.parquet")
    monkeypatch.setattr(measured, "MAX_MEASURED_INFLATED_BYTES", 1000)
    with pytest.raises(MeasuredFormatError, match="uncompressed data"):
        read_measured(tmp_path / "m.parquet", COHORT)


def test_case_clash_genes_refused(tmp_path):
    df = pd.DataFrame(np.arange(9.0).reshape(3, 3), index=COHORT, columns=["TP53", "tp53", "ESR1"])
    df.to_csv(tmp_path / "m.csv")
    with pytest.raises(MeasuredFormatError, match=r"differ only by case \(TP53 / tp53\)"):
        read_measured(tmp_path / "m.csv", COHORT)
    df.T.to_csv(tmp_path / "t.csv")  # genes × patients: the same
    with pytest.raises(MeasuredFormatError, match="differ only by case"):
        read_measured(tmp_path / "t.csv", COHORT)
    df.columns = ["TP53", "TP53", "ESR1"]  # exact duplicates: the first kept, as before
    df.to_csv(tmp_path / "d.csv")
    assert list(read_measured(tmp_path / "d.csv", COHORT).matrix.columns) == ["TP53", "ESR1"]
