"""Survival analyses with lifelines; results are small frozen dataclasses (figures elsewhere)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import AnalysisError, ClinicalFormatError
from core.vocab import ENDPOINTS


@dataclass(frozen=True)
class KMCurve:
    label: str
    n: int
    events: int
    timeline: np.ndarray
    survival: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    median: float


@dataclass(frozen=True)
class CoxResult:
    covariate: str
    hr: float
    ci_lower: float
    ci_upper: float
    p: float


@dataclass(frozen=True)
class SplitSurvival:
    """KM curves of a high/low split, the log-rank test and Cox HR (high vs low)."""

    variable: str
    endpoint: str
    cutoff: float
    curves: tuple[KMCurve, ...]
    logrank_p: float
    logrank_stat: float
    cox: CoxResult
    cox_continuous: CoxResult
    n: int
    events: int
    n_excluded: int = 0   # patients left out by the split (the middle third of a tertile split)


def survival_frame(clinical: pd.DataFrame, endpoint: str) -> pd.DataFrame:
    """Patient, time (days) and event for one endpoint; rows without a usable time removed."""
    if endpoint not in ENDPOINTS:
        raise ClinicalFormatError(f"Unknown endpoint {endpoint}; choose one of {', '.join(ENDPOINTS)}.")
    missing = [c for c in (endpoint, f"{endpoint}.time") if c not in clinical.columns]
    if missing:
        raise ClinicalFormatError(f"The clinical table has no {', '.join(missing)} column.")
    df = clinical[["bcr_patient_barcode", endpoint, f"{endpoint}.time"]].copy()
    df.columns = ["patient", "event", "time"]
    df = df[np.isfinite(df["time"]) & (df["time"] >= 0) & df["event"].isin([0, 1])]
    return df.reset_index(drop=True)


def km_curve(time: np.ndarray, event: np.ndarray, label: str) -> KMCurve:
    from lifelines import KaplanMeierFitter

    kmf = KaplanMeierFitter().fit(time, event, label=label)
    ci = kmf.confidence_interval_survival_function_
    return KMCurve(label=label, n=int(len(time)), events=int(np.sum(event)),
                   timeline=kmf.survival_function_.index.to_numpy(dtype=float),
                   survival=kmf.survival_function_.iloc[:, 0].to_numpy(dtype=float),
                   ci_lower=ci.iloc[:, 0].to_numpy(dtype=float), ci_upper=ci.iloc[:, 1].to_numpy(dtype=float),
                   median=float(kmf.median_survival_time_))


def cox(df: pd.DataFrame, covariate: str, *, time: str = "time", event: str = "event") -> CoxResult:
    from lifelines import CoxPHFitter

    fit = CoxPHFitter().fit(df[[time, event, covariate]], duration_col=time, event_col=event)
    s = fit.summary.loc[covariate]
    return CoxResult(covariate, float(s["exp(coef)"]), float(s["exp(coef) lower 95%"]),
                     float(s["exp(coef) upper 95%"]), float(s["p"]))


def split_survival(data: pd.DataFrame, variable: str, endpoint: str, *, split: str = "median") -> SplitSurvival:
    """Compare patients above vs at-or-below the cohort median (or ``tertile``: top vs bottom third).

    ``data`` has columns ``time`` (days), ``event`` (0/1) and ``variable``. Also reports a Cox
    model on the z-scored continuous variable (HR per SD), which does not depend on the cut.
    """
    from lifelines.statistics import logrank_test

    df = data[["time", "event", variable]].dropna()
    if len(df) < 10 or df["event"].sum() < 3:
        raise AnalysisError(f"{endpoint}: {len(df)} patients with {int(df['event'].sum())} events — "
                            "too few for a survival comparison (need ≥ 10 patients and ≥ 3 events).")
    values = df[variable].to_numpy(dtype=float)
    n_all = len(df)
    if split == "tertile":
        lo, hi = np.quantile(values, [1 / 3, 2 / 3])
        df = df[(values <= lo) | (values > hi)].copy()
        cutoff = float(hi)
    else:
        cutoff = float(np.median(values))
    df = df.assign(high=(df[variable] > cutoff).astype(int))
    if df["high"].nunique() < 2:
        raise AnalysisError(f"{variable} does not vary across patients; no split is possible.")
    hi, lo = df[df["high"] == 1], df[df["high"] == 0]
    test = logrank_test(hi["time"], lo["time"], hi["event"], lo["event"])
    curves = (km_curve(lo["time"].to_numpy(), lo["event"].to_numpy(), f"low {variable}"),
              km_curve(hi["time"].to_numpy(), hi["event"].to_numpy(), f"high {variable}"))
    z = data[["time", "event", variable]].dropna()
    z = z.assign(**{variable: (z[variable] - z[variable].mean()) / (z[variable].std() or 1.0)})
    return SplitSurvival(variable=variable, endpoint=endpoint, cutoff=cutoff, curves=curves,
                         logrank_p=float(test.p_value), logrank_stat=float(test.test_statistic),
                         cox=cox(df, "high"), cox_continuous=cox(z, variable),
                         n=int(len(df)), events=int(df["event"].sum()), n_excluded=n_all - int(len(df)))
