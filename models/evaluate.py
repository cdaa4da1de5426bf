"""Metrics for predicted vs measured expression (spots × genes arrays)."""
from __future__ import annotations

import numpy as np


def per_gene_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per gene over spots.

    A constant prediction of a gene whose measured values vary scores r = 0 (it predicts nothing;
    dropping it would flatter the method). A gene whose measured values are constant cannot be
    scored: NaN, left out of the means."""
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    denom = np.sqrt((p ** 2).sum(axis=0) * (t ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / denom
    varies_pred, varies_true = np.ptp(pred, axis=0) > 0, np.ptp(true, axis=0) > 0   # exact, unlike a sum of squares
    return np.where(varies_true, np.where(varies_pred, r, 0.0), np.nan)


def summarize(pred: np.ndarray, true: np.ndarray, genes: list[str], *, top_k: int = 50) -> dict:
    """Mean/median PCC over the panel, PCC over the ``top_k`` most variable measured genes, MSE, MAE."""
    r = per_gene_pearson(pred, true)
    top = np.argsort(-true.var(axis=0))[:top_k]
    return {
        "n_spots": int(len(true)),
        "mean_pcc": float(np.nanmean(r)),
        "median_pcc": float(np.nanmedian(r)),
        "top50_pcc": float(np.nanmean(r[top])),
        "mse": float(np.mean((pred - true) ** 2)),
        "mae": float(np.mean(np.abs(pred - true))),
        "per_gene": {g: (None if np.isnan(v) else float(v)) for g, v in zip(genes, r)},
    }
