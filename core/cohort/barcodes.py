"""TCGA barcodes and survival endpoints (slide linking lives in ``core.cohort.importer``, clinical readers in
``core.cohort.clinical``)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ClinicalFormatError

log = logging.getLogger(__name__)

ENDPOINTS = ("OS", "DSS", "DFI", "PFI")
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
_BARCODE = re.compile(
    r"^(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})"
    r"(?:-(?P<sample>\d{2})(?P<vial>[A-Z])?(?:-(?P<portion>\d{2})(?P<analyte>[A-Z])?"
    r"(?:-(?P<slide>(?:DX|TS|BS|MS)[A-Z0-9]*))?)?)?",
    re.IGNORECASE,
)
SAMPLE_TYPES = {"01": "primary tumour", "02": "recurrent tumour", "06": "metastatic", "11": "solid tissue normal"}


@dataclass(frozen=True)
class Barcode:
    """A parsed TCGA barcode from a file name; ``slide_type`` DX = FFPE diagnostic, TS/BS/MS = frozen."""

    patient: str
    sample: str | None
    slide_id: str | None

    @property
    def sample_type(self) -> str:
        return SAMPLE_TYPES.get(self.sample or "", "unknown")

    @property
    def slide_type(self) -> str:
        if not self.slide_id:
            return "unknown"
        return "diagnostic (FFPE)" if self.slide_id.upper().startswith("DX") else "frozen"


def parse_barcode(name: str) -> Barcode | None:
    """Parse ``TCGA-A2-A0T2-01Z-00-DX1.<uuid>.svs``; None when the name has no TCGA barcode."""
    m = _BARCODE.match(Path(name).name)
    if not m:
        return None
    return Barcode(m["patient"].upper(), m["sample"], m["slide"].upper() if m["slide"] else None)


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
