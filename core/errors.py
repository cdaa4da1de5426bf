"""Domain exceptions with messages that say what to do next.

Pages turn these into ``st.error``; the CLI prints them without a traceback.
"""


class TesseraError(Exception):
    """Base class: the message is meant for the user, as is."""


class SlideOpenError(TesseraError):
    """OpenSlide could not open the file; ``kind`` is unsupported, unreadable or missing."""

    def __init__(self, message: str, *, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


class MissingMppError(TesseraError):
    """Neither the slide metadata nor an override gives the pixel size."""


class NoTissueError(TesseraError):
    """The tissue detector found no tile above the tissue-fraction threshold."""


class StoreError(TesseraError):
    """The DuckDB store is missing, locked or of an unknown schema version."""


class OutdatedStoreError(StoreError):
    """The store was written by an older Tessera; opening it once for writing upgrades it."""


class ModelNotFoundError(TesseraError):
    """No checkpoint with that id in the model search path."""


class ClinicalFormatError(TesseraError):
    """A clinical table lacks required columns or has invalid values."""


class AnalysisError(TesseraError):
    """A statistical analysis cannot run on the data given (too few patients, no events…)."""


class StoreBusyError(StoreError):
    """Another process holds the store's write lock (a job ingesting, another writer); retry shortly."""


class SectionFormatError(TesseraError):
    """A spatial-transcriptomics folder or file is incomplete or not in a layout Tessera reads."""


class ReferenceFormatError(TesseraError):
    """A single-cell reference file (h5ad, or counts CSV + cell types) cannot be used as given."""


class MeasuredFormatError(ClinicalFormatError):
    """A measured expression matrix cannot be read, or none of its ids matches the cohort's patients."""
