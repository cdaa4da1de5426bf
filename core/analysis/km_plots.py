"""Kaplan–Meier figures for a ``KMAnalysis``: interactive (plotly) and static (matplotlib) twins.

Both draw step curves with "+" censor ticks, optional 95 % bands, the log-rank p in the title,
n/events in the legend, the hazard ratio of a two-group comparison, and a number-at-risk table
under the plot on the same time axis (in the analysis unit).
"""
from __future__ import annotations

import io

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.analysis.km import KMAnalysis, KMGroup
from core.errors import AnalysisError

QUALITATIVE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf")
# Ordered splits (tertiles, quartiles) read low → high as blue → red.
DIVERGING = {3: ("#2166ac", "#7f7f7f", "#b2182b"), 4: ("#2166ac", "#67a9cf", "#ef8a62", "#b2182b")}


def group_colors(analysis: KMAnalysis) -> list[str]:
    k = len(analysis.groups)
    if analysis.split is not None and k in DIVERGING and len(analysis.split.categories) == k:
        return list(DIVERGING[k])
    return [QUALITATIVE[i % len(QUALITATIVE)] for i in range(k)]


def format_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "p = n/a"
    if p < 1e-4:
        return f"p = {p:.1e}"
    return f"p = {p:.2g}" if p < 0.01 else f"p = {p:.3f}".rstrip("0").rstrip(".")


def _title(a: KMAnalysis) -> str:
    what = " by ".join(x for x in (a.endpoint, a.variable) if x) or "Kaplan–Meier"
    return f"{what} — log-rank {format_p(a.logrank_p)} (χ² = {a.logrank_stat:.2f}, df = {a.logrank_df})"


def _hr_text(a: KMAnalysis) -> str | None:
    """'HR = 1.49 (1.03–2.14)' for a two-group comparison with a finite HR."""
    if len(a.groups) != 2:
        return None
    other = next(g for g in a.groups if not g.is_reference)
    if not np.isfinite(other.hr):
        return None
    lo, hi = other.hr_ci
    return f"HR = {other.hr:.2f} ({lo:.2f}–{hi:.2f}), {other.label} vs {a.reference}"


def _legend(g: KMGroup, unit: str) -> str:
    med = f"{g.median:.3g}" if np.isfinite(g.median) else "NR"
    return f"{g.label} (n={g.n}, events={g.events}, median {med} {unit})"


def _band_steps(g: KMGroup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = np.isfinite(g.ci_lower) & np.isfinite(g.ci_upper)
    return g.timeline[keep], g.ci_lower[keep], g.ci_upper[keep]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _x_max(a: KMAnalysis) -> float:
    return float(max(max(g.timeline[-1] for g in a.groups), a.risk_times[-1]))


def km_figure(analysis: KMAnalysis, *, ci_bands: bool | None = None, height: int = 600) -> go.Figure:
    """Interactive Kaplan–Meier plot with a number-at-risk table underneath.

    ``ci_bands``: draw the 95 % bands (default: only for up to two groups, where they stay legible).
    """
    a = analysis
    ci_bands = len(a.groups) <= 2 if ci_bands is None else ci_bands
    colors = group_colors(a)
    k = len(a.groups)
    table_share = min(0.4, 0.1 + 0.045 * k)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.15,
                        row_heights=[1 - table_share, table_share])
    for g, color in zip(a.groups, colors):
        if ci_bands:
            bt, lo, hi = _band_steps(g)
            fig.add_trace(go.Scatter(x=bt, y=hi, mode="lines", line={"width": 0, "shape": "hv"},
                                     legendgroup=g.label, showlegend=False, hoverinfo="skip"), row=1, col=1)
            fig.add_trace(go.Scatter(x=bt, y=lo, mode="lines", line={"width": 0, "shape": "hv"},
                                     fill="tonexty", fillcolor=_rgba(color, 0.13), legendgroup=g.label,
                                     showlegend=False, hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=g.timeline, y=g.survival, mode="lines", line={"color": color, "width": 2.2, "shape": "hv"},
            name=_legend(g, a.unit), legendgroup=g.label, customdata=g.n_at_risk,
            hovertemplate=f"<b>{g.label}</b><br>%{{x:.1f}} {a.unit}: S = %{{y:.3f}}<br>"
                          "at risk %{customdata}<extra></extra>"), row=1, col=1)
        if len(g.censor_times):
            fig.add_trace(go.Scatter(
                x=g.censor_times, y=g.censor_survival, mode="markers", legendgroup=g.label, showlegend=False,
                marker={"symbol": "cross-thin", "size": 9, "color": color, "line": {"width": 1.6, "color": color}},
                hovertemplate=f"{g.label}: censored at %{{x:.1f}} {a.unit}<extra></extra>"), row=1, col=1)
    # number-at-risk table: one text row per group, first group on top
    for i, (g, color) in enumerate(zip(a.groups, colors)):
        fig.add_trace(go.Scatter(x=a.risk_times, y=np.full(len(a.risk_times), k - 1 - i), mode="text",
                                 text=[str(v) for v in g.at_risk], textfont={"color": color, "size": 12},
                                 legendgroup=g.label, showlegend=False, hoverinfo="skip",
                                 cliponaxis=False), row=2, col=1)
    x_max = _x_max(a)
    x_range = [-0.02 * x_max, x_max * 1.03]
    ticks = list(a.risk_times)
    fig.update_xaxes(range=x_range, tickvals=ticks, showline=True, linecolor="#444", ticks="outside",
                     showgrid=False, zeroline=False, showticklabels=True, row=1, col=1,
                     title={"text": f"Time ({a.unit})", "standoff": 6})
    fig.update_xaxes(range=x_range, tickvals=ticks, showticklabels=False, showline=False, showgrid=False,
                     zeroline=False, ticks="", row=2, col=1)
    fig.update_yaxes(range=[0, 1.04], tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1.0], showline=True, linecolor="#444",
                     ticks="outside", showgrid=True, gridcolor="#eee", zeroline=False, row=1, col=1,
                     title={"text": f"{a.endpoint} probability" if a.endpoint else "Survival probability"})
    fig.update_yaxes(range=[-0.6, k - 0.4], tickvals=list(range(k)), showgrid=False, zeroline=False,
                     showline=False, ticks="", row=2, col=1,
                     ticktext=[f"<span style='color:{c}'>{g.label}</span>" for g, c in
                               zip(reversed(a.groups), reversed(colors))])
    fig.add_annotation(text="<b>Number at risk</b>", xref="x2 domain", yref="y2 domain", x=0, y=1.02,
                       xanchor="left", yanchor="bottom", showarrow=False, font={"size": 12})
    hr = _hr_text(a)
    if hr:   # lower left: empty early in follow-up, when every curve is still high
        fig.add_annotation(text=hr, xref="x domain", yref="y domain", x=0.01, y=0.03, xanchor="left",
                           yanchor="bottom", showarrow=False, font={"size": 12}, bgcolor="rgba(255,255,255,0.8)")
    # legend in the upper right of the curve panel: empty late in follow-up, when curves are low
    fig.update_layout(template="simple_white", height=height,
                      title={"text": _title(a), "x": 0.01, "font": {"size": 15}},
                      margin={"l": 10, "r": 20, "t": 60, "b": 10}, hovermode="closest",
                      legend={"orientation": "v", "x": 0.99, "y": 1.0, "xanchor": "right", "yanchor": "top",
                              "bgcolor": "rgba(255,255,255,0.8)", "font": {"size": 11}})
    return fig


