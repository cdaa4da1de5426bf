"""Survival endpoints of the normalised clinical table as (patient, time, event) frames.

The statistics live in :mod:`core.analysis.km` (Kaplan–Meier, log-rank, cut points) and
:mod:`core.analysis.cox` (Cox screens, the PH test); :mod:`core.analysis.cohort_stats` puts them together.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.errors import ClinicalFormatError
from core.vocab import ENDPOINTS


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
