"""Pure plotly figure builders: data in, ``go.Figure`` out (no Streamlit here)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.analysis.survival import SplitSurvival


def heatmap_overlay(thumb: np.ndarray, slide_size: tuple[int, int], tiles: pd.DataFrame, tile_size: int,
                    *, title: str, opacity: float = 0.6, colorscale: str = "Viridis",
                    zrange: tuple[float, float] | None = None) -> go.Figure:
    """The slide thumbnail with tile values on top; axes in level-0 px, y pointing down."""
    w, h = slide_size
    cols = int(np.ceil(w / tile_size))
    rows = int(np.ceil(h / tile_size))
    grid = np.full((rows, cols), np.nan)
    grid[(tiles["y"] // tile_size).astype(int), (tiles["x"] // tile_size).astype(int)] = tiles["value"]
    fig = go.Figure()
    fig.add_trace(go.Image(z=thumb, x0=0, y0=0, dx=w / thumb.shape[1], dy=h / thumb.shape[0], hoverinfo="skip"))
    zmin, zmax = zrange if zrange else (np.nanmin(grid), np.nanmax(grid))
    fig.add_trace(go.Heatmap(z=grid, x0=tile_size / 2, dx=tile_size, y0=tile_size / 2, dy=tile_size,
                             opacity=opacity, colorscale=colorscale, zmin=zmin, zmax=zmax,
                             colorbar={"title": {"text": title}}, hoverongaps=False,
                             hovertemplate="x=%{x:.0f} y=%{y:.0f}<br>" + title + "=%{z:.2f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showgrid=False, title="y (level-0 px)")
    fig.update_xaxes(showgrid=False, title="x (level-0 px)", range=[0, w])
    fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, height=520)
    return fig


def km_figure(result: SplitSurvival, *, time_unit: str = "days") -> go.Figure:
    """Kaplan–Meier curves with 95 % bands; legend gives n and events per group."""
    colors = ("#1f77b4", "#d62728")
    fig = go.Figure()
    for curve, color in zip(result.curves, colors):
        t = np.repeat(curve.timeline, 2)[1:]
        fig.add_trace(go.Scatter(x=np.r_[t, curve.timeline[-1]], y=np.repeat(curve.ci_upper, 2), mode="lines",
                                 line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=np.r_[t, curve.timeline[-1]], y=np.repeat(curve.ci_lower, 2), mode="lines",
                                 line={"width": 0}, fill="tonexty", fillcolor=_rgba(color, 0.15),
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=curve.timeline, y=curve.survival, mode="lines", line_shape="hv",
                                 line={"color": color, "width": 2},
                                 name=f"{curve.label} (n={curve.n}, events={curve.events})"))
    fig.update_layout(xaxis_title=f"time ({time_unit})", yaxis_title=f"{result.endpoint} probability",
                      yaxis_range=[0, 1.02], height=450, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def profile_bars(profile: pd.DataFrame) -> go.Figure:
    """Horizontal bars of a tile's top predicted genes."""
    df = profile.iloc[::-1]
    fig = go.Figure(go.Bar(x=df["predicted"], y=df["gene"], orientation="h",
                           marker_color=np.where(df["vs_slide"] > 0, "#d62728", "#1f77b4"),
                           hovertemplate="%{y}: %{x:.2f}<extra></extra>"))
    fig.update_layout(xaxis_title="predicted log1p(CP10k)", height=max(300, 18 * len(df)),
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"
