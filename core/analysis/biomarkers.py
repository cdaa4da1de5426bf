"""Patient-level predicted biomarkers joined with clinical data, for cohort analyses."""
from __future__ import annotations

import pandas as pd

from core.analysis.survival import survival_frame
from core.errors import AnalysisError

# Slide-level statistics of a gene's tile predictions: mean, median, 90th percentile, Moran's I
# (spatial heterogeneity: ~0 scattered, → 1 in large patches) and the fraction of the slide's
# tiles above the cohort's 75th percentile of that gene ("high" tiles).
STATS = ("mean", "median", "q90", "morans_i", "frac_high")


def slide_values(store, cohort: str, model_key: str, gene: str, *, stat: str = "mean") -> pd.DataFrame:
    """One row per predicted slide: patient, slide, the slide-level ``stat`` of ``gene``."""
    if stat not in STATS:
        raise AnalysisError(f"Unknown statistic {stat}; choose one of {', '.join(STATS)}.")
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key"])
    if runs.empty:
        raise AnalysisError(f"No slide of cohort {cohort!r} has predictions from {model_key} yet.")
    if stat == "frac_high":
        summary = store.fraction_above(model_key, gene, list(runs["run_key"]), 0.75).rename(
            columns={"fraction": "frac_high"})
    else:
        summary = store.slide_summary(model_key, [gene], list(runs["run_key"]))
    df = runs[["patient", "slide_name", "slide_type", "selected", "run_key"]].merge(summary[["run_key", stat]],
                                                                                   on="run_key")
    return df.rename(columns={stat: gene})


def patient_values(store, cohort: str, model_key: str, gene: str, *, stat: str = "mean") -> pd.DataFrame:
    """Per patient: the value on the patient's selected slide (set at import: the diagnostic
    primary-tumour slide; changeable on the Cohort page). Patients whose selected slide is not
    predicted yet fall back to the mean over their predicted diagnostic slides, then all slides."""
    df = slide_values(store, cohort, model_key, gene, stat=stat).dropna(subset=["patient"])
    chosen = df[df["selected"].fillna(False).astype(bool)]
    rest = df[~df["patient"].isin(chosen["patient"])]
    dx = rest[rest["slide_type"].fillna("").str.startswith("diagnostic")]
    rest = pd.concat([dx, rest[~rest["patient"].isin(dx["patient"])]])
    return pd.concat([chosen, rest]).groupby("patient", as_index=False)[gene].mean()


def patient_matrix(store, cohort: str, model_key: str, genes: list[str], *, stat: str = "mean") -> pd.DataFrame:
    """Patients × genes: the slide-level ``stat`` of each gene under the patient rule of
    :func:`patient_values` (selected slide; else mean over predicted diagnostic slides; else all)."""
    if stat not in STATS:
        raise AnalysisError(f"Unknown statistic {stat}; choose one of {', '.join(STATS)}.")
    runs = store.cohort_runs(cohort, model_key).dropna(subset=["run_key", "patient"])
    if runs.empty:
        raise AnalysisError(f"No slide of cohort {cohort!r} has predictions from {model_key} yet; predict the "
                            "cohort first (Predictions page, or python -m core.cli predict).")
    keys = list(runs["run_key"])
    if stat == "frac_high":
        parts = [store.fraction_above(model_key, g, keys, 0.75).set_index("run_key")["fraction"].rename(g)
                 for g in genes]
        wide = pd.concat(parts, axis=1)
    else:
        long = store.slide_summary(model_key, list(genes), keys)
        wide = long.pivot_table(index="run_key", columns="gene", values=stat, aggfunc="first")
    wide = wide.reindex(columns=list(genes))
    runs = runs.set_index("run_key")[["patient", "slide_type", "selected"]].join(wide, how="inner")
    chosen = runs[runs["selected"].fillna(False).astype(bool)]
    rest = runs[~runs["patient"].isin(chosen["patient"])]
    dx = rest[rest["slide_type"].fillna("").str.startswith("diagnostic")]
    rest = pd.concat([dx, rest[~rest["patient"].isin(dx["patient"])]])
    out = pd.concat([chosen, rest]).groupby("patient")[list(genes)].mean()
    return out.rename_axis(index="patient", columns=None)


def survival_table(store, cohort: str, model_key: str, gene: str, endpoint: str, *, stat: str = "mean") -> pd.DataFrame:
    """Patients with the endpoint's time/event and the predicted biomarker."""
    surv = survival_frame(store.clinical(cohort), endpoint)
    return surv.merge(patient_values(store, cohort, model_key, gene, stat=stat), on="patient")
