"""Shared building blocks of the clinical readers: issues, value cleaning, the normalised table.

Used by every format of :func:`core.cohort.clinical.read_clinical` (TCGA-CDR, GDC export, generic
table + column mapping): the :class:`ClinicalIssue` findings and their :class:`Issues`
collector, missing-value markers, event and time parsing, patient-id normalisation and the
assembly of the one-row-per-patient table (id, ``OS, OS.time, …, PFI.time``, covariates).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from core.vocab import ENDPOINTS, TCGA_PATIENT

log = logging.getLogger(__name__)

ENDPOINT_COLUMNS = tuple(c for ep in ENDPOINTS for c in (ep, f"{ep}.time"))
# Strings that mean "not known" in TCGA, GDC and cBioPortal files; read as missing, not as odd.
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "none", "null", "--", "'--", "not reported", "unknown",
                             "[not available]", "[unknown]", "[not applicable]", "[discrepancy]",
                             "[not evaluated]", "[not reported]"})
EVENT_WORDS = {"dead": 1, "deceased": 1, "died": 1, "yes": 1, "true": 1, "event": 1, "progression": 1,
               "recurred": 1, "recurred/progressed": 1, "relapse": 1, "alive": 0, "living": 0, "no": 0,
               "false": 0, "censored": 0, "diseasefree": 0, "disease free": 0}
_CBIO_EVENT = re.compile(r"^\s*([01])\s*:")  # cBioPortal "1:DECEASED", "0:DiseaseFree"
_TCGA_PATIENT = re.compile(rf"^({TCGA_PATIENT})(?:-|$)", re.IGNORECASE)


@dataclass(frozen=True)
class ClinicalIssue:
    """One finding of an import; ``patients`` lists every patient concerned (``patient`` when one)."""

    severity: str  # "error" | "warning" | "info"
    patient: str | None
    column: str | None
    message: str
    patients: tuple[str, ...] = ()


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


def is_missing(values: pd.Series) -> pd.Series:
    """True where a value is empty or a known 'not known' marker (see MISSING_MARKERS)."""
    return values.isna() | values.astype("string").str.strip().str.lower().isin(MISSING_MARKERS).fillna(True)


EVENT_CODINGS = ("auto", "0/1", "1/2")
_NUMERIC_CODES = {"0/1": {0: 0, 1: 1}, "1/2": {1: 0, 2: 1}}


@dataclass(frozen=True)
class EventCoding:
    """How one event column was read: ``coding`` is ``0/1``, ``1/2`` (R ``Surv``: 1 = censored,
    2 = event), ``words`` (Dead/Alive, TRUE/FALSE, …), ``cbioportal`` (``1:DECEASED``), a mix of
    these, or ``unknown`` (ambiguous: the column is not used until the user says how to read it)."""

    column: str
    coding: str
    how: str          # the decision in words, for the import report
    chosen_by: str    # "detected" | "user" | "format"
    ambiguous: bool = False


def _numeric_values(text: pd.Series) -> set:
    num = pd.to_numeric(text, errors="coerce")
    return set(num.dropna().unique().tolist())


def detect_event_coding(values: pd.Series, column: str, *, coding: str = "auto",
                        default_numeric: str | None = None, words: Mapping[str, int] | None = None) -> EventCoding:
    """Decide how the numbers in an event column are coded.

    ``coding`` ``0/1`` or ``1/2`` is the user's word and is used as given. ``auto`` reads {0, 1}
    (or {0}) as 0/1 and {1, 2} (or {2}) as 1/2, the R ``Surv`` convention. A {1, 2} column is
    never read as 1 = event by default. Columns holding only 1 could be all events (0/1) or all
    censored (1/2): they are ambiguous unless ``default_numeric`` (the coding a documented format
    such as TCGA-CDR prescribes) settles them; {0, 1, 2} is always ambiguous. Words and cBioPortal
    ``1:DECEASED`` values are self-describing and never ambiguous.
    """
    if coding not in EVENT_CODINGS:
        raise ValueError(f"event coding {coding!r} is not one of {', '.join(EVENT_CODINGS)}")
    text = values[~is_missing(values)].astype("string").str.strip()
    lower = text.str.lower()
    cbio = text.str.match(_CBIO_EVENT).fillna(False)
    worded = lower.isin((words or EVENT_WORDS).keys()).fillna(False)
    nums = _numeric_values(text[~cbio & ~worded])
    kinds = (["words"] if worded.any() else []) + (["cbioportal"] if cbio.any() else [])
    if coding != "auto":
        how = {"0/1": "read as 1 = event, 0 = censored", "1/2": "read as 2 = event, 1 = censored"}[coding]
        return EventCoding(column, "+".join([coding, *kinds]), f"{coding} coding {how} (as chosen)", "user")
    if not nums:
        word = " and ".join({"words": "Dead/Alive-style words", "cbioportal": "cBioPortal '1:DECEASED' codes"}[k]
                            for k in kinds) or "no recognised values"
        return EventCoding(column, "+".join(kinds) or "none", f"{word} read as event/censored", "detected")
    if nums <= {0, 1} and 0 in nums:
        numeric, why, by = "0/1", "0/1 coding read as 1 = event, 0 = censored", "detected"
    elif nums <= {1, 2} and 2 in nums:
        numeric, why, by = "1/2", "1/2 coding read as 2 = event, 1 = censored (the R Surv convention)", "detected"
    elif nums == {1} and default_numeric:
        numeric, why, by = default_numeric, f"only 1s: read as {default_numeric} as the file format prescribes", "format"
    else:
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in sorted(nums))
        hint = ("only 1s could mean all events (0/1) or all censored (1/2)" if nums == {1}
                else f"the values {{{shown}}} fit neither 0/1 nor 1/2")
        return EventCoding(column, "unknown", f"ambiguous: {hint}. Choose the event coding (0/1 or 1/2) and "
                           "import again; this endpoint is left out until then.", "detected", ambiguous=True)
    if numeric == "1/2" and default_numeric == "0/1":
        why += "; the file format documents 0/1, so check the source"
    return EventCoding(column, "+".join([numeric, *kinds]), why, by)


def parse_events(values: pd.Series, ids: pd.Series, column: str, issues: Issues,
                 extra: Mapping[str, int] | None = None, *, coding: str = "auto",
                 default_numeric: str | None = None) -> pd.Series:
    """Event indicators as float 1/0 by :func:`detect_event_coding`; the decision is reported as an
    info (a warning when ambiguous: the column is then all missing); values outside the coding
    become NaN with a warning."""
    words = {**EVENT_WORDS, **{str(k).strip().lower(): int(v) for k, v in (extra or {}).items()}}
    decided = detect_event_coding(values, column, coding=coding, default_numeric=default_numeric, words=words)
    text = values.astype("string").str.strip()
    if decided.ambiguous:
        issues.add("error", f"{column}: {decided.how}", column=column)
        return pd.Series(np.nan, index=values.index, dtype=float)
    out = text.str.lower().map(words).astype(float)
    numeric = next((c for c in decided.coding.split("+") if c in _NUMERIC_CODES), None)
    if numeric:
        num = pd.to_numeric(text, errors="coerce")
        out = out.fillna(num.map(_NUMERIC_CODES[numeric]).astype(float))
    cbio = text.str.extract(_CBIO_EVENT)[0]
    out = out.fillna(pd.to_numeric(cbio, errors="coerce")).astype(float)
    odd = out.isna() & ~is_missing(values)
    if odd.any():
        allowed = {"0/1": "0/1", "1/2": "1/2"}.get(numeric or "", "0/1 or 1/2")
        issues.add("warning", f"{column}: {int(odd.sum())} value(s) are not a recognised event code "
                   f"({some(repr(v) for v in text[odd])}); set to missing. Allowed: {allowed}, Dead/Alive, yes/no, "
                   "'1:DECEASED'/'0:LIVING' — or add them to event_values.", column=column, patients=ids[odd])
    n_ev, n_cens = int((out == 1).sum()), int((out == 0).sum())
    issues.add("info", f"{column}: {decided.how}; {n_ev} events, {n_cens} censored.", column=column)
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
