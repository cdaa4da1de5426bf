"""Cox proportional-hazards statistics in numpy: a vectorised univariate screen, BH q-values, and
R's ``cox.zph`` proportional-hazards test.

The screen fits one univariate Cox model per column of a matrix, all columns at once: the rows are
sorted by time once, each column's missing values become zero weights, and a batched
Newton–Raphson runs on the scalar score and information of every column. Ties use Efron's
approximation exactly (per column, because the number of tied deaths depends on which rows a
column has), or Breslow's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from core.errors import AnalysisError

Z95 = 1.959964
MAX_COEF = 30.0   # per SD; beyond it a univariate fit is taken to diverge (separation)
TIES = ("efron", "breslow")
PH_TRANSFORMS = ("km", "rank")
SCREEN_COLUMNS = ["variable", "n", "events", "hr", "ci_lower", "ci_upper", "p", "c_index"]
PH_COLUMNS = ["term", "chisq", "df", "p"]


# ---------------------------------------------------------------------------------------------
# Risk sets: rows sorted by time once


@dataclass(frozen=True)
class _RiskSets:
    """Rows sorted by time, latest first; at a tied time, censored rows come before deaths.

    Row ``r`` of the sorted order is at risk at the time of every tie group ``g`` with
    ``r <= group_end[g]``. Deaths (``ev_rows``) are contiguous within each death group.
    """

    order: np.ndarray       # original index of each sorted row
    time: np.ndarray        # sorted times
    event: np.ndarray       # sorted events (bool)
    group_end: np.ndarray   # last sorted row of each tie group
    ev_rows: np.ndarray     # sorted rows that are deaths
    ev_group: np.ndarray    # for each death, its death group (0..n_death_groups-1)
    dg_start: np.ndarray    # first position (in ev_rows) of each death group
    dg_end_row: np.ndarray  # last sorted row of the tie group of each death group (its risk set)
    first_death: np.ndarray  # for each death, sorted row of the first death at its time


def _starts(v: np.ndarray) -> np.ndarray:
    """True where a run of equal values starts."""
    return np.r_[True, v[1:] != v[:-1]] if len(v) else np.zeros(0, bool)


def _risk_sets(time: np.ndarray, event: np.ndarray) -> _RiskSets:
    order = np.lexsort((event, -time))
    t, e = time[order], event[order].astype(bool)
    new = _starts(t)
    group = np.cumsum(new) - 1
    group_end = np.r_[np.flatnonzero(new)[1:] - 1, len(t) - 1][: new.sum()]
    ev_rows = np.flatnonzero(e)
    g_of_ev = group[ev_rows]
    new_dg = _starts(g_of_ev)
    ev_group = np.cumsum(new_dg) - 1
    dg_start = np.flatnonzero(new_dg)
    return _RiskSets(order=order, time=t, event=e, group_end=group_end, ev_rows=ev_rows,
                     ev_group=ev_group, dg_start=dg_start, dg_end_row=group_end[g_of_ev[dg_start]],
                     first_death=ev_rows[dg_start][ev_group])


def _efron_fraction(rs: _RiskSets, dead: np.ndarray, ties: str) -> np.ndarray:
    """k/d for each death (rows) and column: k = index of the death among the column's d tied deaths."""
    if ties == "breslow":
        return np.zeros(dead.shape)
    c = np.cumsum(dead, axis=0)
    before = (c[rs.dg_start] - dead[rs.dg_start])[rs.ev_group]
    d = (np.add.reduceat(dead, rs.dg_start, axis=0) if len(rs.dg_start) else dead[:0])[rs.ev_group]
    k = c - before - 1
    return np.where(dead, k / np.maximum(d, 1), 0.0)


# ---------------------------------------------------------------------------------------------
# Univariate screen


