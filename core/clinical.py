"""Clinical tables as users have them (TCGA-CDR, GDC export, any table + a column mapping).

Whatever the input, :func:`read_clinical` returns one row per patient: ``bcr_patient_barcode``
(upper-case 12-character TCGA patient barcode, or the user's id), then ``OS, OS.time, DSS,
DSS.time, DFI, DFI.time, PFI, PFI.time`` (events 0/1 as float, times in **days** as float, NaN
when unknown), then every other column as a covariate. Every row removed and every value
nulled is reported as a :class:`ClinicalIssue`.
"""
from __future__ import annotations

import csv
import gzip
import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from core.errors import ClinicalFormatError

log = logging.getLogger(__name__)

ENDPOINTS = ("OS", "DSS", "DFI", "PFI")
ENDPOINT_COLUMNS = tuple(c for ep in ENDPOINTS for c in (ep, f"{ep}.time"))
FORMATS = ("tcga-cdr", "gdc", "generic")
DAYS_PER = {"days": 1.0, "months": 30.4375, "years": 365.25}
_EXCEL = (".xlsx", ".xlsm")
_TEXT = (".csv", ".tsv", ".txt", ".tab", ".csv.gz", ".tsv.gz", ".txt.gz")
# Strings that mean "not known" in TCGA, GDC and cBioPortal files; read as missing, not as odd.
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "none", "null", "--", "'--", "not reported", "unknown",
                             "[not available]", "[unknown]", "[not applicable]", "[discrepancy]",
                             "[not evaluated]", "[not reported]"})
EVENT_WORDS = {"dead": 1, "deceased": 1, "died": 1, "yes": 1, "true": 1, "event": 1, "progression": 1,
               "recurred": 1, "recurred/progressed": 1, "relapse": 1, "alive": 0, "living": 0, "no": 0,
               "false": 0, "censored": 0, "diseasefree": 0, "disease free": 0}
_CBIO_EVENT = re.compile(r"^\s*([01])\s*:")  # cBioPortal "1:DECEASED", "0:DiseaseFree"
_TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(?:-|$)", re.IGNORECASE)


@dataclass(frozen=True)
class ClinicalIssue:
    """One finding of an import; ``patients`` lists every patient concerned (``patient`` when one)."""

    severity: str  # "error" | "warning" | "info"
    patient: str | None
    column: str | None
    message: str
    patients: tuple[str, ...] = ()


@dataclass(frozen=True)
class ColumnMapping:
    """Which columns of a generic table hold what.

    ``endpoints`` maps an endpoint (OS, DSS, DFI, PFI) to ``(time_col, event_col)``; ``time_col``
    may be a tuple of columns, the first non-missing per row is used (e.g. ``("days_to_death",
    "days_to_last_follow_up")``). Times are in ``time_unit`` (days, months = 30.4375 days,
    years = 365.25 days). ``event_values`` adds/overrides strings read as 1/0 (case-insensitive);
    built in: Dead/Alive, Deceased/Living, yes/no, true/false, 0/1 and cBioPortal "1:DECEASED".
    ``covariates=None`` keeps every column not used above.
    """

    patient: str
    endpoints: Mapping[str, tuple] = field(default_factory=dict)
    time_unit: str = "days"
    event_values: Mapping[str, int] | None = None
    covariates: list[str] | None = None

    def __post_init__(self):
        if self.time_unit not in DAYS_PER:
            raise ClinicalFormatError(f"time_unit {self.time_unit!r} is not one of {', '.join(DAYS_PER)}.")
        odd = [k for k in self.endpoints if k not in ENDPOINTS]
        if odd:
            raise ClinicalFormatError(f"Unknown endpoint(s) {', '.join(map(str, odd))}; use {', '.join(ENDPOINTS)}.")
        bad = {k: v for k, v in (self.event_values or {}).items() if v not in (0, 1)}
        if bad:
            raise ClinicalFormatError(f"event_values must map to 0 or 1; got {bad}.")

    def columns(self) -> list[str]:
        """Every column the mapping names (patient, time and event columns, covariates)."""
        cols = [self.patient]
        for time_col, event_col in self.endpoints.values():
            cols += [*_as_tuple(time_col), event_col]
        return cols + list(self.covariates or [])


