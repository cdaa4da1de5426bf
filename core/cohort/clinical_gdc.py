"""GDC portal clinical exports → one row per case (used by :func:`core.cohort.clinical.read_clinical`).

A GDC export has one row per case × treatment (× diagnosis, × follow-up …), ``'--`` for
missing values, and either flat column names (``vital_status``, ``days_to_death``) or dotted
ones (``demographic.vital_status``, ``diagnoses.days_to_last_follow_up``); columns are matched
on their last dotted component. Only OS can be derived honestly (vital status + days to death
or last follow-up, in days); DSS, DFI and PFI are left empty.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from core.cohort.clinical_values import (Issues, assemble, clean_times, keep_identified, normalise_ids,
                                  parse_events, some)
from core.errors import ClinicalFormatError

log = logging.getLogger(__name__)

PATIENT_COLUMNS = ("cases.submitter_id", "case_submitter_id", "submitter_id")
FOLLOW_UP = ("days_to_last_follow_up", "days_to_follow_up")
# Entities GDC repeats per case: differing values across a case's rows are expected there.
ONE_TO_MANY = ("treatments.", "follow_ups.", "pathology_details.", "exposures.", "family_histories.",
               "molecular_tests.", "other_clinical_attributes.", "treatment_")


def leaf(column: str) -> str:
    """``diagnoses.days_to_last_follow_up`` → ``days_to_last_follow_up``."""
    return str(column).split(".")[-1]


def leaf_columns(columns, name: str) -> list[str]:
    return [c for c in columns if leaf(c) == name]


def _patient_column(raw: pd.DataFrame, name: str) -> str:
    pid = next((c for c in PATIENT_COLUMNS if c in raw.columns), None)
    vital = leaf_columns(raw.columns, "vital_status")
    if pid is None or not vital:
        missing = [n for n, ok in (("cases.submitter_id or case_submitter_id", pid), ("vital_status", vital)) if not ok]
        raise ClinicalFormatError(f"{name}: a GDC clinical export needs {' and '.join(missing)}, which are not in "
                                  f"the file. Columns present: {some(raw.columns, 40)}. Download the clinical "
                                  "TSV from the GDC portal again, or import the file as generic with a mapping.")
    return pid


def _report_conflicts(df: pd.DataFrame, ids: pd.Series, derived: set[str], issues: Issues) -> None:
    """Columns whose values differ between the rows of one case; the first non-missing value is kept."""
    counts = df.groupby(ids.to_numpy(), sort=False).nunique()
    for col in counts.columns:
        cases = counts.index[counts[col] > 1]
        if len(cases) == 0 or col in derived:
            continue
        ex = df.loc[(ids == cases[0]).to_numpy(), col].dropna().unique()
        expected = any(col.startswith(p) for p in ONE_TO_MANY)
        issues.add("info" if expected else "warning",
                   f"{col}: differing values between the rows of {len(cases)} case(s) ({some(cases)}; e.g. "
                   f"{cases[0]}: {' / '.join(map(repr, ex[:3]))}); kept the first non-missing value"
                   + (" (GDC repeats a case once per treatment or follow-up)." if expected else "."),
                   column=col, patients=cases)


def _numeric_max(df: pd.DataFrame, cols: list[str], ids: pd.Series, label: str, issues: Issues) -> pd.Series:
    """Per case, the largest of the values in ``cols`` over its rows (days); NaN when none."""
    if not cols:
        return pd.Series(dtype=float)
    per_row = pd.concat([clean_times(df[c], ids, c, issues) for c in cols], axis=1).max(axis=1)
    grouped = per_row.groupby(ids.to_numpy(), sort=False)
    spread = grouped.max() - grouped.min()
    if (spread > 0).any():
        odd = spread.index[spread > 0]
        issues.add("warning" if label == "days_to_death" else "info",
                   f"{label} differs between the rows of {len(odd)} case(s) ({some(odd)}); used the largest "
                   "for OS.time.", column=label, patients=odd)
    return grouped.max()


def _overall_survival(df: pd.DataFrame, ids: pd.Series, issues: Issues) -> tuple[pd.Series, pd.Series]:
    """OS event (Dead = 1, Alive = 0) and OS.time in days (days to death, else the longest follow-up)."""
    cols = df.columns
    vital_rows = df[leaf_columns(cols, "vital_status")].bfill(axis=1).iloc[:, 0]
    alive_dead = parse_events(vital_rows, ids, "vital_status", issues, {"dead": 1, "alive": 0})
    by_case = alive_dead.groupby(ids.to_numpy(), sort=False)
    event = by_case.max()  # death is final: a case reported dead in any row is dead
    mixed = event.index[(by_case.min() == 0) & (event == 1)]
    if len(mixed):
        issues.add("warning", f"vital_status is both Alive and Dead across the rows of {len(mixed)} case(s) "
                   f"({some(mixed)}); counted as dead.", column="vital_status", patients=mixed)
    death = _numeric_max(df, leaf_columns(cols, "days_to_death"), ids, "days_to_death", issues).reindex(event.index)
    follow_cols = [c for name in FOLLOW_UP for c in leaf_columns(cols, name)]
    follow = _numeric_max(df, follow_cols, ids, "follow-up", issues).reindex(event.index)
    time = pd.Series(np.where(event == 1, death, np.where(event == 0, follow, np.nan)), index=event.index)
    _check_os(event, death, follow, issues)
    return event, time


def _check_os(event: pd.Series, death: pd.Series, follow: pd.Series, issues: Issues) -> None:
    dead_no_time = event.index[(event == 1) & death.isna()]
    if len(dead_no_time):
        issues.add("warning", f"{len(dead_no_time)} case(s) are Dead without days_to_death ({some(dead_no_time)}); "
                   "OS.time left missing.", column="OS.time", patients=dead_no_time)
    alive_death = event.index[(event == 0) & death.notna()]
    if len(alive_death):
        issues.add("warning", f"{len(alive_death)} case(s) are Alive but have days_to_death ({some(alive_death)}); "
                   "used their last follow-up. Check vital_status.", column="OS", patients=alive_death)
    late = event.index[(event == 1) & (follow > death)]
    if len(late):
        issues.add("warning", f"{len(late)} case(s) have a follow-up after their death ({some(late)}); "
                   "OS.time uses days_to_death.", column="OS.time", patients=late)


def _covariates(first: pd.DataFrame, pid: str) -> pd.DataFrame:
    """First non-missing value per column; dotted names shortened to their last part when unambiguous."""
    cov = first.drop(columns=[pid])
    leaves = pd.Series([leaf(c) for c in cov.columns])
    cov.columns = [lf if (leaves == lf).sum() == 1 else c for c, lf in zip(cov.columns, leaves)]
    if "age_at_diagnosis" in cov.columns:  # GDC gives it in days
        years = pd.to_numeric(cov["age_at_diagnosis"], errors="coerce") / 365.25
        cov.insert(cov.columns.get_loc("age_at_diagnosis") + 1, "age_at_diagnosis_years", years)
    return cov


def from_gdc(raw: pd.DataFrame, issues: Issues, name: str) -> pd.DataFrame:
    """The normalised patient table from a GDC export (strings, ``'--`` already read as missing)."""
    pid = _patient_column(raw, name)
    df, ids = keep_identified(raw, normalise_ids(raw[pid], issues), issues, dedupe=False)
    empty = [c for c in df.columns if df[c].isna().all()]
    if empty:
        issues.add("info", f"Ignored {len(empty)} column(s) with no value in any row ({some(empty, 5)}).")
        df = df.drop(columns=empty)
    derived = {c for c in df.columns if leaf(c) in ("vital_status", "days_to_death", *FOLLOW_UP)}
    _report_conflicts(df, ids, derived, issues)
    event, time = _overall_survival(df, ids, issues)
    first = df.groupby(ids.to_numpy(), sort=False).first().reindex(event.index)
    cases = pd.Series(event.index, dtype=object)
    issues.add("info", "A GDC export does not give DSS, DFI or PFI reliably; they are left empty. Use the "
               "TCGA-CDR table for these endpoints.", column=None)
    log.debug("GDC: %d rows → %d cases", len(df), len(cases))
    endpoints = {"OS": (event.reset_index(drop=True), time.reset_index(drop=True))}
    return assemble(cases, endpoints, _covariates(first.reset_index(drop=True), pid), issues)
