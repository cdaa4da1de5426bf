"""Judging a model against measured spatial transcriptomics: per-gene Pearson r over spots.

``evaluate`` runs a model through the normal inference path on every section found under a
folder (HER2ST/legacy ST, 10x Visium, HEST-style; see :mod:`core.training.stdata`) and returns the
JSON-ready report ``{"model", "genes", "sections": {name: {n_spots, mean_pcc, median_pcc,
top50_pcc, per_gene, ...}}}``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from core.errors import TesseraError
from core.engine.modelhub import LoadedModel

log = logging.getLogger(__name__)


def predict_patches(model: LoadedModel, patches: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """The model's expression for uint8 patches [N, px, px, 3] (CPU, inference mode)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            out.append(model.module(torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])))
                       ["expression"].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(model.genes)), np.float32)


def section_arrays(model: LoadedModel, section, *, batch_size: int = 32
                   ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Per-spot arrays of one section: ``(keep (N,) bool, genes, measured (K, G), predicted (K, G))``.

    ``genes`` are the model's panel genes the section measures, in panel order; ``measured`` is
    :func:`core.training.stdata.targets` over them (log1p CP10k over those genes, the training
    units); rows are the ``K = keep.sum()`` spots whose patch lies inside the image.
    """
    from core.training.stdata import section_patches, targets

    card = model.card
    patches, keep = section_patches(section, tile_um=card["tile_um"], mpp=card["mpp"], out_px=card["input_px"])
    measured = set(section.counts.var_names)
    genes = [g for g in model.genes if g in measured]
    if len(genes) < 2:
        raise TesseraError(f"Section {section.name} measures {len(genes)} of the model's {len(model.genes)} genes; "
                           "nothing to evaluate.")
    y = targets(section, genes)[keep]
    pred = predict_patches(model, patches, batch_size=batch_size)
    idx = [model.genes.index(g) for g in genes]
    return keep, genes, y, pred[:, idx]


def evaluate_section(model: LoadedModel, section, *, batch_size: int = 32) -> dict:
    """Metrics of one section over the panel genes it measures (the others are listed as missing)."""
    from models.evaluate import summarize

    _, genes, y, pred = section_arrays(model, section, batch_size=batch_size)
    measured = set(section.counts.var_names)
    report = summarize(pred, y, genes)
    report["missing_genes"] = [g for g in model.genes if g not in measured]
    report["mpp_source"] = section.mpp_source
    return report


def evaluate(model: LoadedModel, st_dir: str | Path, *, batch_size: int = 32) -> dict:
    """Evaluate ``model`` on every section under ``st_dir``."""
    from core.training.stdata import find_sections

    sections = find_sections(Path(st_dir))
    if not sections:
        raise TesseraError(f"No spatial-transcriptomics section found under {st_dir} (HER2ST, Visium or "
                           "HEST-style layouts).")
    result = {"model": model.key, "genes": model.genes, "sections": {}}
    for section in sections:
        result["sections"][section.name] = evaluate_section(model, section, batch_size=batch_size)
        log.info("%s: mean PCC %.3f over %d spots", section.name,
                 result["sections"][section.name]["mean_pcc"], result["sections"][section.name]["n_spots"])
    return result