@dataclass(frozen=True, eq=False)
class ClinicalImport:
    """The normalised patient table, the detected format and everything worth telling the user."""

    table: pd.DataFrame
    format: str
    issues: tuple[ClinicalIssue, ...]
    n_rows_read: int
    mapping: ColumnMapping | None = None

    @property
    def n_patients(self) -> int:
        return len(self.table)

    @property
    def n_events(self) -> dict[str, int]:
        """Number of events (value 1) per endpoint."""
        return {ep: int((self.table[ep] == 1).sum()) for ep in ENDPOINTS}

    def issues_of(self, severity: str) -> list[ClinicalIssue]:
        return [i for i in self.issues if i.severity == severity]


class Issues(list):
    """Collects :class:`ClinicalIssue` while an import runs."""

    def add(self, severity: str, message: str, *, column: str | None = None, patients=()) -> None:
        pts = tuple(dict.fromkeys(str(p) for p in patients))
        self.append(ClinicalIssue(severity, pts[0] if len(pts) == 1 else None, column, message, pts))
        log.debug("%s: %s", severity, message)


def some(values, limit: int = 8) -> str:
    """``a, b, c and 12 more`` for messages."""
    vals = [str(v) for v in dict.fromkeys(values)]
    head = ", ".join(vals[:limit])
    return head + (f" and {len(vals) - limit} more" if len(vals) > limit else "")


def _as_tuple(cols) -> tuple[str, ...]:
    return tuple(cols) if isinstance(cols, (tuple, list)) else (cols,)


# ---------------------------------------------------------------- reading the file

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


def _detect(columns) -> str:
    cols = {str(c).strip() for c in columns}
    if "bcr_patient_barcode" in cols and cols & set(ENDPOINT_COLUMNS):
        return "tcga-cdr"
    if cols & {"cases.submitter_id", "case_submitter_id"}:
        return "gdc"
    return "generic"


def detect_format(path: str | Path, *, sheet=None) -> str:
    """``"tcga-cdr"``, ``"gdc"`` or ``"generic"``, judged from the column names only."""
    return _detect(preview_columns(path, sheet=sheet))


# ---------------------------------------------------------------- guessing a mapping

def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


_PATIENT_NAMES = ("bcr_patient_barcode", "patient_id", "patient", "case_submitter_id", "cases_submitter_id",
                  "submitter_id", "case_id", "patientid", "subject_id", "subject", "participant_id",
                  "sample_id", "sample", "id")
_OS_EXTRA = (("overall_survival_months", "survival_time", "survival_months", "time", "futime", "days_to_death"),
             ("overall_survival_status", "survival_status", "event", "status", "fustat", "vital_status"))