def _screen_pieces(beta: np.ndarray, z: np.ndarray, mask: np.ndarray, rs: _RiskSets,
                   frac: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log partial likelihood, score and information of every column at ``beta`` (shape p)."""
    eta = np.where(mask, z * beta, -np.inf)
    top = eta.max(axis=0)
    w = np.exp(eta - top)                      # 0 where masked
    wz = w * z
    s0 = np.cumsum(w, axis=0)[rs.dg_end_row]
    s1 = np.cumsum(wz, axis=0)[rs.dg_end_row]
    s2 = np.cumsum(wz * z, axis=0)[rs.dg_end_row]
    we, ze = w[rs.ev_rows], z[rs.ev_rows]
    if frac.any():
        d0 = np.add.reduceat(we, rs.dg_start, axis=0)
        d1 = np.add.reduceat(we * ze, rs.dg_start, axis=0)
        d2 = np.add.reduceat(we * ze * ze, rs.dg_start, axis=0)
        a0 = s0[rs.ev_group] - frac * d0[rs.ev_group]
        a1 = s1[rs.ev_group] - frac * d1[rs.ev_group]
        a2 = s2[rs.ev_group] - frac * d2[rs.ev_group]
    else:
        a0, a1, a2 = s0[rs.ev_group], s1[rs.ev_group], s2[rs.ev_group]
    m = mask[rs.ev_rows]
    a0 = np.where(m, a0, 1.0)
    mean = a1 / a0
    ll = np.where(m, eta[rs.ev_rows] - top - np.log(a0), 0.0).sum(axis=0)
    u = np.where(m, ze - mean, 0.0).sum(axis=0)
    info = np.where(m, a2 / a0 - mean * mean, 0.0).sum(axis=0)
    return ll, u, info


def _newton_screen(z, mask, rs, frac, max_iter: int, tol: float):
    """Batched Newton–Raphson from 0 with step halving; |coef| > MAX_COEF per SD counts as diverged."""
    p = z.shape[1]
    beta = np.zeros(p)
    with np.errstate(all="ignore"):
        ll, u, info = _screen_pieces(beta, z, mask, rs, frac)
        done = np.zeros(p, bool)
        failed = ~np.isfinite(ll) | ~(info > 0)
        done |= failed
        for _ in range(max_iter):
            step = np.where(done, 0.0, u / np.where(done, 1.0, info))
            new = beta + step
            ll_new, u_new, info_new = _screen_pieces(new, z, mask, rs, frac)
            for _half in range(30):            # step halving where the likelihood went down (or broke)
                worse = ~(ll_new >= ll - 1e-12 * np.abs(ll))
                if not worse.any():
                    break
                new = np.where(worse, (beta + new) / 2, new)
                ll_new, u_new, info_new = _screen_pieces(new, z, mask, rs, frac)
            bad = ~np.isfinite(ll_new) | ~(info_new > 0) | (np.abs(new) > MAX_COEF)
            failed |= bad
            new, ll_new = np.where(bad, beta, new), np.where(bad, ll, ll_new)
            u_new, info_new = np.where(bad, u, u_new), np.where(bad, info, info_new)
            done |= bad | (np.abs(new - beta) <= tol * np.maximum(1.0, np.abs(new)))
            beta, ll, u, info = new, ll_new, u_new, info_new
            if done.all():
                break
    return beta, info, done & ~failed


def _dense_ranks(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    filled = np.where(mask, z, np.inf)
    order = np.argsort(filled, axis=0, kind="stable")
    srt = np.take_along_axis(filled, order, axis=0)
    dense = np.vstack([np.zeros((1, z.shape[1]), np.int64), np.cumsum(srt[1:] != srt[:-1], axis=0)])
    ranks = np.empty_like(dense)
    np.put_along_axis(ranks, order, dense, axis=0)
    return ranks


def _harrell_c(z: np.ndarray, mask: np.ndarray, rs: _RiskSets, block: int = 0) -> np.ndarray:
    """Harrell's C of each column of ``z`` as a risk score (higher = shorter time), columns at once.

    A pair is comparable when the earlier time is a death; a row censored at a death's time counts as
    outliving it; two deaths at the same time are not comparable; ties in the score count 1/2
    (lifelines ``concordance_index`` and R ``concordance`` conventions). Rows are processed in
    blocks: counts against earlier blocks come from a per-column rank histogram, counts within a
    block by direct comparison.
    """
    n, p = z.shape
    ranks = _dense_ranks(z, mask)
    block = block or max(16, int(np.sqrt(n)))
    hist = np.zeros((n + 1, p))
    cols = np.arange(p)
    conc, tied, pairs = np.zeros(p), np.zeros(p), np.zeros(p)
    q = rs.first_death                      # a death is compared with sorted rows before q
    mask_f = mask.astype(float)
    for s in range(0, n, block):
        e = min(s + block, n)
        lo, hi = np.searchsorted(q, [s, e])
        if hi > lo:
            rows = rs.ev_rows[lo:hi]
            rq, zq, mq = ranks[rows], z[rows], mask_f[rows]
            cum = np.vstack([np.zeros((1, p)), np.cumsum(hist, axis=0)])
            less = np.take_along_axis(cum, rq, axis=0)
            eq = np.take_along_axis(cum, rq + 1, axis=0) - less
            before = np.arange(s, e)[None, :] < q[lo:hi, None]            # (queries, block rows)
            mb = (before[:, :, None] & mask[None, s:e, :])
            zb = z[None, s:e, :]
            less = less + (mb & (zb < zq[:, None, :])).sum(axis=1)
            eq = eq + (mb & (zb == zq[:, None, :])).sum(axis=1)
            conc += (mq * less).sum(axis=0)
            tied += (mq * eq).sum(axis=0)
            pairs += (mq * (cum[-1] + mb.sum(axis=1))).sum(axis=0)
        np.add.at(hist, (ranks[s:e], np.broadcast_to(cols, (e - s, p))), mask_f[s:e])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (conc + 0.5 * tied) / pairs


def _as_survival(time, event) -> tuple[np.ndarray, np.ndarray]:
    time = np.asarray(time, dtype=float).ravel()
    event = np.asarray(event, dtype=float).ravel()
    if time.shape != event.shape:
        raise AnalysisError(f"time has {time.size} values but event has {event.size}; give one of each per patient.")
    ok = np.isfinite(event)
    if not np.isin(event[ok], (0.0, 1.0)).all():
        raise AnalysisError("event must be coded 0 (censored) / 1 (event); recode it first "
                            "(R-style 1/2 status: use status == 2).")
    if (time[np.isfinite(time)] < 0).any():
        raise AnalysisError("Survival times must be ≥ 0; check the time column (days since diagnosis).")
    return time, event


def cox_screen(time, event, X, names: Sequence[str], *, ties: str = "efron", max_iter: int = 50,
               tol: float = 1e-9) -> pd.DataFrame:
    """Univariate Cox model of every column of ``X`` (n × p), HR per SD, all columns at once.

    Each variable uses its own complete cases (finite time, event and value), z-scored over them with
    ddof = 1, so ``hr`` is the hazard ratio per SD. ``p`` is the Wald test of coef / se; the CI is
    exp(coef ± 1.959964·se). ``c_index`` is Harrell's C of the fitted risk score coef·x (higher risk ↔
    shorter time; ties in the score count 1/2; censored-at-a-death's-time rows outlive it; tied deaths
    not comparable — the lifelines ``concordance_index`` / R ``concordance`` convention).
    Columns that are constant, have < 2 events, or whose fit does not converge (e.g. a perfect
    separation, where the coefficient diverges) get NaN statistics. Row order = column order of X.
    """
    if ties not in TIES:
        raise AnalysisError(f"Unknown ties method {ties!r}; use one of {', '.join(TIES)}.")
    time, event = _as_survival(time, event)
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] != time.size:
        raise AnalysisError(f"X must be patients × variables with {time.size} rows; got shape {X.shape}.")
    names = [str(v) for v in names]
    if len(names) != X.shape[1]:
        raise AnalysisError(f"{len(names)} names for {X.shape[1]} columns of X; give one name per column.")
    keep = np.isfinite(time) & np.isfinite(event)
    rs = _risk_sets(time[keep], event[keep])
    x = X[keep][rs.order]
    mask = np.isfinite(x)
    n = mask.sum(axis=0)
    events = (mask & rs.event[:, None]).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.where(mask, x, 0.0)
        mean = xm.sum(axis=0) / n
        sd = np.sqrt(np.where(mask, (xm - mean) ** 2, 0.0).sum(axis=0) / (n - 1))
        valid = (n >= 2) & (events >= 2) & np.isfinite(sd) & (sd > 1e-12 * np.maximum(1.0, np.abs(mean)))
    out = {k: np.full(X.shape[1], np.nan) for k in ("hr", "ci_lower", "ci_upper", "p", "c_index")}
    if valid.any() and len(rs.ev_rows):
        cols = np.flatnonzero(valid)
        m = mask[:, cols]
        z = np.where(m, (xm[:, cols] - mean[cols]) / sd[cols], 0.0)
        frac = _efron_fraction(rs, m[rs.ev_rows], ties)
        beta, info, done = _newton_screen(z, m, rs, frac, max_iter, tol)
        ok = done & (info > 0) & np.isfinite(beta)
        se = np.where(ok, 1 / np.sqrt(np.where(ok, info, 1.0)), np.nan)
        beta = np.where(ok, beta, np.nan)
        c = _harrell_c(z, m, rs)
        out["hr"][cols] = np.exp(beta)
        out["ci_lower"][cols] = np.exp(beta - Z95 * se)
        out["ci_upper"][cols] = np.exp(beta + Z95 * se)
        out["p"][cols] = 2 * stats.norm.sf(np.abs(beta / se))
        out["c_index"][cols] = np.where(~ok, np.nan, np.where(beta >= 0, c, 1 - c))
    return pd.DataFrame({"variable": names, "n": n.astype(int), "events": events.astype(int), **out},
                        columns=SCREEN_COLUMNS)


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini–Hochberg q-values; NaN p-values stay NaN and are left out of the count m."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise AnalysisError("p-values must lie in [0, 1]; check what was passed to benjamini_hochberg.")
    m = int(ok.sum())
    if m:
        order = np.argsort(p[ok], kind="stable")
        ranked = p[ok][order] * m / np.arange(1, m + 1)
        adj = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
        vals = np.empty(m)
        vals[order] = adj
        q[ok] = vals
    return q


# ---------------------------------------------------------------------------------------------
# Multivariable fit and the proportional-hazards test


@dataclass(frozen=True)
class _CoxFit:
    """A multivariable Cox fit (sorted rows) with per-death weighted means and variances at beta."""

    coef: np.ndarray
    var: np.ndarray
    loglik: float
    rs: _RiskSets
    xbar: np.ndarray   # (deaths, p) risk-set mean of x at each death (Efron-weighted)
    v: np.ndarray      # (deaths, p, p) risk-set variance of x at each death
    x_dead: np.ndarray  # (deaths, p)


def _multi_pieces(beta, x, rs, frac):
    eta = x @ beta
    top = eta.max()
    w = np.exp(eta - top)
    wx = w[:, None] * x
    wxx = wx[:, :, None] * x[:, None, :]
    s0 = np.cumsum(w)[rs.dg_end_row]
    s1 = np.cumsum(wx, axis=0)[rs.dg_end_row]
    s2 = np.cumsum(wxx, axis=0)[rs.dg_end_row]
    ev, g = rs.ev_rows, rs.ev_group
    d0 = np.add.reduceat(w[ev], rs.dg_start)
    d1 = np.add.reduceat(wx[ev], rs.dg_start, axis=0)
    d2 = np.add.reduceat(wxx[ev], rs.dg_start, axis=0)
    a0 = s0[g] - frac * d0[g]
    xbar = (s1[g] - frac[:, None] * d1[g]) / a0[:, None]
    v = (s2[g] - frac[:, None, None] * d2[g]) / a0[:, None, None] - xbar[:, :, None] * xbar[:, None, :]
    ll = float(np.sum(eta[ev] - top - np.log(a0)))
    return ll, (x[ev] - xbar).sum(axis=0), v.sum(axis=0), xbar, v


def _fit_cox(time: np.ndarray, event: np.ndarray, x: np.ndarray, *, ties: str = "efron",
             max_iter: int = 50, tol: float = 1e-10) -> _CoxFit:
    """Newton–Raphson with step halving from beta = 0 (as R's coxph), to |step| ≤ tol."""
    rs = _risk_sets(time, event)
    xs = x[rs.order]
    frac = _efron_fraction(rs, np.ones((len(rs.ev_rows), 1), bool), ties)[:, 0]
    beta = np.zeros(x.shape[1])
    ll, u, info, xbar, v = _multi_pieces(beta, xs, rs, frac)
    diverged = AnalysisError(f"The Cox fit does not converge (within {max_iter} iterations, or a coefficient "
                             "runs off to infinity): a covariate may predict the outcome perfectly — drop or "
                             "coarsen it.")
    for _ in range(max_iter):
        try:
            step = np.linalg.solve(info, u)
        except np.linalg.LinAlgError:
            raise AnalysisError("The covariates are collinear (singular information matrix); drop one.") from None
        new = beta + step
        with np.errstate(all="ignore"):
            res = _multi_pieces(new, xs, rs, frac)
            for _half in range(30):
                if res[0] >= ll - 1e-12 * abs(ll):
                    break
                new = (beta + new) / 2
                res = _multi_pieces(new, xs, rs, frac)
        if not np.isfinite(res[0]) or not np.isfinite(res[2]).all():
            raise diverged
        converged = np.max(np.abs(new - beta)) <= tol * max(1.0, np.max(np.abs(new)))
        beta, (ll, u, info, xbar, v) = new, res
        if converged:
            var = np.linalg.inv(info)
            if not (np.diag(var) > 0).all() or (np.abs(beta) * x.std(axis=0) > MAX_COEF).any():
                raise diverged
            return _CoxFit(coef=beta, var=var, loglik=ll, rs=rs, xbar=xbar, v=v, x_dead=xs[rs.ev_rows])
    raise diverged


def _time_transform(rs: _RiskSets, transform: str) -> np.ndarray:
    """g(t) at each death: 'km' = 1 − left-continuous KM of all rows; 'rank' = rank of the time among all rows."""
    if transform == "rank":
        return stats.rankdata(rs.time)[rs.ev_rows]
    at_risk = rs.dg_end_row + 1.0                      # rows with time ≥ t (sorted latest first)
    deaths = np.diff(np.r_[rs.dg_start, len(rs.ev_rows)]).astype(float)
    # death groups run latest → earliest; KM is a product from the earliest time onward
    surv_after = np.cumprod((1 - deaths / at_risk)[::-1])[::-1]
    surv_before = np.r_[surv_after[1:], 1.0]
    return 1 - surv_before[rs.ev_group]


def ph_test(df: pd.DataFrame, duration_col: str, event_col: str, covariates: list[str], *,
            transform: str = "km") -> pd.DataFrame:
    """R ``cox.zph`` (survival ≥ 3.0): score tests of proportional hazards for a multivariable Cox fit.

    Fits ``Surv(duration, event) ~ covariates`` (Efron ties; rows with a missing value dropped) and,
    at the fitted beta, computes the score test for adding the time-varying terms x·g(t) (gamma = 0),
    with g the ``transform`` of time ('km': 1 − left-continuous Kaplan–Meier of the model's rows;
    'rank': rank of the time among all the model's rows, ties averaged). With U the score of
    (beta, gamma) and I the full 2p × 2p information matrix, covariate j gets chisq = Uᵀ I⁻¹ U over
    (beta, gamma_j) (1 df) and GLOBAL the same over all 2p (p df). This is the test of R survival
    ≥ 3.0 (it matches survival 3.5-3 to ~1e-9 on lung), not the scaled-Schoenfeld-residual test of
    R 2.x / lifelines' ``proportional_hazard_test``. One term per covariate (numeric columns only:
    encode factors as dummies first; a factor's dummies are then tested one by one, not jointly).
    Returns columns ``term, chisq, df, p`` with a last row ``GLOBAL``.
    """
    if transform not in PH_TRANSFORMS:
        raise AnalysisError(f"Unknown transform {transform!r}; use one of {', '.join(PH_TRANSFORMS)}.")
    covariates = list(covariates)
    if not covariates:
        raise AnalysisError("Name at least one covariate for the proportional-hazards test.")
    missing = [c for c in [duration_col, event_col, *covariates] if c not in df.columns]
    if missing:
        raise AnalysisError(f"The table has no column {', '.join(map(repr, missing))}.")
    d = df[[duration_col, event_col, *covariates]]
    bad = [c for c in d.columns if not pd.api.types.is_numeric_dtype(d[c]) and not pd.api.types.is_bool_dtype(d[c])]
    if bad:
        raise AnalysisError(f"Columns {', '.join(bad)} are not numeric; encode them (e.g. 0/1 dummies) first.")
    d = d.astype(float).replace([np.inf, -np.inf], np.nan).dropna()
    time, event = _as_survival(d[duration_col].to_numpy(), d[event_col].to_numpy())
    x = d[covariates].to_numpy()
    p = len(covariates)
    if event.sum() < p + 1:
        raise AnalysisError(f"{int(event.sum())} events for {p} covariates — too few for a Cox model.")
    if (x.std(axis=0) == 0).any():
        const = [c for c, s in zip(covariates, x.std(axis=0)) if s == 0]
        raise AnalysisError(f"{', '.join(const)} does not vary across patients; drop it from the model.")
    fit = _fit_cox(time, event, x)
    g = _time_transform(fit.rs, transform)
    g = g - g.mean()           # centring leaves the tests unchanged; it keeps the matrix well scaled
    resid = fit.x_dead - fit.xbar
    u = np.r_[resid.sum(axis=0), (g[:, None] * resid).sum(axis=0)]
    i_bb = fit.v.sum(axis=0)
    i_bg = (g[:, None, None] * fit.v).sum(axis=0)
    i_gg = (g[:, None, None] ** 2 * fit.v).sum(axis=0)
    info = np.block([[i_bb, i_bg], [i_bg, i_gg]])
    rows = []
    for j, name in enumerate(covariates):
        jj = np.r_[np.arange(p), p + j]
        chisq = float(u[jj] @ np.linalg.solve(info[np.ix_(jj, jj)], u[jj]))
        rows.append((name, chisq, 1, float(stats.chi2.sf(chisq, 1))))
    chisq = float(u @ np.linalg.solve(info, u))
    rows.append(("GLOBAL", chisq, p, float(stats.chi2.sf(chisq, p))))
    return pd.DataFrame(rows, columns=PH_COLUMNS)
