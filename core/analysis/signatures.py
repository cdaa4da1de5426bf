"""Built-in gene signatures, each with its source. Analyses use the genes that are in the model's panel.

Scoring (see :mod:`core.analysis.variables`): the mean over the signature's genes of the per-gene
patient values z-scored over the cohort.
"""
from __future__ import annotations

# name → (genes, source)
SIGNATURES: dict[str, tuple[tuple[str, ...], str]] = {
    # Paik S. et al., N Engl J Med 2004;351:2817–26 (the 21-gene recurrence score): its gene groups.
    "oncotype_proliferation": (("MKI67", "AURKA", "BIRC5", "CCNB1", "MYBL2"), "Paik et al. 2004, proliferation group"),
    "oncotype_er": (("ESR1", "PGR", "BCL2", "SCUBE2"), "Paik et al. 2004, oestrogen group"),
    "oncotype_her2": (("ERBB2", "GRB7"), "Paik et al. 2004, HER2 group"),
    "oncotype_invasion": (("MMP11", "CTSV"), "Paik et al. 2004, invasion group (CTSL2 = CTSV)"),
    # Rooney M.S. et al., Cell 2015;160:48–61: cytolytic activity = geometric mean of GZMA and PRF1.
    "cytolytic": (("GZMA", "PRF1"), "Rooney et al. 2015, cytolytic activity"),
}


def library() -> dict[str, list[str]]:
    """Signature name → genes."""
    return {name: list(genes) for name, (genes, _) in SIGNATURES.items()}


def source(name: str) -> str:
    return SIGNATURES[name][1]
