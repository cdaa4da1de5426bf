"""Reading a clinical table file (CSV/TSV, gzipped or not, or an XLSX sheet) as a frame of strings.

The file-level half of :func:`core.cohort.clinical.read_clinical`: suffix and separator detection,
text encodings, Excel sheets, malformed lines and spreadsheet index columns, each turned into a
:class:`~core.errors.ClinicalFormatError` or a :class:`~core.cohort.clinical_values.ClinicalIssue`.
"""
from __future__ import annotations

import csv
import gzip
import zipfile
from pathlib import Path

import pandas as pd

from core.cohort.clinical_values import Issues, some
from core.errors import ClinicalFormatError

_EXCEL = (".xlsx", ".xlsm")
_TEXT = (".csv", ".tsv", ".txt", ".tab", ".csv.gz", ".tsv.gz", ".txt.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*_TEXT, *_EXCEL, ".xls") if name.endswith(s)), path.suffix.lower())


def _read_excel(path: Path, sheet, nrows: int | None) -> pd.DataFrame:
    try:
        with pd.ExcelFile(path, engine="openpyxl") as book:
            if sheet is None:
                sheet = "TCGA-CDR" if "TCGA-CDR" in book.sheet_names else book.sheet_names[0]
            elif sheet not in book.sheet_names and not isinstance(sheet, int):
                raise ClinicalFormatError(f"{path.name} has no sheet {sheet!r}; its sheets are "
                                          f"{', '.join(book.sheet_names)}.")
            return book.parse(sheet, dtype=str, nrows=nrows, na_values=["'--"])
    except ClinicalFormatError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ClinicalFormatError(f"{path.name} cannot be opened as an Excel workbook ({e}). Save it again "
                                  "from Excel as .xlsx, or export the sheet as CSV.") from e


def _read_text(path: Path, nrows: int | None, bad_lines: list) -> pd.DataFrame:
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as e:
        raise ClinicalFormatError(f"{path.name} cannot be read ({e}); give an uncompressed CSV or TSV.") from e
    if head.startswith(b"PK\x03\x04"):
        raise ClinicalFormatError(f"{path.name} is a zip/Excel file with a text suffix; rename it to .xlsx.")
    if b"\x00" in head:
        raise ClinicalFormatError(f"{path.name} is a binary file, not a text table. Give a CSV, TSV or XLSX.")
    first = head.decode("latin-1").splitlines()[0] if head.strip() else ""
    sep = "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")
    for encoding in ("utf-8-sig", "latin-1"):  # utf-8-sig: Excel writes a BOM
        try:
            return pd.read_csv(path, sep=sep, dtype=str, nrows=nrows, na_values=["'--"], engine="python",
                               encoding=encoding, on_bad_lines=lambda fields: bad_lines.append(fields))
        except UnicodeDecodeError:
            continue
        except pd.errors.EmptyDataError as e:
            raise ClinicalFormatError(f"{path.name} is empty; export the clinical table again.") from e
        except (pd.errors.ParserError, csv.Error) as e:
            raise ClinicalFormatError(f"{path.name} could not be parsed as a table ({e}). Check that it is a "
                                      "CSV/TSV with one header row.") from e
    raise ClinicalFormatError(f"{path.name}: unknown text encoding; save it as UTF-8 CSV.")


def read_raw(path: str | Path, *, sheet=None, nrows: int | None = None,
             issues: Issues | None = None) -> pd.DataFrame:
    """The file as a frame of strings (NaN when empty); raises ClinicalFormatError when it is no table."""
    path = Path(path)
    if not path.is_file():
        raise ClinicalFormatError(f"No clinical file at {path}; check the path.")
    kind = _suffix(path)
    if kind == ".xls":
        raise ClinicalFormatError(f"{path.name} is an old .xls workbook; save it as .xlsx or CSV.")
    bad_lines: list = []
    if kind in _EXCEL:
        df = _read_excel(path, sheet, nrows)
    elif kind in _TEXT:
        df = _read_text(path, nrows, bad_lines)
    else:
        raise ClinicalFormatError(f"{path.name}: unsupported file type {kind or '(none)'}; give CSV, TSV or XLSX.")
    if df.shape[1] < 2:
        raise ClinicalFormatError(f"{path.name} has {df.shape[1]} column(s) ({some(df.columns)}): not a "
                                  "clinical table. It needs a header row and columns separated by commas or tabs.")
    df.columns = [str(c).strip() for c in df.columns]
    if bad_lines and issues is not None:
        issues.add("warning", f"Skipped {len(bad_lines)} malformed line(s) with more fields than the header "
                   f"(first fields: {some(f[0] for f in bad_lines)}). Fix them in the file to import them.")
    return df


def _drop_index_columns(df: pd.DataFrame, issues: Issues) -> pd.DataFrame:
    """Unnamed columns that are empty or a running row number (spreadsheet index) carry no data."""
    drop = []
    for c in (c for c in df.columns if c.startswith("Unnamed:")):
        num = pd.to_numeric(df[c], errors="coerce")
        if df[c].isna().all() or (num.notna().all() and (num.diff().dropna() == 1).all()):
            drop.append(c)
    if drop:
        issues.add("info", f"Ignored {len(drop)} unnamed column(s) holding only a row number or nothing.")
    return df.drop(columns=drop)


def preview_columns(path: str | Path, *, sheet=None) -> list[str]:
    """Header of the table (the ``TCGA-CDR`` sheet of a workbook that has one, else its first sheet)."""
    return list(read_raw(path, sheet=sheet, nrows=0).columns)
