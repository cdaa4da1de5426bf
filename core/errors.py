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


class ImplausibleMppError(MissingMppError):
    """The µm/px found (metadata or override) is outside the plausible range: treated as unknown."""


class CohortExistsError(StoreError):
    """A cohort of that name is already in the store and replacing it was not asked for."""


class SpoolCorruptError(TesseraError):
    """A spooled run cannot be read back (a chunk or its marker is damaged or missing)."""


class IngestError(StoreError):
    """Computed runs could not be written to the store; they wait in the spool or its quarantine."""


class InvalidModelIdError(ModelNotFoundError):
    """A model id that is not a plain name (a slash, ``..``, odd characters): never used as a path."""


class ModelCheckpointError(TesseraError):
    """A model folder's ``model.pt`` or ``card.json`` cannot be loaded (missing, corrupt, malformed,
    or refused as unsafe because it holds more than weights)."""


class EncoderWeightsError(ModelCheckpointError):
    """A model's encoder needs local weights (a foundation model such as UNI) that are not found,
    cannot be built, or differ (SHA-256) from the ones it was trained with."""
