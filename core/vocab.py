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
    UNSUPPORTED = "unsupported"  # a format OpenSlide does not read (plain TIFF, a DICOM fragment, …)
    UNREADABLE = "unreadable"    # OpenSlide fails on it: truncated or damaged
    DUPLICATE = "duplicate"      # same content as another file of the import (kept once)
    NOT_A_SLIDE = "not_a_slide"  # no whole-slide suffix (listed, not opened)

    @property
    def help(self) -> str:
        return _STATUS_HELP[self]


_STATUS_HELP = {
    SlideStatus.OK: "ready to predict", SlideStatus.NEEDS_MPP: "set its µm/px",
    SlideStatus.NO_TISSUE: "no tile with enough tissue", SlideStatus.UNSUPPORTED: "a format OpenSlide does not read",
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


def slug(text: str) -> str:
    """A name reduced to ``[a-z0-9_]`` (table names, file names); never empty."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_") or "x"
