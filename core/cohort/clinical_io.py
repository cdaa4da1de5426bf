"""Reading a clinical table file (CSV/TSV, gzipped or not, or an XLSX sheet) as a frame of strings.

The file-level half of :func:`core.cohort.clinical.read_clinical`: suffix and separator detection,
text encodings, Excel sheets, malformed lines and spreadsheet index columns, each turned into a
:class:`~core.errors.ClinicalFormatError` or a :class:`~core.cohort.clinical_values.ClinicalIssue`.
"""
from __future__ import annotations

import csv
import gzip
import io
import zipfile
import zlib
from pathlib import Path
from xml.etree.ElementTree import ParseError

import pandas as pd

from core.cohort.clinical_values import Issues, some
from core.errors import ClinicalFormatError
from core.vocab import MAX_CLINICAL_FILE_BYTES, MAX_CLINICAL_INFLATED_BYTES

_EXCEL = (".xlsx", ".xlsm")
_TEXT = (".csv", ".tsv", ".txt", ".tab", ".csv.gz", ".tsv.gz", ".txt.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*_TEXT, *_EXCEL, ".xls") if name.endswith(s)), path.suffix.lower())


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def check_file_size(path: Path, max_bytes: int, *, error=ClinicalFormatError, what: str = "clinical table") -> None:
    """Refuse a file larger than ``max_bytes`` on disk before anything reads it."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path.name} is {_mb(size)}, more than the {_mb(max_bytes)} a {what} may have. "
                    "Give only the columns and rows needed, or split the file.")


def read_gzip_capped(path: Path, max_bytes: int, *, error=ClinicalFormatError, what: str = "clinical table",
                     keep: bool = True) -> bytes:
    """The decompressed content of a .gz file, refused once it passes ``max_bytes`` (a gzip
    "bomb": a small file that inflates to gigabytes). ``keep=False`` only counts (streaming, in
    1 MB pieces) and returns b''."""
    total, parts = 0, []
    try:
        with gzip.open(path, "rb") as fh:
            while True:
                piece = fh.read(min(2**20, max_bytes + 1 - total))
                if not piece:
                    break
                total += len(piece)
                if total > max_bytes:
                    raise error(f"{path.name} decompresses to more than {_mb(max_bytes)}, the most a {what} "
                                "may have (a damaged or malicious archive?); not read. Give a smaller file.")
                if keep:
                    parts.append(piece)
    except (OSError, EOFError, zlib.error) as e:
        raise error(f"{path.name} cannot be decompressed ({e}); give an uncompressed CSV or TSV, or gzip it "
                    "again.") from e
    return b"".join(parts)


def _check_workbook(path: Path) -> None:
    """Before openpyxl opens it: the members' decompressed sizes are capped, and no XML part may
    declare a DTD (entity expansion: "billion laughs"). Python's zipfile never inflates a member past
    the size its directory declares (it fails the CRC check), so the declared sizes are binding."""
    try:
        with zipfile.ZipFile(path) as book:
            members = book.infolist()
            total = sum(m.file_size for m in members)
            if total > MAX_CLINICAL_INFLATED_BYTES:
                big = max(members, key=lambda m: m.file_size)
                raise ClinicalFormatError(
                    f"{path.name} decompresses to {_mb(total)} ({big.filename}: {_mb(big.file_size)}), more "
                    f"than the {_mb(MAX_CLINICAL_INFLATED_BYTES)} a clinical workbook may have. Export the "
                    "sheet as CSV, or remove what is not needed.")
            for m in members:
                if m.filename.lower().endswith((".xml", ".rels", ".vml")):
                    with book.open(m) as fh:
                        head = fh.read(4096).replace(b"\x00", b"")
                    if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
                        raise ClinicalFormatError(
                            f"{path.name}: {m.filename} declares a DTD (<!DOCTYPE/<!ENTITY>), which Excel never "
                            "writes and which can expand without bound; not read. Save the workbook again from "
                            "Excel, or export the sheet as CSV.")
    except zipfile.BadZipFile as e:
        raise ClinicalFormatError(f"{path.name} cannot be opened as an Excel workbook ({e}). Save it again "
                                  "from Excel as .xlsx, or export the sheet as CSV.") from e


def _read_excel(path: Path, sheet, nrows: int | None) -> pd.DataFrame:
    _check_workbook(path)
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
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, ParseError) as e:
        # ValueError includes defusedxml's refusals (openpyxl parses with defusedxml when installed)
        raise ClinicalFormatError(f"{path.name} cannot be opened as an Excel workbook ({e}). Save it again "
                                  "from Excel as .xlsx, or export the sheet as CSV.") from e


# Tried in order: UTF-8 (with or without Excel's BOM), Windows-1252 (Excel's "CSV" on Windows), then
# Latin-1, which decodes any byte sequence.
_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")


def _decode(path: Path, data: bytes) -> tuple[str, str]:
    """The file's text and the encoding it was read with; refuses zip and binary content."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text": UTF-16 with a BOM
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as e:
            raise ClinicalFormatError(f"{path.name} starts as UTF-16 text but is not ({e}); save it as UTF-8 "
                                      "CSV.") from e
    if data.startswith(b"PK\x03\x04"):
        raise ClinicalFormatError(f"{path.name} is a zip/Excel file with a text suffix; rename it to .xlsx.")
    if b"\x00" in data[:65536]:
        raise ClinicalFormatError(f"{path.name} is a binary file, not a text table. Give a CSV, TSV or XLSX.")
    for encoding in _ENCODINGS:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise ClinicalFormatError(f"{path.name}: unknown text encoding; save it as UTF-8 CSV.")  # pragma: no cover


def _read_text(path: Path, nrows: int | None, bad_lines: list) -> tuple[pd.DataFrame, str]:
    if path.name.lower().endswith(".gz"):
        data = read_gzip_capped(path, MAX_CLINICAL_INFLATED_BYTES)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ClinicalFormatError(f"{path.name} cannot be read ({e}); give an uncompressed CSV or TSV.") from e
    text, encoding = _decode(path, data)
    del data
    first = text[:65536].splitlines()[0] if text.strip() else ""
    sep = "\t" if "\t" in first else (";" if first.count(";") > first.count(",") else ",")
    text = _drop_long_rows(text, sep, bad_lines)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, nrows=nrows, na_values=["'--"], engine="python",
                         index_col=False, on_bad_lines=lambda fields: bad_lines.append(fields))
    except pd.errors.EmptyDataError as e:
        raise ClinicalFormatError(f"{path.name} is empty; export the clinical table again.") from e
    except (pd.errors.ParserError, csv.Error) as e:
        raise ClinicalFormatError(f"{path.name} could not be parsed as a table ({e}). Check that it is a "
                                  "CSV/TSV with one header row.") from e
    if df.columns.size and str(df.columns[0]).startswith("\ufeff"):  # a BOM inside UTF-16 text
        df = df.rename(columns={df.columns[0]: str(df.columns[0]).lstrip("\ufeff")})
    return df, encoding


