"""Figures for screens, associations and validation: interactive plotly builders and static
matplotlib (Agg) exports of the same data as PNG or SVG bytes.

Each figure has a pair: ``volcano_figure`` / ``volcano_static``, ``box_figure`` / ``box_static``,
``scatter_figure`` / ``scatter_static``, ``validation_scatter`` / ``validation_static``.
The data each pair draws is prepared once, by the same helper.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.analysis.associations import Association, group_label
from core.errors import AnalysisError

GREY = "#b8b8b8"
INK = "#333333"
TREND = "#d62728"
SOURCE_COLORS = {"predicted": "#1f77b4", "measured": "#2ca02c", "clinical": "#9467bd", "signature": "#ff7f0e"}
CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
STATIC_FORMATS = ("png", "svg")
_LAYOUT = dict(template="simple_white", font={"family": "Helvetica, Arial, sans-serif", "size": 13},
               margin={"l": 60, "r": 20, "t": 70, "b": 60}, height=480)


# ---------------------------------------------------------------- data shared by both renderers

@dataclass(frozen=True)
class _Volcano:
    df: pd.DataFrame            # variable, source, hr, p, q, x, y, sig, label, hover (+ ci columns if given)
    p_line: float | None        # −log10 of the largest p with q below the threshold
    q_threshold: float
    n_dropped: int


def _volcano_data(screen: pd.DataFrame, q_threshold: float, label_top: int) -> _Volcano:
    missing = [c for c in ("variable", "hr", "p", "q") if c not in screen.columns]
    if missing:
        raise AnalysisError(f"The screen table lacks {', '.join(missing)}; a volcano plot needs "
                            "variable, hr, p and q.")
    df = screen.copy()
    if "source" not in df.columns:
        df["source"] = "variable"
    df["source"] = df["source"].fillna("other").astype(str)
    hr, p = df["hr"].to_numpy(float), df["p"].to_numpy(float)
    ok = np.isfinite(hr) & (hr > 0) & np.isfinite(p)
    df = df[ok].copy()
    if df.empty:
        raise AnalysisError("No variable of the screen has a finite hazard ratio and p; nothing to plot.")
    df["x"] = np.log2(df["hr"].to_numpy(float))
    df["y"] = -np.log10(np.clip(df["p"].to_numpy(float), 1e-300, 1.0))
    df["sig"] = np.nan_to_num(df["q"].to_numpy(float), nan=1.0) < q_threshold
    top = df[df["sig"]].nsmallest(label_top, "p").index
    df["label"] = df.index.isin(top)
    has_ci = {"ci_lower", "ci_upper"} <= set(df.columns)
    df["hover"] = [
        f"<b>{r.variable}</b> ({r.source})<br>HR = {r.hr:.3g}"
        + (f" [{r.ci_lower:.3g}, {r.ci_upper:.3g}]" if has_ci else "")
        + f"<br>p = {_fmt_p(r.p)}, q = {_fmt_p(r.q)}"
        for r in df.itertuples()]
    p_sig = df.loc[df["sig"], "p"]
    p_line = float(-np.log10(max(p_sig.max(), 1e-300))) if len(p_sig) else None
    return _Volcano(df, p_line, q_threshold, int((~ok).sum()))


def _groups_data(values: pd.Series, groups: pd.Series, association: Association) -> list[tuple[str, np.ndarray]]:
    """(label, values) per group of ``association``, in its order (dropped groups left out)."""
    if association.kind != "categorical":
        raise AnalysisError("A box plot needs a categorical association; use a scatter for a continuous one.")
    df = pd.concat([pd.to_numeric(values, errors="coerce").rename("x"), groups.rename("g")], axis=1,
                   join="inner").dropna()
    df = df[np.isfinite(df["x"].to_numpy(float))]
    labels = df["g"].map(group_label)
    return [(g.group, df.loc[labels == g.group, "x"].to_numpy(float)) for g in association.groups]


def _xy(x: pd.Series, y: pd.Series) -> pd.DataFrame:
    df = pd.concat([pd.to_numeric(x, errors="coerce").rename("x"), pd.to_numeric(y, errors="coerce").rename("y")],
                   axis=1, join="inner")
    df = df[np.isfinite(df["x"].to_numpy(float)) & np.isfinite(df["y"].to_numpy(float))]
    if len(df) < 2:
        raise AnalysisError(f"Only {len(df)} patients have both values; nothing to plot.")
    return df


def lowess(x: np.ndarray, y: np.ndarray, *, frac: float = 2 / 3, points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Local linear fit with tricube weights over the nearest ``frac`` of points (no robustness
    iterations), on a grid of ``points`` x values; empty arrays when x is constant or n < 4."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4 or np.ptp(x) == 0:
        return np.array([]), np.array([])
    grid = np.linspace(x.min(), x.max(), points)
    d = np.abs(x[None, :] - grid[:, None])
    k = max(3, int(np.ceil(frac * len(x))))
    h = np.partition(d, k - 1, axis=1)[:, k - 1]
    h = np.where(h > 0, h, np.ptp(x))
    w = np.clip(1 - (d / h[:, None]) ** 3, 0, None) ** 3
    sw, swx, swy = w.sum(1), w @ x, w @ y
    swxx, swxy = w @ (x * x), w @ (x * y)
    den = sw * swxx - swx ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(np.abs(den) > 1e-12 * sw ** 2, (sw * swxy - swx * swy) / den, 0.0)
        fit = (swy - slope * swx) / sw + slope * grid
    return grid, fit


def _linear(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) < 3 or np.ptp(x) == 0:
        return np.array([]), np.array([])
    slope, icpt = np.polyfit(x, y, 1)
    grid = np.linspace(x.min(), x.max(), 2)
    return grid, icpt + slope * grid


def _trend(x: np.ndarray, y: np.ndarray, trend: str) -> tuple[np.ndarray, np.ndarray]:
    if trend not in ("lowess", "linear", "none"):
        raise AnalysisError(f"Unknown trend {trend!r}; use 'lowess', 'linear' or 'none'.")
    if trend == "none":
        return np.array([]), np.array([])
    return lowess(x, y) if trend == "lowess" else _linear(x, y)


def _fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p < 1e-3 else f"{p:.3f}"


def _rho_text(association: Association | float, n: int) -> tuple[str, str]:
    """(title suffix, name) for a continuous association or a bare rho."""
    if isinstance(association, Association):
        return (f"Spearman ρ = {association.effect:.2f}, p = {_fmt_p(association.p)}, n = {association.n}",
                association.against)
    return f"Spearman ρ = {float(association):.2f}, n = {n}", "y"


def _source_color(source: str, order: list[str]) -> str:
    return SOURCE_COLORS.get(source, CYCLE[order.index(source) % len(CYCLE)])


# ---------------------------------------------------------------- plotly

def volcano_figure(screen: pd.DataFrame, *, q_threshold: float = 0.05, label_top: int = 10,
                   title: str | None = None) -> go.Figure:
    """log2 HR against −log10 p; variables with q below the threshold coloured by source and the
    ``label_top`` smallest p of them labelled."""
    v = _volcano_data(screen, q_threshold, label_top)
    df = v.df
    fig = go.Figure()
    rest = df[~df["sig"]]
    fig.add_trace(go.Scatter(x=rest["x"], y=rest["y"], mode="markers", name=f"q ≥ {q_threshold:g}",
                             marker={"color": GREY, "size": 6, "opacity": 0.7}, text=rest["hover"],
                             hovertemplate="%{text}<extra></extra>"))
    sources = sorted(df["source"].unique())
    for src in sources:
        s = df[df["sig"] & (df["source"] == src)]
        if s.empty:
            continue
        fig.add_trace(go.Scatter(x=s["x"], y=s["y"], mode="markers+text", name=f"{src}, q < {q_threshold:g}",
                                 marker={"color": _source_color(src, sources), "size": 8,
                                         "line": {"color": "white", "width": 0.5}},
                                 text=np.where(s["label"], s["variable"].astype(str), ""), textposition="top center",
                                 textfont={"size": 11, "color": INK}, customdata=s["hover"],
                                 hovertemplate="%{customdata}<extra></extra>"))
    fig.add_vline(x=0, line={"color": INK, "width": 1, "dash": "dot"})
    if v.p_line is not None:
        fig.add_hline(y=v.p_line, line={"color": INK, "width": 1, "dash": "dash"},
                      annotation_text=f"q = {q_threshold:g}", annotation_position="top left")
    fig.update_layout(**_LAYOUT, title=title or f"{len(df)} variables, {int(df['sig'].sum())} with q < {q_threshold:g}",
                      xaxis_title="log₂ hazard ratio", yaxis_title="−log₁₀ p",
                      legend={"orientation": "h", "y": -0.18})
    return fig


def box_figure(values: pd.Series, groups: pd.Series, association: Association) -> go.Figure:
    """A box with every patient as a point per group; n in the tick labels, the test in the title."""
    data = _groups_data(values, groups, association)
    fig = go.Figure()
    for i, (label, v) in enumerate(data):
        fig.add_trace(go.Box(y=v, x=[f"{label}<br>(n={len(v)})"] * len(v), name=label, boxpoints="all",
                             jitter=0.4, pointpos=0, marker={"color": CYCLE[i % len(CYCLE)], "size": 5, "opacity": 0.6},
                             line={"color": INK, "width": 1.2}, fillcolor="rgba(0,0,0,0)", showlegend=False,
                             hovertemplate=f"{label}: " + "%{y:.3g}<extra></extra>"))
    fig.update_layout(**_LAYOUT, title=f"{association.variable} by {association.against}<br>"
                      f"<sup>{association.test}: p = {_fmt_p(association.p)}, "
                      f"{association.effect_name} = {association.effect:.2f}</sup>",
                      xaxis_title=association.against, yaxis_title=association.variable)
    return fig


def scatter_figure(x: pd.Series, y: pd.Series, association: Association | float, *,
                   trend: str = "lowess") -> go.Figure:
    """The biomarker ``x`` against a continuous ``y`` with a LOWESS (or linear) trend."""
    df = _xy(x, y)
    text, yname = _rho_text(association, len(df))
    xname = association.variable if isinstance(association, Association) else (x.name or "x")
    gx, gy = _trend(df["x"].to_numpy(float), df["y"].to_numpy(float), trend)
    fig = go.Figure(go.Scatter(x=df["x"], y=df["y"], mode="markers", text=df.index.astype(str), name="patients",
                               marker={"color": CYCLE[0], "size": 6, "opacity": 0.7},
                               hovertemplate="%{text}<br>x = %{x:.3g}<br>y = %{y:.3g}<extra></extra>"))
    if len(gx):
        fig.add_trace(go.Scatter(x=gx, y=gy, mode="lines", name=trend, line={"color": TREND, "width": 2},
                                 hoverinfo="skip"))
    fig.update_layout(**_LAYOUT, title=f"{xname} vs {yname}<br><sup>{text}</sup>", xaxis_title=str(xname),
                      yaxis_title=str(yname), showlegend=False)
    return fig


def validation_scatter(pred: pd.Series, meas: pd.Series, gene: str, r: float) -> go.Figure:
    """Predicted against measured expression of one gene across patients, with a linear fit."""
    df = _xy(meas, pred)
    gx, gy = _linear(df["x"].to_numpy(float), df["y"].to_numpy(float))
    fig = go.Figure(go.Scatter(x=df["x"], y=df["y"], mode="markers", text=df.index.astype(str),
                               marker={"color": CYCLE[0], "size": 6, "opacity": 0.7},
                               hovertemplate="%{text}<br>measured = %{x:.3g}<br>predicted = %{y:.3g}<extra></extra>"))
    if len(gx):
        fig.add_trace(go.Scatter(x=gx, y=gy, mode="lines", line={"color": TREND, "width": 2}, hoverinfo="skip"))
    fig.update_layout(**_LAYOUT, title=f"{gene}<br><sup>Pearson r = {_fmt_r(r)}, n = {len(df)}</sup>",
                      xaxis_title=f"measured {gene}", yaxis_title=f"predicted {gene}", showlegend=False)
    return fig


def _fmt_r(r) -> str:
    return "n/a" if r is None or not np.isfinite(r) else f"{r:.2f}"


# ---------------------------------------------------------------- matplotlib (static)

def volcano_static(screen: pd.DataFrame, fmt: str = "png", *, q_threshold: float = 0.05,
                   label_top: int = 10, title: str | None = None) -> bytes:
    """:func:`volcano_figure` as PNG or SVG bytes."""
    v = _volcano_data(screen, q_threshold, label_top)
    df = v.df
    fig, ax = _mpl_axes()
    rest = df[~df["sig"]]
    ax.scatter(rest["x"], rest["y"], s=12, c=GREY, alpha=0.7, linewidths=0, label=f"q ≥ {q_threshold:g}")
    sources = sorted(df["source"].unique())
    for src in sources:
        s = df[df["sig"] & (df["source"] == src)]
        if len(s):
            ax.scatter(s["x"], s["y"], s=22, c=_source_color(src, sources), edgecolors="white", linewidths=0.4,
                       label=f"{src}, q < {q_threshold:g}")
    for r in df[df["label"]].itertuples():
        ax.annotate(str(r.variable), (r.x, r.y), xytext=(3, 3), textcoords="offset points", fontsize=7, color=INK)
    ax.axvline(0, color=INK, lw=0.8, ls=":")
    if v.p_line is not None:
        ax.axhline(v.p_line, color=INK, lw=0.8, ls="--")
    ax.set_xlabel("log$_2$ hazard ratio")
    ax.set_ylabel("−log$_{10}$ p")
    ax.set_title(title or f"{len(df)} variables, {int(df['sig'].sum())} with q < {q_threshold:g}", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return _save(fig, fmt)


def box_static(values: pd.Series, groups: pd.Series, association: Association, fmt: str = "png") -> bytes:
    """:func:`box_figure` as PNG or SVG bytes."""
    data = _groups_data(values, groups, association)
    fig, ax = _mpl_axes()
    rng = np.random.default_rng(0)
    ax.boxplot([v for _, v in data], positions=range(len(data)), widths=0.5, showfliers=False,
               medianprops={"color": INK, "lw": 1.5}, boxprops={"color": INK}, whiskerprops={"color": INK},
               capprops={"color": INK})
    for i, (_, v) in enumerate(data):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=10, color=CYCLE[i % len(CYCLE)], alpha=0.6,
                   linewidths=0, zorder=3)
    ax.set_xticks(range(len(data)), [f"{label}\n(n={len(v)})" for label, v in data])
    ax.set_xlabel(association.against)
    ax.set_ylabel(association.variable)
    ax.set_title(f"{association.variable} by {association.against}\n{association.test}: "
                 f"p = {_fmt_p(association.p)}", fontsize=10)
    return _save(fig, fmt)


def scatter_static(x: pd.Series, y: pd.Series, association: Association | float, fmt: str = "png", *,
                   trend: str = "lowess") -> bytes:
    """:func:`scatter_figure` as PNG or SVG bytes."""
    df = _xy(x, y)
    text, yname = _rho_text(association, len(df))
    xname = association.variable if isinstance(association, Association) else (x.name or "x")
    gx, gy = _trend(df["x"].to_numpy(float), df["y"].to_numpy(float), trend)
    fig, ax = _mpl_axes()
    ax.scatter(df["x"], df["y"], s=12, color=CYCLE[0], alpha=0.7, linewidths=0)
    if len(gx):
        ax.plot(gx, gy, color=TREND, lw=1.8)
    ax.set_xlabel(str(xname))
    ax.set_ylabel(str(yname))
    ax.set_title(f"{xname} vs {yname}\n{text}", fontsize=10)
    return _save(fig, fmt)


def validation_static(pred: pd.Series, meas: pd.Series, gene: str, r: float, fmt: str = "png") -> bytes:
    """:func:`validation_scatter` as PNG or SVG bytes."""
    df = _xy(meas, pred)
    gx, gy = _linear(df["x"].to_numpy(float), df["y"].to_numpy(float))
    fig, ax = _mpl_axes()
    ax.scatter(df["x"], df["y"], s=12, color=CYCLE[0], alpha=0.7, linewidths=0)
    if len(gx):
        ax.plot(gx, gy, color=TREND, lw=1.8)
    ax.set_xlabel(f"measured {gene}")
    ax.set_ylabel(f"predicted {gene}")
    ax.set_title(f"{gene}\nPearson r = {_fmt_r(r)}, n = {len(df)}", fontsize=10)
    return _save(fig, fmt)


def _mpl_axes():
    """A figure and axes on the Agg canvas (no pyplot, so no global state between sessions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.xaxis.label.set_size(10)
    ax.yaxis.label.set_size(10)
    return fig, ax


def _save(fig, fmt: str) -> bytes:
    if fmt not in STATIC_FORMATS:
        raise AnalysisError(f"Unknown figure format {fmt!r}; use {' or '.join(STATIC_FORMATS)}.")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=200 if fmt == "png" else None, metadata={"Software": "Tessera"}
                if fmt == "png" else {"Creator": "Tessera", "Date": None})
    return buf.getvalue()
