"""A biomarker against a clinical variable, screens over many biomarkers, and validation of
predicted against measured expression.

Tests follow R's defaults, written out in numpy/scipy.special-level code:

* two groups: Wilcoxon–Mann–Whitney. Exact p (R's ``pwilcox``) when both groups have < 50
  patients and there are no ties, as ``wilcox.test`` does by default; otherwise the normal
  approximation with tie and continuity correction (``wilcox.test(exact=FALSE, correct=TRUE)``).
  The statistic is R's W: the U of the first group.
* more than two groups: Kruskal–Wallis H with tie correction (``kruskal.test``), df = k − 1.
* continuous: Spearman rho with the t approximation (``cor.test(method="spearman", exact=FALSE)``).

Effect sizes: rank-biserial correlation (P(second > first) − P(second < first), positive when
the second group is higher), epsilon² = H / (n − 1) for k groups, rho for continuous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats

from core.analysis.cox import benjamini_hochberg
from core.errors import AnalysisError

KINDS = ("categorical", "continuous")
MIN_GROUP = 3          # groups with fewer patients are dropped (and reported)
MAX_LEVELS = 5         # a numeric variable with more distinct values than this is continuous
EXACT_MAX = 50         # exact Mann–Whitney p below this group size when there are no ties
TEST_EXACT = "Mann–Whitney U (exact)"
TEST_NORMAL = "Mann–Whitney U (normal approx., tie/continuity corrected)"
TEST_KRUSKAL = "Kruskal–Wallis (tie-corrected)"
TEST_SPEARMAN = "Spearman (t approx.)"


@dataclass(frozen=True)
class GroupSummary:
    group: str
    n: int
    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


@dataclass(frozen=True)
class Association:
    """One biomarker (``variable``) against one clinical variable (``against``)."""

    variable: str
    against: str
    kind: str                       # "categorical" or "continuous"
    test: str
    statistic: float                # W (2 groups), H (k groups) or rho (continuous)
    statistic_name: str
    p: float
    n: int
    effect: float                   # rank-biserial, epsilon² or rho
    effect_name: str
    df: int | None = None           # Kruskal–Wallis degrees of freedom
    groups: tuple[GroupSummary, ...] = ()
    rho: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        """A dict that ``json.dumps(..., allow_nan=False)`` accepts (non-finite numbers → None)."""
        out = {"variable": self.variable, "against": self.against, "kind": self.kind, "test": self.test,
               "statistic": _num(self.statistic), "statistic_name": self.statistic_name, "p": _num(self.p),
               "n": int(self.n), "effect": _num(self.effect), "effect_name": self.effect_name,
               "notes": list(self.notes)}
        if self.kind == "categorical":
            out["df"] = self.df
            out["groups"] = [{"group": g.group, "n": g.n, "median": _num(g.median), "q1": _num(g.q1),
                              "q3": _num(g.q3), "iqr": _num(g.iqr)} for g in self.groups]
        else:
            out["rho"] = _num(self.rho)
        return out


# ---------------------------------------------------------------- one biomarker

def associate(values: pd.Series, other: pd.Series, *, kind: str | None = None) -> Association:
    """``values`` (numeric, indexed by patient) against ``other`` (indexed by patient).

    Patients in both with neither value missing are used. ``kind=None`` detects it from
    ``other``: numeric with more than 5 distinct values is continuous, else categorical.
    """
    kind = _resolve_kind(other, kind)
    variable, against = _name(values, "biomarker"), _name(other, "variable")
    x, g = _pair(values, other, kind)
    if kind == "continuous":
        if len(x) < 3:
            raise AnalysisError(f"Only {len(x)} patients have both {variable} and {against}; a correlation "
                                "needs at least 3.")
        if np.ptp(x) == 0 or np.ptp(g) == 0:
            which = variable if np.ptp(x) == 0 else against
            raise AnalysisError(f"{which} is constant over the {len(x)} patients; no correlation can be computed.")
        rho, p = _spearman(x, g.astype(float))
        return Association(variable, against, kind, TEST_SPEARMAN, rho, "rho", p, len(x), rho, "rho", rho=rho)

    x, g, levels, notes = _drop_small(x, g, _levels(other))
    if len(levels) < 2:
        raise AnalysisError(f"{against} has fewer than 2 groups with at least {MIN_GROUP} patients "
                            f"having {variable}{'; ' + ' '.join(notes) if notes else ''}.")
    if np.ptp(x) == 0:
        raise AnalysisError(f"{variable} is constant over the {len(x)} patients; no rank test can be computed.")
    codes = pd.Categorical(g, categories=levels).codes
    summaries = tuple(_summary(group_label(lv), x[codes == i]) for i, lv in enumerate(levels))
    ranks = stats.rankdata(x)
    ties = _tie_sum(x)
    if len(levels) == 2:
        n1, n2 = int((codes == 0).sum()), int((codes == 1).sum())
        w = float(ranks[codes == 0].sum() - n1 * (n1 + 1) / 2)
        exact = ties == 0 and n1 < EXACT_MAX and n2 < EXACT_MAX
        p = _mw_exact_p(w, n1, n2) if exact else float(_mw_normal_p(np.array([w]), n1, n2, np.array([ties]))[0])
        effect = 1 - 2 * w / (n1 * n2)
        notes.append("Exact p (no ties, both groups < 50)." if exact else
                     "Normal approximation with tie and continuity correction.")
        notes.append(f"Rank-biserial r > 0: {summaries[1].group} higher than {summaries[0].group}.")
        return Association(variable, against, kind, TEST_EXACT if exact else TEST_NORMAL, w, "W", p, len(x),
                           effect, "rank-biserial r", groups=summaries, notes=tuple(notes))
    rank_sums = np.bincount(codes, weights=ranks, minlength=len(levels))
    sizes = np.bincount(codes, minlength=len(levels))
    h = float(_kruskal_h(rank_sums[:, None], sizes, len(x), np.array([ties]))[0])
    k = len(levels)
    p = float(stats.chi2.sf(h, k - 1))
    return Association(variable, against, kind, TEST_KRUSKAL, h, "H", p, len(x), h / (len(x) - 1), "epsilon²",
                       df=k - 1, groups=summaries, notes=tuple(notes))


# ---------------------------------------------------------------- a screen

def associate_many(matrix: pd.DataFrame, other: pd.Series, *, kind: str | None = None) -> pd.DataFrame:
    """Every column of ``matrix`` (patients × variables) against ``other``, as :func:`associate`,
    with Benjamini–Hochberg q over the screen; sorted by p.

    Columns without missing values are done at once from ranks; the rest one by one. A column
    that cannot be tested (constant, too few patients) gets p = NaN and no q.
    """
    kind = _resolve_kind(other, kind)
    cols = ["variable", "test", "statistic", "effect", "p", "q", "n"]
    if matrix.shape[1] == 0:
        raise AnalysisError("The screen has no variables.")
    if matrix.columns.duplicated().any():
        dup = matrix.columns[matrix.columns.duplicated()].unique()
        raise AnalysisError(f"The screen has duplicated variables: {', '.join(map(str, dup[:5]))}.")
    if matrix.index.duplicated().any() or other.index.duplicated().any():
        raise AnalysisError("A patient appears more than once; give one value per patient "
                            "(aggregate slides to patients first).")
    num = matrix.apply(pd.to_numeric, errors="coerce").astype(float)
    patients = _pair_index(pd.Series(0.0, index=num.index), other, kind)   # with a usable ``other``
    g = other.loc[patients].to_numpy(float if kind == "continuous" else object)
    block = num.loc[patients]
    complete = np.isfinite(block.to_numpy()).all(axis=0)
    rows: dict[str, dict] = {}
    if complete.any():
        rows.update(_vectorised(block.loc[:, complete], g, kind, _levels(other)))
    for name in block.columns[~complete]:
        rows[name] = _row(num[name], other, kind)
    out = pd.DataFrame([{"variable": str(c), **rows[c]} for c in matrix.columns], columns=cols)
    out["q"] = benjamini_hochberg(out["p"].to_numpy(float))
    return out.sort_values(["p", "variable"], na_position="last", kind="stable").reset_index(drop=True)


def _row(col: pd.Series, other: pd.Series, kind: str) -> dict:
    try:
        a = associate(col, other, kind=kind)
    except AnalysisError:
        n = len(_pair_index(col, other, kind))
        return {"test": "not tested", "statistic": np.nan, "effect": np.nan, "p": np.nan, "q": np.nan, "n": n}
    return {"test": a.test, "statistic": a.statistic, "effect": a.effect, "p": a.p, "q": np.nan, "n": a.n}


def _vectorised(block: pd.DataFrame, g: np.ndarray, kind: str, levels: list) -> dict[str, dict]:
    """Columns of ``block`` (no missing values, rows aligned with ``g``) tested at once."""
    x = block.to_numpy(float)
    n = x.shape[0]
    nan_row = {"test": "not tested", "statistic": np.nan, "effect": np.nan, "p": np.nan, "q": np.nan, "n": n}
    constant = np.ptp(x, axis=0) == 0 if n else np.ones(x.shape[1], bool)
    out: dict[str, dict] = {}
    if kind == "continuous":
        gy = g.astype(float)
        if n < 3 or np.ptp(gy) == 0:
            return {c: dict(nan_row) for c in block.columns}
        rx = stats.rankdata(x, axis=0)
        ry = stats.rankdata(gy)
        rx = rx - rx.mean(axis=0)
        ry = ry - ry.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = (ry @ rx) / np.sqrt((rx ** 2).sum(axis=0) * (ry ** 2).sum())
        p = _t_p(rho, n)
        for j, c in enumerate(block.columns):
            out[c] = dict(nan_row) if constant[j] else {"test": TEST_SPEARMAN, "statistic": float(rho[j]),
                                                        "effect": float(rho[j]), "p": float(p[j]), "q": np.nan,
                                                        "n": n}
        return out
    _, _, levels, _ = _drop_small(np.zeros(n), g, levels)
    mask = pd.Series(g, dtype=object).isin(levels).to_numpy()
    x, g = x[mask], g[mask]
    n = x.shape[0]
    nan_row["n"] = n
    constant = np.ptp(x, axis=0) == 0 if n else np.ones(x.shape[1], bool)
    if len(levels) < 2:
        return {c: dict(nan_row) for c in block.columns}
    codes = pd.Categorical(g, categories=levels).codes
    ranks = stats.rankdata(x, axis=0)
    ties = _tie_sums(x)
    onehot = np.eye(len(levels))[codes]                       # n × k
    rank_sums = onehot.T @ ranks                               # k × m
    sizes = onehot.sum(axis=0).astype(int)
    if len(levels) == 2:
        n1, n2 = int(sizes[0]), int(sizes[1])
        w = rank_sums[0] - n1 * (n1 + 1) / 2
        exact = (ties == 0) & (n1 < EXACT_MAX) & (n2 < EXACT_MAX)
        p = _mw_normal_p(w, n1, n2, ties)
        for j in np.flatnonzero(exact):
            p[j] = _mw_exact_p(float(w[j]), n1, n2)
        effect = 1 - 2 * w / (n1 * n2)
        for j, c in enumerate(block.columns):
            out[c] = dict(nan_row) if constant[j] else {"test": TEST_EXACT if exact[j] else TEST_NORMAL,
                                                        "statistic": float(w[j]), "effect": float(effect[j]),
                                                        "p": float(p[j]), "q": np.nan, "n": n}
        return out
    h = _kruskal_h(rank_sums, sizes, n, ties)
    p = stats.chi2.sf(h, len(levels) - 1)
    for j, c in enumerate(block.columns):
        out[c] = dict(nan_row) if constant[j] else {"test": TEST_KRUSKAL, "statistic": float(h[j]),
                                                    "effect": float(h[j] / (n - 1)), "p": float(p[j]),
                                                    "q": np.nan, "n": n}
    return out


# ---------------------------------------------------------------- validation

def validate(predicted: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Per gene, Pearson and Spearman correlation of predicted with measured expression.

    Both frames are patients × genes; genes are matched case-insensitively (named as in
    ``predicted``), and each gene uses the patients with a finite value in both. A constant
    gene, or one with < 3 such patients, gets r = NaN with its n. Sorted by Pearson r, descending.
    """
    cols = ["gene", "n", "pearson_r", "pearson_p", "spearman_r", "spearman_p"]
    pred_map, meas_map = _gene_map(predicted, "predicted"), _gene_map(measured, "measured")
    shared = [k for k in pred_map if k in meas_map]
    if not shared:
        raise AnalysisError(f"The predicted ({len(pred_map)} genes) and measured ({len(meas_map)} genes) "
                            "matrices share no gene; check the gene symbols (e.g. HGNC symbols in both).")
    patients = predicted.index.intersection(measured.index)
    if len(patients) == 0:
        raise AnalysisError("No patient has both predicted and measured expression; check that both are "
                            "indexed by the same patient barcodes (e.g. TCGA-XX-XXXX).")
    for frame, what in ((predicted, "predicted"), (measured, "measured")):
        if frame.index.duplicated().any():
            raise AnalysisError(f"The {what} matrix has more than one row for some patients; "
                                "aggregate to one row per patient first.")
    rows = []
    for key in shared:
        a = pd.to_numeric(predicted.loc[patients, pred_map[key]], errors="coerce").to_numpy(float)
        b = pd.to_numeric(measured.loc[patients, meas_map[key]], errors="coerce").to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        n = int(ok.sum())
        if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            rows.append((str(pred_map[key]), n, np.nan, np.nan, np.nan, np.nan))
            continue
        r = _pearson(a, b)
        rho, sp = _spearman(a, b)
        rows.append((str(pred_map[key]), n, r, float(_t_p(np.array([r]), n)[0]), rho, sp))
    out = pd.DataFrame(rows, columns=cols)
    out["n"] = out["n"].astype(int)
    return out.sort_values(["pearson_r", "gene"], ascending=[False, True], na_position="last",
                           kind="stable").reset_index(drop=True)


