"""Pure plotly figure builders: data in, ``go.Figure`` out (no Streamlit here)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go



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


def profile_bars(profile: pd.DataFrame) -> go.Figure:
    """Horizontal bars of a tile's top genes: their z-score against the cohort's tiles when the
    profile is ranked against the cohort (:func:`core.analysis.crossmodal.ranked_profile`), else
    the predicted value coloured by the difference from the slide."""
    df = profile.iloc[::-1]
    if "z" in df.columns:
        fig = go.Figure(go.Bar(x=df["z"], y=df["gene"], orientation="h",
                               marker_color=np.where(df["z"] > 0, "#d62728", "#1f77b4"),
                               customdata=np.stack([df["predicted"], df["cohort_mean"]], axis=1),
                               hovertemplate="%{y}: z %{x:.2f} (predicted %{customdata[0]:.2f}, cohort mean "
                                             "%{customdata[1]:.2f} log1p CP10k)<extra></extra>"))
        fig.update_layout(xaxis_title="z-score against the cohort's tiles", height=max(300, 18 * len(df)),
                          margin={"l": 10, "r": 10, "t": 10, "b": 10})
        return fig
    fig = go.Figure(go.Bar(x=df["predicted"], y=df["gene"], orientation="h",
                           marker_color=np.where(df["vs_slide"] > 0, "#d62728", "#1f77b4"),
                           hovertemplate="%{y}: %{x:.2f}<extra></extra>"))
    fig.update_layout(xaxis_title="predicted log1p(CP10k)", height=max(300, 18 * len(df)),
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
