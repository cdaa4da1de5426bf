"""Clinical tables as users have them (TCGA-CDR, GDC export, any table + a column mapping).

Whatever the input, :func:`read_clinical` returns one row per patient: ``bcr_patient_barcode``
(upper-case 12-character TCGA patient barcode, or the user's id), then ``OS, OS.time, DSS,
DSS.time, DFI, DFI.time, PFI, PFI.time`` (events 0/1 as float, times in **days** as float, NaN
when unknown), then every other column as a covariate. Every row removed and every value
nulled is reported as a :class:`ClinicalIssue`.

File reading lives in :mod:`core.cohort.clinical_io`, the value cleaning shared by all formats in
:mod:`core.cohort.clinical_values` and the GDC format in :mod:`core.cohort.clinical_gdc`; the names used
elsewhere stay importable from here.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pandas as pd

from core.cohort.clinical_io import _drop_index_columns, preview_columns, read_raw
from core.cohort.clinical_values import (  # noqa: F401 re-exported
    ENDPOINT_COLUMNS, EVENT_CODINGS, EVENT_WORDS, MISSING_MARKERS, ClinicalIssue, EventCoding, Issues, assemble,
    clean_times, detect_event_coding, infer_numeric, is_missing, keep_identified, normalise_ids, parse_events,
    report_missing, some)
from core.errors import ClinicalFormatError
from core.vocab import ENDPOINTS, slug

log = logging.getLogger(__name__)

FORMATS = ("tcga-cdr", "gdc", "generic")
DAYS_PER = {"days": 1.0, "months": 30.4375, "years": 365.25}


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


def _as_tuple(cols) -> tuple[str, ...]:
    return tuple(cols) if isinstance(cols, (tuple, list)) else (cols,)


# ---------------------------------------------------------------- detecting the format

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
        by_norm.setdefault(slug(c), c)
    patient = next((by_norm[n] for n in _PATIENT_NAMES if n in by_norm), None)
    endpoints, units = {}, []
    for ep in ENDPOINTS:
        time_names, event_names = _endpoint_names(ep)
        time_col = next((by_norm[n] for n in time_names if n in by_norm), None)
        event_col = next((by_norm[n] for n in event_names if n in by_norm), None)
        if time_col is None or event_col is None:
            continue
        if slug(time_col) == "days_to_death":
            follow = [by_norm[n] for n in ("days_to_last_follow_up", "days_to_last_followup") if n in by_norm]
            time_col = (time_col, *follow) if follow else time_col
        endpoints[ep] = (time_col, event_col)
        units.append(next((u for u in ("month", "year") if u in slug(_as_tuple(time_col)[0])), "day") + "s")
    if patient is None or not endpoints:
        return None
    return ColumnMapping(patient=patient, endpoints=endpoints, time_unit=units[0])


# ---------------------------------------------------------------- the three formats

def _require(columns, needed, what: str, name: str) -> None:
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        raise ClinicalFormatError(f"{name}: the {what} needs column(s) {some(missing, 20)}, which are not in the "
                                  f"file. Columns present: {some(columns, 40)}.")


def coding_for(event_coding: str | Mapping[str, str], ep: str) -> str:
    """The event coding asked for endpoint ``ep``: one value for all, or a per-endpoint mapping."""
    value = event_coding.get(ep, "auto") if isinstance(event_coding, Mapping) else event_coding
    if value not in EVENT_CODINGS:
        raise ClinicalFormatError(f"Event coding {value!r} for {ep} is not one of {', '.join(EVENT_CODINGS)}.")
    return value


def parse_event_coding(text: str | None) -> str | dict[str, str]:
    """``auto``, ``0/1``, ``1/2`` for every endpoint, or per endpoint: ``OS=1/2,PFI=0/1``."""
    text = (text or "auto").strip()
    if "=" not in text:
        return coding_for(text, "OS")
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ep, _, value = part.partition("=")
        ep = ep.strip().upper()
        if ep not in ENDPOINTS:
            raise ClinicalFormatError(f"Unknown endpoint {ep!r} in the event coding {text!r}; use {', '.join(ENDPOINTS)}.")
        out[ep] = coding_for(value.strip(), ep)
    return out


def _endpoint(ep: str, events: pd.Series, times: pd.Series, ids: pd.Series, issues: Issues, *,
              days_per_unit: float = 1.0, event_values=None, coding: str = "auto",
              default_numeric: str | None = None) -> tuple[pd.Series, pd.Series]:
    """(event 0/1, time in days) of one endpoint; an error when the source had values but none is usable."""
    ev = parse_events(events, ids, ep, issues, event_values, coding=coding, default_numeric=default_numeric)
    t = clean_times(times, ids, f"{ep}.time", issues, days_per_unit)
    for col, src, out in ((ep, events, ev), (f"{ep}.time", times, t)):
        if out.isna().all() and not is_missing(src).all() and not (col == ep and _ambiguous(issues, ep)):
            issues.add("error", f"{col}: none of the values could be used (see the warnings above); {ep} "
                       "analyses are unavailable. Check the column choice and the event values.", column=col)
    return ev, t


def _ambiguous(issues: Issues, ep: str) -> bool:
    return any(i.severity == "error" and i.column == ep for i in issues)


def _from_cdr(raw: pd.DataFrame, issues: Issues, name: str, event_coding="auto") -> pd.DataFrame:
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
    endpoints = {ep: _endpoint(ep, df[ep], df[f"{ep}.time"], ids, issues, coding=coding_for(event_coding, ep),
                               default_numeric="0/1") for ep in pairs}
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


def _from_generic(raw: pd.DataFrame, mapping: ColumnMapping, issues: Issues, name: str,
                  event_coding="auto") -> pd.DataFrame:
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
                                  event_values=mapping.event_values, coding=coding_for(event_coding, ep))
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
                  sheet=None, event_coding: str | Mapping[str, str] = "auto") -> ClinicalImport:
    """Read a clinical file into the normalised patient table (see module docstring).

    ``fmt`` None detects the format from the columns (a ``mapping`` implies ``"generic"``); a
    generic file without ``mapping`` uses :func:`suggest_mapping`. ``event_coding`` (``auto``,
    ``0/1``, ``1/2``, or a per-endpoint mapping) says how numeric event columns are coded; ``auto``
    detects it per column (see :func:`core.cohort.clinical_values.detect_event_coding`) and the
    import report states every decision. Raises ClinicalFormatError
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
        table = _from_cdr(raw, issues, path.name, event_coding)
    elif fmt == "gdc":
        from core.cohort.clinical_gdc import from_gdc
        table = from_gdc(raw, issues, path.name)
    else:
        mapping = mapping or _guess_mapping(raw.columns, issues, path.name)
        table = _from_generic(raw, mapping, issues, path.name, event_coding)
    report_missing(table, issues)
    result = ClinicalImport(table, fmt, tuple(issues), len(raw), mapping if fmt == "generic" else None)
    log.info("%s: %s, %d rows → %d patients, events %s, %d issue(s)", path.name, fmt, len(raw),
             result.n_patients, result.n_events, len(issues))
    return result
