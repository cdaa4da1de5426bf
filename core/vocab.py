"""The project's shared vocabularies, each defined once: slide statuses, survival endpoints, slide
file suffixes, the TCGA barcode pattern, the tissue threshold and the slug used for names.

Imported by every layer (it imports nothing of the project), so importer, engine, Ray path, CLI
and pages can never disagree on a word.
"""
from __future__ import annotations

import re
from enum import StrEnum


class SlideStatus(StrEnum):
    """What the importer found out about a file (stored in ``cohort_slides.status``)."""

    OK = "ok"                    # readable, µm/px known, tissue found: ready to predict
    NEEDS_MPP = "needs_mpp"      # readable, but no µm/px in the metadata: set it, never guessed
    NO_TISSUE = "no_tissue"      # readable, but no tile has enough tissue
    TOO_LARGE = "too_large"      # readable, but more tiles than MAX_TILES_PER_SLIDE: not predicted
    UNSUPPORTED = "unsupported"  # a format OpenSlide does not read (plain TIFF, a DICOM fragment, …)
    UNREADABLE = "unreadable"    # OpenSlide fails on it: truncated or damaged
    DUPLICATE = "duplicate"      # same content as another file of the import (kept once)
    NOT_A_SLIDE = "not_a_slide"  # no whole-slide suffix (listed, not opened)

    @property
    def help(self) -> str:
        return _STATUS_HELP[self]


_STATUS_HELP = {
    SlideStatus.OK: "ready to predict", SlideStatus.NEEDS_MPP: "set its µm/px",
    SlideStatus.NO_TISSUE: "no tile with enough tissue",
    SlideStatus.TOO_LARGE: "more tiles than one slide may have", SlideStatus.UNSUPPORTED: "a format OpenSlide does not read",
    SlideStatus.UNREADABLE: "truncated or damaged", SlideStatus.DUPLICATE: "same content as another file",
    SlideStatus.NOT_A_SLIDE: "not a whole-slide file",
}
# Slides that can be opened and shown (the Slide page lists these); only OK ones are predicted.
READABLE_STATUSES = (SlideStatus.OK, SlideStatus.NEEDS_MPP, SlideStatus.NO_TISSUE)

# TCGA-CDR survival endpoints: overall, disease-specific, disease-free interval, progression-free interval.
ENDPOINTS = ("OS", "DSS", "DFI", "PFI")

# Whole-slide formats OpenSlide reads; the importer also opens other candidates to say why not.
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"})
# Vendor formats that always open when intact: OpenSlide refusing one means damage, not format.
VENDOR_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"})
# Files the importer probes although OpenSlide may not read them, to report why not.
CANDIDATE_SUFFIXES = SLIDE_SUFFIXES | {".dcm", ".isyntax", ".czi", ".qptiff"}
# Plain images, opened as one-level slides (µm/px must be given).
PLAIN_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

# TCGA patient id (12 characters, e.g. TCGA-A2-A0T2); barcodes of samples and slides extend it.
TCGA_PATIENT = r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}"

# The share of a tile's area that must be tissue for the tile to be predicted.
MIN_TISSUE = 0.3
STRIDES = (1.0, 0.5, 0.25)   # tile strides offered, as fractions of the tile side (1: the default grid)

# Plausible level-0 pixel sizes (µm/px): 0.05 (beyond optical resolution) to 5 (a 2× scan). A value
# outside (e.g. 352.8 from a 72-dpi TIFF, or a typo in an override) is treated as unknown: the slide
# needs its µm/px set; overrides and the UI's inputs are capped to this range.
MPP_MIN = 0.05
MPP_MAX = 5.0

# Tiles (with tissue) one slide may have: a 2.5 × 7.5 cm glass slide fully covered holds ~150,000
# tiles of 112 µm. Above it the slide is TOO_LARGE (wrong µm/px or tile size, most likely).
MAX_TILES_PER_SLIDE = 200_000
# The whole grid (before tissue detection) may be this many times larger; beyond it the slide is
# refused before its tissue mask is even decoded.
MAX_GRID_FACTOR = 2

# Uploaded tables: bytes on disk, and bytes after decompression (.gz, the members of an .xlsx),
# so that a small compressed "bomb" cannot fill the memory.
MAX_CLINICAL_FILE_BYTES = 50 * 2**20
MAX_CLINICAL_INFLATED_BYTES = 200 * 2**20
# Measured expression matrices are larger (20,000 genes × 1,100 samples ≈ 200 MB of CSV).
MAX_MEASURED_FILE_BYTES = 1024 * 2**20
MAX_MEASURED_INFLATED_BYTES = 2048 * 2**20


def slug(text: str) -> str:
    """A name reduced to ``[a-z0-9_]`` (table names, file names); never empty."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"