def validation_summary(df: pd.DataFrame, *, top: int = 10) -> dict:
    """Headline numbers of a :func:`validate` table (JSON-safe: NaN → None)."""
    r = df["pearson_r"].to_numpy(float)
    ok = np.isfinite(r)
    q = benjamini_hochberg(df["pearson_p"].to_numpy(float))
    ranked = df[ok].sort_values("pearson_r", ascending=False)
    return {
        "n_genes": int(len(df)),
        "n_evaluable": int(ok.sum()),
        "median_r": _num(float(np.median(r[ok]))) if ok.any() else None,
        "median_spearman_r": _num(float(np.nanmedian(df["spearman_r"]))) if ok.any() else None,
        "fraction_positive": _num(float((r[ok] > 0).mean())) if ok.any() else None,
        "n_significant": int(np.sum(np.nan_to_num(q, nan=1.0) < 0.05)),
        "top_genes": [{"gene": str(g), "r": _num(v)} for g, v in
                      zip(ranked["gene"].head(top), ranked["pearson_r"].head(top))],
    }


# ---------------------------------------------------------------- statistics

def _t_p(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p of correlations r on n pairs, from t = r √((n−2)/(1−r²)) on n − 2 df."""
    r = np.asarray(r, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt((n - 2) / (1 - r ** 2))
    p = 2 * stats.t.sf(np.abs(t), n - 2)
    return np.where(np.abs(r) >= 1, 0.0, p)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a @ b) / math.sqrt((a @ a) * (b @ b)), -1, 1))


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    rho = _pearson(stats.rankdata(a), stats.rankdata(b))
    return rho, float(_t_p(np.array([rho]), len(a))[0])


def _tie_sum(x: np.ndarray) -> float:
    """Σ (t³ − t) over groups of tied values."""
    _, t = np.unique(x, return_counts=True)
    return float(np.sum(t.astype(float) ** 3 - t))


def _tie_sums(x: np.ndarray) -> np.ndarray:
    """:func:`_tie_sum` per column: each member of a tie group of size t contributes t² − 1."""
    t = stats.rankdata(x, method="max", axis=0) - stats.rankdata(x, method="min", axis=0) + 1
    return (t ** 2 - 1).sum(axis=0)


def _mw_normal_p(w: np.ndarray, n1: int, n2: int, ties: np.ndarray) -> np.ndarray:
    """Two-sided normal-approximation p with tie and continuity correction (R's ``wilcox.test``)."""
    n = n1 + n2
    z = w - n1 * n2 / 2
    sigma = np.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (z - np.sign(z) * 0.5) / sigma
    return np.minimum(2 * stats.norm.sf(np.abs(z)), 1.0)


@lru_cache(maxsize=64)
def _u_counts(n1: int, n2: int) -> np.ndarray:
    """Number of ways to pick the ``n1`` ranks of group 1 out of 1 … n1 + n2, per U = 0 … n1·n2.

    Counts subsets by size and rank sum, adding one rank at a time (only additions, so no
    cancellation in the far tails); U = rank sum − n1(n1 + 1)/2.
    """
    n, top = n1 + n2, (n1 + n2) * (n1 + n2 + 1) // 2
    dp = np.zeros((n1 + 1, top + 1))
    dp[0, 0] = 1.0
    for r in range(1, n + 1):
        for j in range(min(r, n1), 0, -1):
            dp[j, r:] += dp[j - 1, :top + 1 - r]
    lo = n1 * (n1 + 1) // 2
    return dp[n1, lo:lo + n1 * n2 + 1].copy()


def _mw_exact_p(w: float, n1: int, n2: int) -> float:
    """Two-sided exact p of U = ``w`` (R: ``min(1, 2 · P(U ≤ w))`` or the upper tail)."""
    c = _u_counts(n1, n2)
    pmf = c / c.sum()
    u = int(round(w))
    lower, upper = pmf[:u + 1].sum(), pmf[u:].sum()
    return float(min(1.0, 2 * min(lower, upper)))


def _kruskal_h(rank_sums: np.ndarray, sizes: np.ndarray, n: int, ties: np.ndarray) -> np.ndarray:
    """Tie-corrected H from k × m rank sums and the k group sizes."""
    h = 12 / (n * (n + 1)) * (rank_sums ** 2 / sizes[:, None]).sum(axis=0) - 3 * (n + 1)
    with np.errstate(divide="ignore", invalid="ignore"):     # all tied: NaN, reported as not tested
        return h / (1 - ties / (n ** 3 - n))


# ---------------------------------------------------------------- helpers

def _resolve_kind(other: pd.Series, kind: str | None) -> str:
    if kind is None:
        return detect_kind(other)
    if kind not in KINDS:
        raise AnalysisError(f"Unknown kind {kind!r}; use 'categorical', 'continuous' or None to detect it.")
    if kind == "continuous" and not _is_numeric(other):
        raise AnalysisError(f"{_name(other, 'The variable')} is not numeric, so it cannot be treated as "
                            "continuous; use kind='categorical'.")
    return kind


def detect_kind(other: pd.Series) -> str:
    """'continuous' for a numeric variable with more than 5 distinct values, else 'categorical'."""
    if _is_numeric(other) and other.dropna().nunique() > MAX_LEVELS:
        return "continuous"
    return "categorical"


def _is_numeric(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _name(s: pd.Series, default: str) -> str:
    return default if s.name is None else str(s.name)


def _usable(values: pd.Series, other: pd.Series, kind: str) -> pd.DataFrame:
    if values.index.duplicated().any() or other.index.duplicated().any():
        raise AnalysisError("A patient appears more than once; give one value per patient "
                            "(aggregate slides to patients first).")
    x = pd.to_numeric(values, errors="coerce").astype(float)
    df = pd.concat([x.rename("x"), other.rename("g")], axis=1, join="inner")
    ok = np.isfinite(df["x"].to_numpy()) & df["g"].notna().to_numpy()
    if kind == "continuous":
        ok &= np.isfinite(pd.to_numeric(df["g"], errors="coerce").to_numpy(float))
    return df[ok]


def _pair(values: pd.Series, other: pd.Series, kind: str) -> tuple[np.ndarray, np.ndarray]:
    df = _usable(values, other, kind)
    g = df["g"].to_numpy(float) if kind == "continuous" else df["g"].to_numpy(object)
    return df["x"].to_numpy(float), g


def _pair_index(values: pd.Series, other: pd.Series, kind: str) -> pd.Index:
    return _usable(values, other, kind).index


def _levels(other: pd.Series) -> list:
    """Group order: the categories of a categorical, else sorted (as text when values do not compare)."""
    if isinstance(other.dtype, pd.CategoricalDtype):
        return list(other.cat.categories)
    vals = list(pd.unique(other.dropna()))
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _drop_small(x: np.ndarray, g: np.ndarray, levels: list) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    counts = pd.Series(g, dtype=object).value_counts()
    present = [lv for lv in levels if counts.get(lv, 0) > 0]
    small = [lv for lv in present if counts[lv] < MIN_GROUP]
    keep = [lv for lv in present if counts[lv] >= MIN_GROUP]
    notes = [f"Group {group_label(lv)} dropped: {int(counts[lv])} patient{'s' if counts[lv] != 1 else ''} "
             f"(fewer than {MIN_GROUP})." for lv in small]
    mask = pd.Series(g, dtype=object).isin(keep).to_numpy()
    return x[mask], g[mask], keep, notes


def _summary(label: str, v: np.ndarray) -> GroupSummary:
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return GroupSummary(label, int(len(v)), float(med), float(q1), float(q3))


def group_label(v) -> str:
    """How a group value is shown (1.0 → "1"); figures use it to match :class:`GroupSummary` names."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _gene_map(frame: pd.DataFrame, what: str) -> dict[str, object]:
    keys = [str(c).strip().upper() for c in frame.columns]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise AnalysisError(f"The {what} matrix has genes that differ only in case or spacing: "
                            f"{', '.join(dup[:5])}; keep one column per gene.")
    return dict(zip(keys, frame.columns))


def _num(v) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None