def _endpoint_names(ep: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(time names, event names) for an endpoint; cBioPortal's DFS/PFS are the CDR's DFI/PFI."""
    names = {"DFI": ("dfi", "dfs"), "PFI": ("pfi", "pfs")}.get(ep, (ep.lower(),))
    times = tuple(f"{n}_{u}" for n in names for u in ("time", "days", "months", "years"))
    events = tuple(f"{n}{s}" for n in names for s in ("", "_status", "_event"))
    return (times + _OS_EXTRA[0], events + _OS_EXTRA[1]) if ep == "OS" else (times, events)


def suggest_mapping(columns) -> ColumnMapping | None:
    """A guess from common column names (cBioPortal ``OS_MONTHS``/``OS_STATUS``, ``time``/``status``,
    ``days_to_death``/``vital_status``, …); None when no patient id or no endpoint is recognised."""
    by_norm = {}
    for c in columns:
        by_norm.setdefault(_norm(c), c)
    patient = next((by_norm[n] for n in _PATIENT_NAMES if n in by_norm), None)
    endpoints, units = {}, []
    for ep in ENDPOINTS:
        time_names, event_names = _endpoint_names(ep)
        time_col = next((by_norm[n] for n in time_names if n in by_norm), None)
        event_col = next((by_norm[n] for n in event_names if n in by_norm), None)
        if time_col is None or event_col is None:
            continue
        if _norm(time_col) == "days_to_death":
            follow = [by_norm[n] for n in ("days_to_last_follow_up", "days_to_last_followup") if n in by_norm]
            time_col = (time_col, *follow) if follow else time_col
        endpoints[ep] = (time_col, event_col)
        units.append(next((u for u in ("month", "year") if u in _norm(_as_tuple(time_col)[0])), "day") + "s")
    if patient is None or not endpoints:
        return None
    return ColumnMapping(patient=patient, endpoints=endpoints, time_unit=units[0])


# ---------------------------------------------------------------- value cleaning (shared with clinical_gdc)

def is_missing(values: pd.Series) -> pd.Series:
    """True where a value is empty or a known 'not known' marker (see MISSING_MARKERS)."""
    return values.isna() | values.astype("string").str.strip().str.lower().isin(MISSING_MARKERS).fillna(True)


def parse_events(values: pd.Series, ids: pd.Series, column: str, issues: Issues,
                 extra: Mapping[str, int] | None = None) -> pd.Series:
    """Event indicators as float 1/0; values outside the allowed set become NaN with a warning."""
    words = {**EVENT_WORDS, **{str(k).strip().lower(): int(v) for k, v in (extra or {}).items()}}
    text = values.astype("string").str.strip()
    out = text.str.lower().map(words).astype(float)
    num = pd.to_numeric(text, errors="coerce")
    out = out.fillna(num.where(num.isin([0, 1])))
    cbio = text.str.extract(_CBIO_EVENT)[0]
    out = out.fillna(pd.to_numeric(cbio, errors="coerce")).astype(float)
    odd = out.isna() & ~is_missing(values)
    if odd.any():
        issues.add("warning", f"{column}: {int(odd.sum())} value(s) are not a recognised event code "
                   f"({some(repr(v) for v in text[odd])}); set to missing. Allowed: 0/1, Dead/Alive, yes/no, "
                   "'1:DECEASED'/'0:LIVING' — or add them to event_values.", column=column, patients=ids[odd])
    return out


def clean_times(values: pd.Series, ids: pd.Series, column: str, issues: Issues,
                days_per_unit: float = 1.0) -> pd.Series:
    """Times converted to days (``days_per_unit`` days per input unit); odd or negative → NaN + warning."""
    num = pd.to_numeric(values.astype("string").str.strip(), errors="coerce").astype(float)
    odd = num.isna() & ~is_missing(values)
    if odd.any():
        issues.add("warning", f"{column}: {int(odd.sum())} value(s) are not numbers "
                   f"({some(repr(v) for v in values[odd])}); set to missing.", column=column, patients=ids[odd])
    neg = num < 0
    if neg.any():
        issues.add("warning", f"{column}: {int(neg.sum())} negative time(s) set to missing (patients "
                   f"{some(ids[neg])}). Times count from diagnosis and cannot be negative; check the source.",
                   column=column, patients=ids[neg])
        num = num.mask(neg)
    return num * days_per_unit


def report_missing(table: pd.DataFrame, issues: Issues) -> None:
    """One info per endpoint column with missing values (those patients drop out of that analysis)."""
    for ep in ENDPOINTS:
        if table[[ep, f"{ep}.time"]].isna().all(axis=None):
            issues.add("info", f"No {ep} data in this file; {ep} analyses are unavailable.", column=ep)
            continue
        for col in (ep, f"{ep}.time"):
            miss = table[col].isna()
            if miss.any():
                ids = table.loc[miss, "bcr_patient_barcode"]
                issues.add("info", f"{col} is missing for {int(miss.sum())} of {len(table)} patients ({some(ids)}); "
                           f"they are left out of {ep} analyses.", column=col, patients=ids)


def normalise_ids(raw: pd.Series, issues: Issues) -> pd.Series:
    """Patient ids stripped; TCGA sample/aliquot barcodes shortened to the upper-case 12-char patient."""
    text = raw.astype("string").str.strip()
    tcga = text.str.extract(_TCGA_PATIENT)[0].str.upper()
    shortened = (tcga.notna() & (tcga.str.len() < text.str.len())).fillna(False)
    if shortened.any():
        ex = text[shortened].iloc[0]
        issues.add("info", f"{int(shortened.sum())} TCGA sample/aliquot barcode(s) shortened to patient "
                   f"barcodes (e.g. {ex} → {tcga[shortened].iloc[0]}).", patients=tcga[shortened])
    return tcga.fillna(text).replace("", pd.NA)


def keep_identified(df: pd.DataFrame, ids: pd.Series, issues: Issues, *, dedupe: bool = True):
    """Rows without an id dropped; with ``dedupe`` duplicate ids keep their first row. Both reported."""
    empty = ids.isna()
    if empty.any():
        lines = (empty.index[empty.to_numpy()] + 2).tolist()  # +2: header row, 1-based numbering
        issues.add("warning", f"Dropped {int(empty.sum())} row(s) without a patient id (file lines {some(lines)}).")
    df, ids = df[~empty], ids[~empty]
    if dedupe:
        dup = ids.duplicated(keep="first")
        if dup.any():
            issues.add("warning", f"{int(dup.sum())} duplicate row(s) for {ids[dup].nunique()} patient id(s) "
                       f"({some(ids[dup])}); kept the first row of each, dropped the others.", patients=ids[dup])
        df, ids = df[~dup], ids[~dup]
    return df.reset_index(drop=True), ids.reset_index(drop=True).astype(object)


def infer_numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Text columns whose every non-missing value is a number become numeric."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object or isinstance(out[c].dtype, pd.StringDtype):
            num = pd.to_numeric(out[c], errors="coerce")
            if num.notna().sum() == out[c].notna().sum() and num.notna().any():
                out[c] = num
    return out


def assemble(ids: pd.Series, endpoints: dict, covariates: pd.DataFrame, issues: Issues) -> pd.DataFrame:
    """The normalised table: id, the 8 endpoint columns (NaN when absent), then covariates."""
    out = pd.DataFrame({"bcr_patient_barcode": ids.astype(object).to_numpy()})
    for ep in ENDPOINTS:
        event, time = endpoints.get(ep, (None, None))
        out[ep] = np.nan if event is None else event.to_numpy(dtype=float)
        out[f"{ep}.time"] = np.nan if time is None else time.to_numpy(dtype=float)
    cov = infer_numeric(covariates.reset_index(drop=True))
    clash = [c for c in cov.columns if c in out.columns]
    if clash:
        cov = cov.rename(columns={c: f"{c}_original" for c in clash})
        issues.add("info", f"Column(s) {some(clash)} kept as {some(c + '_original' for c in clash)} so they "
                   "do not collide with the normalised columns.")
    return pd.concat([out, cov], axis=1)


# ---------------------------------------------------------------- the three formats

def _require(columns, needed, what: str, name: str) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        raise ClinicalFormatError(f"{name}: the {what} needs column(s) {some(missing, 20)}, which are not in the "
                                  f"file. Columns present: {some(columns, 40)}.")


def _endpoint(ep: str, events: pd.Series, times: pd.Series, ids: pd.Series, issues: Issues, *,
              days_per_unit: float = 1.0, event_values=None) -> tuple[pd.Series, pd.Series]:
    """(event 0/1, time in days) of one endpoint; an error when the source had values but none is usable."""
    ev = parse_events(events, ids, ep, issues, event_values)
    t = clean_times(times, ids, f"{ep}.time", issues, days_per_unit)
    for col, src, out in ((ep, events, ev), (f"{ep}.time", times, t)):
        if out.isna().all() and not is_missing(src).all():
            issues.add("error", f"{col}: none of the values could be used (see the warnings above); {ep} "
                       "analyses are unavailable. Check the column choice and the event values.", column=col)
    return ev, t


def _from_cdr(raw: pd.DataFrame, issues: Issues, name: str) -> pd.DataFrame:
    pairs = [ep for ep in ENDPOINTS if {ep, f"{ep}.time"} <= set(raw.columns)]
    _require(raw.columns, ["bcr_patient_barcode", *([] if pairs else ["OS", "OS.time"])], "TCGA-CDR format", name)
    for col in (c for c in ENDPOINT_COLUMNS if c in raw.columns and c.split(".")[0] not in pairs):
        issues.add("warning", f"{col} has no partner column ({col.split('.')[0]} needs both event and time); "
                   f"kept as a covariate only.", column=col)
    if "Redaction" in raw.columns:
        red = ~is_missing(raw["Redaction"])
        if red.any():
            ids = raw.loc[red, "bcr_patient_barcode"]
            issues.add("warning", f"Dropped {int(red.sum())} patient(s) marked in 'Redaction' ({some(ids)}); "
                       "the CDR authors advise against using them.", column="Redaction", patients=ids)
        raw = raw[~red].drop(columns="Redaction")
    df, ids = keep_identified(raw, normalise_ids(raw["bcr_patient_barcode"], issues), issues)
    endpoints = {ep: _endpoint(ep, df[ep], df[f"{ep}.time"], ids, issues) for ep in pairs}
    used = ["bcr_patient_barcode", *(c for ep in pairs for c in (ep, f"{ep}.time"))]
    return assemble(ids, endpoints, df.drop(columns=used), issues)


def _resolve(columns, name: str) -> str:
    """Exact column name, else a case/space-insensitive match; the name itself when absent."""
    if name in columns:
        return name
    return next((c for c in columns if str(c).strip().lower() == str(name).strip().lower()), name)


def _hint_units(ep: str, times: pd.Series, issues: Issues) -> None:
    if times.notna().any() and times.median() < 100:
        issues.add("warning", f"{ep}.time: the median time is {times.median():.1f} days, short for survival data. "
                   "If the column holds months or years, set the time unit accordingly.", column=f"{ep}.time")


def _from_generic(raw: pd.DataFrame, mapping: ColumnMapping, issues: Issues, name: str) -> pd.DataFrame:
    cols = list(raw.columns)
    _require(cols, [_resolve(cols, c) for c in mapping.columns()], "column mapping", name)
    patient = _resolve(cols, mapping.patient)
    df, ids = keep_identified(raw, normalise_ids(raw[patient], issues), issues)
    endpoints, used = {}, {patient}
    for ep, (time_cols, event_col) in mapping.endpoints.items():
        tcols, ecol = [_resolve(cols, c) for c in _as_tuple(time_cols)], _resolve(cols, event_col)
        used.update([*tcols, ecol])
        first_time = df[tcols].bfill(axis=1).iloc[:, 0]  # first non-missing of the time columns
        endpoints[ep] = _endpoint(ep, df[ecol], first_time, ids, issues, days_per_unit=DAYS_PER[mapping.time_unit],
                                  event_values=mapping.event_values)
        if mapping.time_unit == "days":
            _hint_units(ep, endpoints[ep][1], issues)
    keep = ([_resolve(cols, c) for c in mapping.covariates] if mapping.covariates is not None
            else [c for c in cols if c not in used])
    return assemble(ids, endpoints, df[keep], issues)


def _guess_mapping(columns, issues: Issues, name: str) -> ColumnMapping:
    mapping = suggest_mapping(columns)
    if mapping is None:
        raise ClinicalFormatError(f"{name}: cannot tell which columns hold the patient id and the survival data; "
                                  f"give a column mapping. Columns present: {some(columns, 40)}.")
    issues.add("info", f"Guessed the columns: patient = {mapping.patient}; " + "; ".join(
        f"{ep} = {t} / {e}" for ep, (t, e) in mapping.endpoints.items()) + f"; times in {mapping.time_unit}. "
        "Give a column mapping if this is wrong.")
    return mapping


def read_clinical(path: str | Path, *, mapping: ColumnMapping | None = None, fmt: str | None = None,
                  sheet=None) -> ClinicalImport:
    """Read a clinical file into the normalised patient table (see module docstring).

    ``fmt`` None detects the format from the columns (a ``mapping`` implies ``"generic"``); a
    generic file without ``mapping`` uses :func:`suggest_mapping`. Raises ClinicalFormatError
    when the file is no table or lacks the columns the format needs.
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise ClinicalFormatError(f"Unknown clinical format {fmt!r}; use one of {', '.join(FORMATS)}.")
    issues = Issues()
    raw = _drop_index_columns(read_raw(path, sheet=sheet, issues=issues), issues)
    fmt = fmt or ("generic" if mapping is not None else _detect(raw.columns))
    if mapping is not None and fmt != "generic":
        issues.add("info", f"The column mapping was not used: the file was read as {fmt}.")
    if fmt == "tcga-cdr":
        table = _from_cdr(raw, issues, path.name)
    elif fmt == "gdc":
        from core.clinical_gdc import from_gdc
        table = from_gdc(raw, issues, path.name)
    else:
        mapping = mapping or _guess_mapping(raw.columns, issues, path.name)
        table = _from_generic(raw, mapping, issues, path.name)
    report_missing(table, issues)
    result = ClinicalImport(table, fmt, tuple(issues), len(raw), mapping if fmt == "generic" else None)
    log.info("%s: %s, %d rows → %d patients, events %s, %d issue(s)", path.name, fmt, len(raw),
             result.n_patients, result.n_events, len(issues))
    return result
