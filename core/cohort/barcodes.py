"""TCGA barcodes parsed from file names (slide linking lives in :mod:`core.cohort.importer`, clinical
readers in :mod:`core.cohort.clinical`)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from core.vocab import TCGA_PATIENT

log = logging.getLogger(__name__)

_BARCODE = re.compile(
    rf"^(?P<patient>{TCGA_PATIENT})"
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
