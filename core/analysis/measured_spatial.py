"""Measured vs predicted on a spatial-transcriptomics section: the table, its files and the figures.

Works on a :class:`core.training.st_compare.SectionComparison` (made by
:func:`core.training.st_compare.compare_section`; used here through its fields only, so the
analysis layer does not import training): the per-gene table sorted for display and as CSV /
JSON (the same bytes from the CLI and the page), one colour range for the measured and the
predicted map of a gene, and pure plotly builders. Coordinates are level-0 px ``(x, y)`` of the
section's image, y pointing down.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.analysis.overlay import value_range
from core.errors import AnalysisError

SORTS = ("r", "gene")


def sorted_table(comparison, by: str = "r") -> pd.DataFrame:
    """The per-gene table, best Pearson r first (genes without r last) or by gene name."""
    if by not in SORTS:
        raise AnalysisError(f"Sort by {by!r}? Use one of: {', '.join(SORTS)}.")
    table = comparison.table
    if by == "gene":
        return table.sort_values("gene", kind="stable").reset_index(drop=True)
    return table.sort_values(["pearson_r", "gene"], ascending=[False, True], na_position="last",
                             kind="stable").reset_index(drop=True)


def best_gene(comparison) -> str:
    """The gene with the highest Pearson r (the first gene when no r is defined)."""
    return str(sorted_table(comparison, "r")["gene"].iloc[0])


def table_csv(comparison, sort: str = "r") -> bytes:
    """The full per-gene table as UTF-8 CSV (what ``st-compare --csv`` writes and the page offers)."""
    from core.analysis.report import table_bytes

    return table_bytes(sorted_table(comparison, sort), "csv")


def comparison_json(comparison, sort: str = "r") -> dict:
    """The summary and every gene's row, ready for strict JSON (NaN → None)."""
    from core.analysis.report import to_jsonable

    rows = sorted_table(comparison, sort)
    r, rho = comparison.table["pearson_r"].to_numpy(float), comparison.table["spearman_rho"].to_numpy(float)
    return to_jsonable({
        "section": comparison.section, "layout": comparison.layout, "model": comparison.model,
        "image": comparison.image_path, "image_size": list(comparison.image_size), "mpp": comparison.mpp,
        "n_spots": comparison.n_spots, "n_dropped": comparison.n_dropped, "n_genes": len(comparison.genes),
        "n_genes_scored": int(np.isfinite(r).sum()), "median_r": comparison.median_r,
        "median_rho": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
        "units": comparison.units, "missing_genes": list(comparison.missing_genes), "sort": sort,
        "section_in_training_data": bool(getattr(comparison, "in_training", False)),
        "warning": getattr(comparison, "training_notice", None),
        "genes": rows.to_dict("records")})


def shared_range(comparison, gene: str, mode: str = "robust") -> tuple[float, float]:
    """One colour range for both maps of ``gene``: over the measured and predicted values together,
    ``minmax`` or ``robust`` (2nd–98th percentile, see :func:`core.analysis.overlay.value_range`)."""
    if mode not in ("robust", "minmax"):
        raise AnalysisError(f"Colour range {mode!r}? Use robust or minmax.")
    measured, predicted = comparison.values(gene)
    return value_range(np.concatenate([measured, predicted]), mode)


def section_thumbnail(image_path: str, max_px: int = 1024) -> np.ndarray:
    """The section's H&E as an RGB uint8 array whose long side is at most ``max_px``."""
    from core.wsi.slide import Slide

    with Slide(image_path) as slide:
        return np.asarray(slide.thumbnail(max_px))


def spot_maps(comparison, gene: str, thumb: np.ndarray, *, mode: str = "robust", colorscale: str = "Viridis",
              height: int = 480) -> go.Figure:
    """Measured (left) and predicted (right) ``gene`` at the spots over the H&E thumbnail, both on
    ONE colour scale (a shared ``coloraxis`` with :func:`shared_range`); axes in level-0 px."""
    from plotly.subplots import make_subplots

    w, h = comparison.image_size
    zmin, zmax = shared_range(comparison, gene, mode)
    measured, predicted = comparison.values(gene)
    # marker sizes are screen px: the spot's share of the image times the panel's approximate width
    size = float(np.clip(comparison.spot_diameter_px / max(w, h) * (height - 60), 3, 18))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.04,
                        subplot_titles=(f"measured {gene}", f"predicted {gene}"))
    for col, (label, values) in enumerate((("measured", measured), ("predicted", predicted)), start=1):
        fig.add_trace(go.Image(z=thumb, x0=0, y0=0, dx=w / thumb.shape[1], dy=h / thumb.shape[0],
                               hoverinfo="skip", name="H&E"), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=comparison.xy[:, 0], y=comparison.xy[:, 1], mode="markers", name=label,
            text=list(comparison.spot_ids), marker={"color": values, "coloraxis": "coloraxis", "size": size,
                                                    "line": {"width": 0}},
            hovertemplate="%{text}<br>" + label + " " + gene + " = %{marker.color:.2f}<extra></extra>"),
            row=1, col=col)
        fig.update_xaxes(range=[0, w], showgrid=False, title="x (level-0 px)", row=1, col=col)
        fig.update_yaxes(range=[h, 0], showgrid=False, scaleanchor="x" if col == 1 else "x2", row=1, col=col)
    fig.update_yaxes(title="y (level-0 px)", row=1, col=1)
    fig.update_layout(coloraxis={"cmin": zmin, "cmax": zmax, "colorscale": colorscale,
                                 "colorbar": {"title": {"text": "log1p(CP10k)"}}},
                      showlegend=False, height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def measured_vs_predicted(comparison, gene: str) -> go.Figure:
    """Predicted against measured ``gene`` over the spots, with the identity line (same units)."""
    measured, predicted = comparison.values(gene)
    row = comparison.table.loc[comparison.table["gene"] == gene].iloc[0]
    lo, hi = value_range(np.concatenate([measured, predicted]), "minmax")
    fig = go.Figure(go.Scatter(x=measured, y=predicted, mode="markers", text=list(comparison.spot_ids),
                               marker={"size": 6, "opacity": 0.7, "color": "#1f77b4"},
                               hovertemplate="%{text}<br>measured = %{x:.2f}<br>predicted = %{y:.2f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", hoverinfo="skip",
                             line={"color": "#888", "dash": "dot", "width": 1}))
    fig.update_layout(title=f"{gene}<br><sup>Pearson r = {_fmt(row['pearson_r'])}, Spearman ρ = "
                            f"{_fmt(row['spearman_rho'])}, n = {int(row['n_spots'])} spots</sup>",
                      xaxis_title=f"measured {gene} (log1p CP10k)", yaxis_title=f"predicted {gene} (log1p CP10k)",
                      showlegend=False, height=420, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return fig


def _fmt(value) -> str:
    return "n/a (a constant column)" if value is None or not np.isfinite(value) else f"{value:.3f}"
