"""Kaplan–Meier analyses for any grouping of patients, with R-compatible numbers.

``split_groups`` turns a continuous value (a predicted gene, a signature, age…) into ordered
groups: median, tertiles, quartiles, a custom cut or the maximally selected log-rank cut (R
``maxstat``, Lausen–Schumacher 1992 p-value). ``kaplan_meier`` compares any per-patient groups:
product-limit curves with Greenwood 95 % bands (R's ``log`` or ``log-log`` type), medians with
R's confidence limits, the k-group log-rank test (R ``survdiff``), Cox hazard ratios against a
reference group (Efron ties, lifelines) and a number-at-risk table. Times come in days; ``unit``
only rescales what is reported. Figures live in ``core.analysis.km_plots``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from core.errors import AnalysisError

UNITS = {"days": 1.0, "months": 30.4375, "years": 365.25}
CI_TYPES = ("log", "log-log")
SPLITS = ("median", "tertile", "quartile", "optimal")
_Z = float(stats.norm.ppf(0.975))
_TOL = math.sqrt(np.finfo(float).eps)   # R's tolerance for "survival equals 0.5"
# Round steps for the number-at-risk times, per unit (× powers of ten for days and years).
_STEPS = {"days": (1, 2, 2.5, 5), "months": (1, 2, 3, 6, 12, 24, 36, 60, 120), "years": (1, 2, 2.5, 5)}


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """Per-patient groups from a continuous value.

    ``labels`` is an ordered categorical aligned with the input values (missing where the value
    is). ``cutpoints`` are the values ``c`` of the rules ``x ≤ c`` / ``x > c``. For
    ``method == "optimal"``: ``statistic`` is the maximal standardised log-rank statistic,
    ``p_value`` its Lausen–Schumacher (1992) corrected p, and ``profile`` the statistic at every
    candidate cut (columns ``cut``, ``n_low``, ``statistic``).
    """

    labels: pd.Series
    cutpoints: tuple[float, ...]
    method: str
    statistic: float | None = None
    p_value: float | None = None
    minprop: float | None = None
    maxprop: float | None = None
    profile: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.labels.cat.categories)

    def to_json(self) -> dict:
        out = {"method": self.method, "cutpoints": [_num(c) for c in self.cutpoints],
               "groups": list(self.categories)}
        if self.method == "optimal":
            out.update(statistic=_num(self.statistic), p=_num(self.p_value), p_method="Lau92",
                       minprop=self.minprop, maxprop=self.maxprop)
        return out


def split_groups(values: pd.Series, split: str | float, *, time=None, event=None,
                 minprop: float = 0.1, maxprop: float = 0.9) -> Split:
    """Group patients by a continuous value.

    ``split``: ``"median"`` (low ≤ median < high), ``"tertile"`` (low/mid/high at the 1/3 and 2/3
    quantiles), ``"quartile"`` (Q1..Q4), a number ``v`` (low ≤ v < high) or ``"optimal"``: the cut
    ``x ≤ c`` maximising the standardised log-rank statistic (R ``maxstat.test(smethod="LogRank")``)
    among observed values leaving between ``minprop`` and ``maxprop`` of the patients in the low
    group; needs ``time`` (days) and ``event`` (0/1) aligned with ``values``. Quantiles are R's
    default (type 7). Every group includes its upper cut: mid = (a, b].
    """
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    name = s.name if s.name is not None else "the variable"
    x = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    x[~np.isfinite(x)] = np.nan
    finite = np.isfinite(x)
    if finite.sum() < 2:
        raise AnalysisError(f"{name}: only {int(finite.sum())} patients have a value; a split needs at least 2.")
    xf = x[finite]
    stat = p = mp = xp = None
    profile = None
    if isinstance(split, str):
        method = split.strip().lower()
        if method == "median":
            cuts = (float(np.median(xf)),)
        elif method == "tertile":
            cuts = tuple(float(q) for q in np.quantile(xf, [1 / 3, 2 / 3]))
        elif method == "quartile":
            cuts = tuple(float(q) for q in np.quantile(xf, [0.25, 0.5, 0.75]))
        elif method == "optimal":
            cut, stat, p, profile = _maxstat(x, time, event, minprop=minprop, maxprop=maxprop, name=name)
            cuts, mp, xp = (cut,), float(minprop), float(maxprop)
        else:
            raise AnalysisError(f"Unknown split {split!r}; use median, tertile, quartile, optimal or a number.")
    elif isinstance(split, (int, float, np.integer, np.floating)) and not isinstance(split, bool):
        if not np.isfinite(split):
            raise AnalysisError(f"The custom cut must be a finite number, got {split}.")
        method, cuts = "custom", (float(split),)
        if not (xf.min() <= split < xf.max()):
            raise AnalysisError(f"A cut at {split:g} leaves one group empty: {name} ranges from "
                                f"{xf.min():g} to {xf.max():g} (low is ≤ cut, high is > cut).")
    else:
        raise AnalysisError(f"Unknown split {split!r}; use median, tertile, quartile, optimal or a number.")

    names = _group_names(method, cuts)
    code = np.searchsorted(np.asarray(cuts), xf, side="left")   # c[i-1] < x ≤ c[i]  →  i
    counts = np.bincount(code, minlength=len(names))
    if (counts > 0).sum() < 2:
        raise AnalysisError(f"A {method} split of {name} leaves a single non-empty group "
                            f"({', '.join(f'{n}: {c}' for n, c in zip(names, counts))}): the values barely "
                            "vary; choose a custom cut or another variable.")
    codes = np.full(len(x), -1)
    codes[finite] = code
    labels = pd.Series(pd.Categorical.from_codes(codes, categories=names, ordered=True), index=s.index,
                       name=s.name)
    return Split(labels=labels, cutpoints=cuts, method=method, statistic=stat, p_value=p,
                 minprop=mp, maxprop=xp, profile=profile)


def logrank_scores(time, event) -> np.ndarray:
    """Log-rank scores of Hothorn & Lausen (2003), as ``maxstat`` uses for ``smethod="LogRank"``.

    a_i = δ_i − Σ_{j: γ(j) ≤ γ(i)} δ_j / (N − γ(j) + 1), with γ(i) = #{k: t_k ≤ t_i}.
    """
    t = np.asarray(time, dtype=float)
    e = np.asarray(event, dtype=float)
    n = len(t)
    gamma = stats.rankdata(t, method="max").astype(int)       # γ(i)
    order = np.argsort(t, kind="stable")
    cum = np.cumsum((e / (n - gamma + 1))[order])            # sums over the first γ observations
    return e - cum[gamma - 1]


def lausen92_p(b: float, minprop: float = 0.1, maxprop: float = 0.9) -> float:
    """P(max |standardised statistic| ≥ b) by Lausen & Schumacher (1992), after Miller & Siegmund.

    p ≈ 4 φ(b)/b + φ(b) (b − 1/b) log(ε₂(1 − ε₁) / ((1 − ε₂) ε₁)), clipped to [0, 1]. The
    approximation is for large b: below b = 1 it turns down again (0.50 at b = 0.5), so 1 is
    returned there (the maximum of many standardised statistics is then unremarkable).
    """
    if not np.isfinite(b) or b < 1:
        return 1.0
    phi = stats.norm.pdf(b)
    p = 4 * phi / b + phi * (b - 1 / b) * math.log(maxprop * (1 - minprop) / ((1 - maxprop) * minprop))
    return float(min(1.0, max(0.0, p)))


def _maxstat(x, time, event, *, minprop, maxprop, name):
    if time is None or event is None:
        raise AnalysisError("The optimal cut needs the survival time and event of each patient.")
    if not 0 < minprop < maxprop < 1:
        raise AnalysisError(f"minprop and maxprop must satisfy 0 < minprop < maxprop < 1 (got {minprop}, {maxprop}).")
    t, e = _as_float(time, "time"), _as_float(event, "event")
    if not len(t) == len(e) == len(x):
        raise AnalysisError(f"values ({len(x)}), time ({len(t)}) and event ({len(e)}) differ in length.")
    ok = np.isfinite(x) & np.isfinite(t) & np.isfinite(e)
    x, t, e = x[ok], t[ok], e[ok]
    _check_event(e)
    n = len(x)
    if n < 4 or e.sum() < 1:
        raise AnalysisError(f"{name}: {n} patients with {int(e.sum())} events; the optimal cut needs "
                            "at least 4 patients and 1 event.")
    a = logrank_scores(t, e)
    order = np.argsort(x, kind="stable")
    xs, cum = x[order], np.cumsum(a[order])
    m = np.arange(1, n + 1)
    last = np.r_[xs[1:] != xs[:-1], False]                    # end of a block of tied values
    cand = last & (m >= minprop * n - 1e-9) & (m <= maxprop * n + 1e-9)
    if not cand.any():
        raise AnalysisError(f"{name}: no cut leaves between {minprop:.0%} and {maxprop:.0%} of the {n} "
                            "patients in the low group (too few distinct values); use a median or custom cut.")
    mean = m / n * a.sum()
    var = m * (n - m) / (n ** 2 * (n - 1)) * (n * (a ** 2).sum() - a.sum() ** 2)
    if not np.all(var[cand] > 0):
        raise AnalysisError(f"{name}: the log-rank scores do not vary (no usable events); no optimal cut.")
    z = np.abs(cum[cand] - mean[cand]) / np.sqrt(var[cand])
    best = int(np.argmax(z))
    b = float(z[best])
    profile = pd.DataFrame({"cut": xs[cand], "n_low": m[cand], "statistic": z})
    return float(xs[cand][best]), b, lausen92_p(b, minprop, maxprop), profile


def _group_names(method: str, cuts: tuple[float, ...]) -> list[str]:
    c = _fmt_distinct(cuts)
    if method == "tertile":
        return [f"low (≤ {c[0]})", f"mid ({c[0]}–{c[1]})", f"high (> {c[1]})"]
    if method == "quartile":
        return [f"Q1 (≤ {c[0]})", f"Q2 ({c[0]}–{c[1]})", f"Q3 ({c[1]}–{c[2]})", f"Q4 (> {c[2]})"]
    return [f"low (≤ {c[0]})", f"high (> {c[0]})"]


def _fmt_distinct(cuts) -> list[str]:
    """Cut values with 3 significant digits, more when that would make distinct cuts look equal."""
    for sig in range(3, 12):
        out = [_fmt(v, sig) for v in cuts]
        if len(set(out)) == len(set(cuts)):
            return out
    return [repr(float(v)) for v in cuts]


def _fmt(v: float, sig: int) -> str:
    if v == 0 or (float(v).is_integer() and abs(v) < 1e6):
        return str(int(v))
    if not 1e-3 <= abs(v) < 1e6:
        return f"{v:.{sig - 1}e}"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    s = f"{v:.{decimals}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


# --------------------------------------------------------------------------- Kaplan–Meier
@dataclass(frozen=True)
class KMGroup:
    """One group: its product-limit curve (times in the analysis unit) and comparisons.

    ``timeline`` starts at 0 (survival 1) and lists every observed time (``n_at_risk`` just
    before each); ``ci_lower``/``ci_upper`` are NaN where survival is 0 (R: NA) and 1 where it
    is 1. ``median``/``median_ci`` are NaN when not reached. ``hr`` is against the reference group
    (1 for the reference itself, NaN where undefined, e.g. a group without events). ``at_risk``
    counts patients still followed at each of the analysis' ``risk_times``.
    """

    label: str
    n: int
    events: int
    timeline: np.ndarray
    survival: np.ndarray
    ci_lower: np.ndarray
    ci_upper: np.ndarray
    n_at_risk: np.ndarray
    censor_times: np.ndarray
    censor_survival: np.ndarray
    median: float
    median_ci: tuple[float, float]
    hr: float
    hr_ci: tuple[float, float]
    hr_p: float
    at_risk: np.ndarray
    is_reference: bool = False

    def survival_at(self, times) -> np.ndarray:
        """S(t) at times in the analysis unit (right-continuous); NaN beyond the last follow-up."""
        t = np.atleast_1d(np.asarray(times, dtype=float))
        idx = np.searchsorted(self.timeline, t, side="right") - 1
        out = self.survival[np.clip(idx, 0, None)].astype(float)
        out[(t > self.timeline[-1]) | (t < 0)] = np.nan
        return out


@dataclass(frozen=True)
class KMAnalysis:
    """Kaplan–Meier curves of k ≥ 2 groups, the k-group log-rank test and Cox HRs vs a reference.

    ``n``/``events`` count the patients analysed (``n_excluded`` had a missing time, event or
    group). Times (curves, medians, ``risk_times``) are in ``unit``; ``horizon_days`` is the
    administrative censoring applied first (None: none). ``ci`` is the band type: ``log-log``
    (the default, as lifelines and Stata: it stays inside [0, 1] and covers better in the tails)
    or ``log`` (R ``survfit``'s default); both also give the median's confidence limits.
    """

    groups: tuple[KMGroup, ...]
    n: int
    events: int
    logrank_stat: float
    logrank_df: int
    logrank_p: float
    unit: str
    ci: str
    risk_times: np.ndarray
    reference: str
    horizon_days: float | None = None
    endpoint: str = ""
    variable: str = ""
    split: Split | None = None
    n_excluded: int = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(g.label for g in self.groups)

    def group(self, label: str) -> KMGroup:
        for g in self.groups:
            if g.label == label:
                return g
        raise AnalysisError(f"No group {label!r}; the groups are {', '.join(self.labels)}.")

    def risk_table(self) -> pd.DataFrame:
        """Number at risk: one row per group, one column per risk time (in ``unit``)."""
        return pd.DataFrame([g.at_risk for g in self.groups], index=list(self.labels),
                            columns=[_num(t) for t in self.risk_times])

    def to_json(self) -> dict:
        """A strictly JSON-serialisable summary (NaN and infinities become null)."""
        return {
            "endpoint": self.endpoint, "variable": self.variable, "n": self.n, "events": self.events,
            "logrank_p": _num(self.logrank_p), "logrank_stat": _num(self.logrank_stat), "df": self.logrank_df,
            "groups": [{"label": g.label, "n": g.n, "events": g.events, "median": _num(g.median),
                        "hr": _num(g.hr), "hr_ci": [_num(v) for v in g.hr_ci],
                        "median_ci": [_num(v) for v in g.median_ci], "hr_p": _num(g.hr_p),
                        "reference": g.is_reference} for g in self.groups],
            "unit": self.unit, "ci": self.ci, "reference": self.reference,
            "horizon_days": _num(self.horizon_days), "n_excluded": self.n_excluded,
            "risk_table": {"times": [_num(t) for t in self.risk_times],
                           "at_risk": {g.label: [int(v) for v in g.at_risk] for g in self.groups}},
            "split": self.split.to_json() if self.split is not None else None,
        }


def kaplan_meier(time, event, groups, *, reference: str | None = None, horizon_days: float | None = None,
                 unit: str = "days", risk_times=None, ci: str = "log-log", endpoint: str = "",
                 variable: str = "", split: Split | None = None) -> KMAnalysis:
    """Kaplan–Meier comparison of per-patient groups.

    ``time`` in days, ``event`` 0/1 (1 = event), ``groups`` a label per patient (a categorical
    keeps its category order; other labels are sorted) or a ``Split``; all aligned by position.
    Patients missing any of the three are left out; empty groups are dropped. ``reference``
    (default: the first group) is the baseline of the hazard ratios. ``risk_times`` are in
    ``unit`` (default: about 6 round times over the follow-up).
    """
    if isinstance(groups, Split):
        split = groups if split is None else split
        groups = groups.labels
    if unit not in UNITS:
        raise AnalysisError(f"Unknown time unit {unit!r}; use one of {', '.join(UNITS)}.")
    if ci not in CI_TYPES:
        raise AnalysisError(f"Unknown confidence interval type {ci!r}; use 'log-log' or 'log'.")
    t, e = _as_float(time, "time"), _as_float(event, "event")
    g = pd.Series(groups).reset_index(drop=True) if not isinstance(groups, pd.Series) else groups.reset_index(drop=True)
    if not len(t) == len(e) == len(g):
        raise AnalysisError(f"time ({len(t)}), event ({len(e)}) and groups ({len(g)}) differ in length.")
    ok = np.isfinite(t) & np.isfinite(e) & g.notna().to_numpy()
    n_excluded = int((~ok).sum())
    t, e, g = t[ok], e[ok], g[ok]
    _check_event(e)
    if (t < 0).any():
        raise AnalysisError(f"{int((t < 0).sum())} patients have a negative survival time; fix the clinical table.")
    if horizon_days is not None:
        if not np.isfinite(horizon_days) or horizon_days <= 0:
            raise AnalysisError(f"The horizon must be a positive number of days, got {horizon_days}.")
        e = np.where(t > horizon_days, 0.0, e)
        t = np.minimum(t, horizon_days)

    labels, codes = _encode(g)
    k = len(labels)
    n_per = np.bincount(codes, minlength=k)
    ev_per = np.bincount(codes, weights=e, minlength=k).astype(int)
    counts = ", ".join(f"{lab}: {nn} patients/{ee} events" for lab, nn, ee in zip(labels, n_per, ev_per))
    if k < 2:
        raise AnalysisError(f"A Kaplan–Meier comparison needs at least 2 groups with patients; got {k}"
                            f"{' (' + counts + ')' if k else ''}.")
    if e.sum() < 3:
        raise AnalysisError(f"Only {int(e.sum())} events among {len(t)} patients ({counts}); "
                            "a survival comparison needs at least 3.")
    if reference is None:
        ref = 0
    elif str(reference) in labels:
        ref = labels.index(str(reference))
    else:
        raise AnalysisError(f"Reference group {reference!r} is not among the groups ({', '.join(labels)}).")

    f = UNITS[unit]
    if risk_times is None:
        rt = _round_times(float(t.max()) / f, unit)
    else:
        rt = np.unique(np.asarray(risk_times, dtype=float))
        if not np.all(np.isfinite(rt)) or (rt < 0).any() or not len(rt):
            raise AnalysisError("risk_times must be non-negative finite numbers (in the analysis unit).")

    chi2, df = _logrank(t, e, codes, k)
    hrs = _cox_hrs(t, e, codes, k, ref)
    out = []
    for i, lab in enumerate(labels):
        ti, ei = t[codes == i], e[codes == i]
        km = _product_limit(ti, ei)
        lo, hi = _band(km["surv"], km["se"], ci)
        med = _r_median(km["time"], km["surv"])
        med_ci = (_r_median(km["time"], lo), _r_median(km["time"], hi))
        cens = km["n_censor"] > 0
        hr, hr_lo, hr_hi, hr_p = hrs[i]
        out.append(KMGroup(
            label=lab, n=int(len(ti)), events=int(ei.sum()), timeline=km["time"] / f, survival=km["surv"],
            ci_lower=lo, ci_upper=hi, n_at_risk=km["n_risk"], censor_times=km["time"][cens] / f,
            censor_survival=km["surv"][cens], median=med / f, median_ci=(med_ci[0] / f, med_ci[1] / f),
            hr=hr, hr_ci=(hr_lo, hr_hi), hr_p=hr_p,
            at_risk=np.array([(ti >= r * f - 1e-9).sum() for r in rt], dtype=int), is_reference=i == ref))
    return KMAnalysis(groups=tuple(out), n=int(len(t)), events=int(e.sum()), logrank_stat=chi2, logrank_df=df,
                      logrank_p=float(stats.chi2.sf(chi2, df)) if df > 0 else float("nan"), unit=unit, ci=ci,
                      risk_times=rt, reference=labels[ref],
                      horizon_days=None if horizon_days is None else float(horizon_days),
                      endpoint=endpoint, variable=variable, split=split, n_excluded=n_excluded)


# --------------------------------------------------------------------------- the statistics
def _product_limit(t: np.ndarray, e: np.ndarray) -> dict[str, np.ndarray]:
    """Product-limit estimate at 0 and every observed time, with Greenwood's se of log S."""
    ut, inv = np.unique(t, return_inverse=True)
    d = np.bincount(inv, weights=e, minlength=len(ut))
    c = np.bincount(inv, minlength=len(ut)) - d
    n_risk = len(t) - np.r_[0, np.cumsum(d + c)[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        surv = np.cumprod(1 - d / n_risk)
        var = np.cumsum(np.where(d > 0, d / (n_risk * (n_risk - d)), 0.0))
    return {"time": np.r_[0.0, ut], "surv": np.r_[1.0, surv], "se": np.sqrt(np.r_[0.0, var]),
            "n_risk": np.r_[len(t), n_risk].astype(int), "n_event": np.r_[0, d].astype(int),
            "n_censor": np.r_[0, c].astype(int)}


def _band(surv: np.ndarray, se: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise 95 % limits as R ``survfit(conf.type=...)``; NaN where S = 0 (R: NA)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "log":
            lo, hi = surv * np.exp(-_Z * se), np.minimum(1.0, surv * np.exp(_Z * se))
        else:
            ls = np.log(surv)
            lo = np.exp(-np.exp(np.log(-ls) - _Z * se / ls))     # se / log S < 0: this is the lower
            hi = np.exp(-np.exp(np.log(-ls) + _Z * se / ls))
            lo, hi = np.where(surv == 1, 1.0, lo), np.where(surv == 1, 1.0, hi)
    zero = surv <= 0
    return np.where(zero, np.nan, lo), np.where(zero, np.nan, hi)


def _r_median(times: np.ndarray, y: np.ndarray) -> float:
    """First time the curve is at or below 0.5; where it sits exactly at 0.5, the midpoint to the
    next drop (R ``survival``'s rule, used for the median and its confidence limits)."""
    keep = ~np.isnan(y) & (y < 0.5 + _TOL)
    if not keep.any():
        return float("nan")
    x, yy = times[keep], y[keep]
    below = yy < yy[0]
    if abs(yy[0] - 0.5) < _TOL and below.any():
        return float((x[0] + x[np.argmax(below)]) / 2)
    return float(x[0])


def _logrank(time, event, codes, k: int) -> tuple[float, int]:
    """k-group log-rank chi-square and its df, as R ``survdiff`` (groups with 0 expected are left out)."""
    t, e, codes = np.asarray(time, float), np.asarray(event, float), np.asarray(codes, int)
    et = np.unique(t[e > 0])
    if not len(et):
        return 0.0, 0
    risk = np.empty((k, len(et)))
    dead = np.empty((k, len(et)))
    for j in range(k):
        tj, ej = np.sort(t[codes == j]), t[(codes == j) & (e > 0)]
        risk[j] = len(tj) - np.searchsorted(tj, et, side="left")
        dead[j] = np.bincount(np.searchsorted(et, ej), minlength=len(et))
    n, d = risk.sum(0), dead.sum(0)
    expected = (d * risk / n).sum(1)
    observed = dead.sum(1)
    w = np.where(n > 1, d * (n - d) / np.maximum(n - 1, 1), 0.0) / n
    frac = risk / n
    var = (np.diag((w * risk).sum(1)) - (w * frac) @ risk.T)    # V_gh = Σ w n_g (δ_gh − n_h/n)
    use = np.flatnonzero(expected > 0)
    if len(use) < 2:
        return 0.0, 0
    diff = (observed - expected)[use][1:]
    v = var[np.ix_(use, use)][1:, 1:]
    chi2 = float(diff @ np.linalg.lstsq(v, diff, rcond=None)[0])
    return chi2, int(len(use) - 1)


def _cox_hrs(t, e, codes, k, ref) -> list[tuple[float, float, float, float]]:
    """(HR, lower, upper, Wald p) per group vs ``ref`` from one Cox model with dummy coding.

    A group without events has HR → 0 (no finite estimate): it is reported as NaN and left out of
    the fit, which is the limit of the full model for the other groups. No events in the reference
    leaves every HR undefined.
    """
    from lifelines import CoxPHFitter

    out = [(float("nan"),) * 4 for _ in range(k)]
    out[ref] = (1.0, float("nan"), float("nan"), float("nan"))
    ev = np.bincount(codes, weights=e, minlength=k)
    fit_groups = [j for j in range(k) if j != ref and ev[j] > 0]
    if ev[ref] == 0 or not fit_groups:
        return out
    keep = np.isin(codes, [ref] + fit_groups)
    df = pd.DataFrame({f"g{j}": (codes[keep] == j).astype(float) for j in fit_groups})
    df["time"], df["event"] = t[keep], e[keep]
    s = None
    # a small group whose events all come first (complete separation) has an infinite HR and stops
    # lifelines' default Newton steps; shorter steps converge for the other groups, as R's coxph does
    for options in (None, {"step_size": 0.2, "max_steps": 500}):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = CoxPHFitter().fit(df, duration_col="time", event_col="event", fit_options=options).summary
            break
        except Exception:   # lifelines' ConvergenceError and linear-algebra failures
            continue
    if s is None:
        return out
    for j in fit_groups:
        r = s.loc[f"g{j}"]
        if abs(float(r["coef"])) > 10:   # HR beyond e^10: not estimable (separation), reported as undefined
            continue
        out[j] = (float(r["exp(coef)"]), float(r["exp(coef) lower 95%"]), float(r["exp(coef) upper 95%"]),
                  float(r["p"]))
    return out


# --------------------------------------------------------------------------- helpers
def _as_float(v, what: str) -> np.ndarray:
    try:
        return pd.to_numeric(pd.Series(np.asarray(v)), errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as exc:
        raise AnalysisError(f"{what} must be numeric: {exc}") from None


def _check_event(e: np.ndarray) -> None:
    bad = np.setdiff1d(np.unique(e), [0.0, 1.0])
    if len(bad):
        raise AnalysisError(f"event must be 0 (censored) or 1 (event); found {', '.join(f'{b:g}' for b in bad[:5])}. "
                            "R-style status (1 = censored, 2 = dead) must be recoded as status == 2.")


def _encode(g: pd.Series) -> tuple[list[str], np.ndarray]:
    """Group labels (as text, in category or sorted order, empty ones dropped) and codes."""
    if isinstance(g.dtype, pd.CategoricalDtype):
        present = [c for c in g.cat.categories if (g == c).any()]
        raw = g.astype(object)
    else:
        raw = g.astype(object)
        uniq = pd.unique(raw)
        try:
            present = sorted(uniq)
        except TypeError:
            present = sorted(uniq, key=str)
    text = [_label(c) for c in present]
    if len(set(text)) < len(text):
        raise AnalysisError(f"Group labels collide once written as text: {text}.")
    lookup = {c: i for i, c in enumerate(present)}
    codes = np.array([lookup[v] for v in raw], dtype=int)
    return text, codes


def _label(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _round_times(tmax: float, unit: str, target: int = 6) -> np.ndarray:
    """About ``target`` round times from 0 to ≤ tmax (months step by 3, 6, 12…)."""
    if not tmax > 0:
        return np.array([0.0])
    raw = tmax / (target - 1)
    if unit == "months" and raw <= 120:
        steps = [float(s) for s in _STEPS["months"]]
    else:
        mag = 10.0 ** math.floor(math.log10(raw))
        steps = [s * mag for s in _STEPS[unit]] + [10 * mag]
    step = min(steps, key=lambda s: (abs(math.floor(tmax / s + 1e-9) + 1 - target), -s))
    return np.arange(0, math.floor(tmax / step + 1e-9) + 1) * step


def _num(v) -> float | None:
    """A JSON number, or None for missing, NaN or infinite."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