def km_static(analysis: KMAnalysis, fmt: str = "png", *, ci_bands: bool | None = None, dpi: int = 200) -> bytes:
    """The same figure drawn by matplotlib (Agg), as PNG or SVG bytes for exports."""
    if fmt not in ("png", "svg"):
        raise AnalysisError(f"Unknown image format {fmt!r}; use 'png' or 'svg'.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = analysis
    ci_bands = len(a.groups) <= 2 if ci_bands is None else ci_bands
    colors = group_colors(a)
    k = len(a.groups)
    fig = Figure(figsize=(8, 5.2 + 0.28 * k))
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=[4.2, 0.55 + 0.3 * k], hspace=0.32)
    ax, tab = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    for g, color in zip(a.groups, colors):
        if ci_bands:
            bt, lo, hi = _band_steps(g)
            ax.fill_between(bt, lo, hi, step="post", color=color, alpha=0.13, linewidth=0)
        ax.step(g.timeline, g.survival, where="post", color=color, linewidth=1.9, label=_legend(g, a.unit))
        if len(g.censor_times):
            ax.plot(g.censor_times, g.censor_survival, linestyle="none", marker="+", markersize=7,
                    markeredgewidth=1.3, color=color)
    x_max = _x_max(a)
    for axis in (ax, tab):
        axis.set_xlim(-0.02 * x_max, x_max * 1.03)
        axis.set_xticks(a.risk_times)
    ax.set_ylim(0, 1.04)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xticklabels([_tick(t) for t in a.risk_times])
    ax.set_xlabel(f"Time ({a.unit})")
    ax.set_ylabel(f"{a.endpoint} probability" if a.endpoint else "Survival probability")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#eeeeee", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(loc="upper right", frameon=True, framealpha=0.85, edgecolor="none", fontsize=8.5)
    ax.set_title(_title(a), loc="left", fontsize=10.5)
    hr = _hr_text(a)
    if hr:
        ax.text(0.01, 0.03, hr, transform=ax.transAxes, ha="left", va="bottom", fontsize=8.5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    # number-at-risk table
    for i, (g, color) in enumerate(zip(a.groups, colors)):
        for t, v in zip(a.risk_times, g.at_risk):
            tab.text(t, k - 1 - i, str(v), ha="center", va="center", color=color, fontsize=8.5)
    tab.set_ylim(-0.6, k - 0.4)
    tab.set_yticks(range(k))
    tab.set_yticklabels([g.label for g in reversed(a.groups)], fontsize=8.5)
    for lab, color in zip(tab.get_yticklabels(), reversed(colors)):
        lab.set_color(color)
    tab.tick_params(axis="both", length=0)
    tab.set_xticklabels([])
    tab.spines[["top", "right", "bottom", "left"]].set_visible(False)
    tab.set_title("Number at risk", loc="left", fontsize=9, fontweight="bold")
    buf = io.BytesIO()
    kwargs = {"metadata": {"Date": None}} if fmt == "svg" else {"dpi": dpi}
    fig.savefig(buf, format=fmt, bbox_inches="tight", facecolor="white", **kwargs)
    return buf.getvalue()


def _tick(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:g}"