def _drop_long_rows(text: str, sep: str, bad_lines: list) -> str:
    """Rows with more fields than the header are set aside (reported as malformed). Left in, pandas
    would either call them bad lines or, when the first data row is the long one, silently read
    its extra leading fields as a row index and shift every column."""
    rows = list(csv.reader(io.StringIO(text), delimiter=sep))
    if not rows:
        return text
    width = len(rows[0])
    long = [r for r in rows[1:] if len(r) > width]
    if not long:
        return text
    bad_lines.extend(long)
    out = io.StringIO()
    writer = csv.writer(out, delimiter=sep, lineterminator="\n")
    writer.writerows([rows[0], *(r for r in rows[1:] if len(r) <= width)])
    return out.getvalue()


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
    check_file_size(path, MAX_CLINICAL_FILE_BYTES)
    if kind in _EXCEL:
        df = _read_excel(path, sheet, nrows)
    elif kind in _TEXT:
        df, encoding = _read_text(path, nrows, bad_lines)
        if encoding not in ("utf-8-sig", "utf-16") and issues is not None:
            name = {"cp1252": "Windows-1252", "latin-1": "Latin-1"}[encoding]
            issues.add("info", f"{path.name} is not UTF-8; read it as {name} text. Check accented names, or "
                       "save it as UTF-8 CSV.")
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
