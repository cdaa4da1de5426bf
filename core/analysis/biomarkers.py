"""Patient-level predicted biomarkers joined with clinical data, for cohort analyses."""
from __future__ import annotations

import pandas as pd

from core.errors import AnalysisError

# Slide-level statistics of a gene's tile predictions: mean, median, 90th percentile, Moran's I
# (spatial heterogeneity: ~0 scattered, → 1 in large patches) and the fraction of the slide's
# tiles above the cohort's 75th percentile of that gene ("high" tiles).
STATS = ("mean", "median", "q90", "morans_i", "frac_high")


def patient_matrix(store, cohort: str, model_key: str, genes: list[str], *, stat: str = "mean") -> pd.DataFrame:
    """Patients × genes: the slide-level ``stat`` of each gene, per patient by the patient rule: the
    patient's selected slide (set at import: the diagnostic primary-tumour slide; changeable on the
    Cohort page); patients whose selected slide is not predicted yet get the mean over their
    predicted diagnostic slides, then over all their predicted slides."""
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
