"""Golden tests of ``core.analysis.km`` (and smoke tests of ``km_plots``).

Reference numbers, each test says which:
- R 4.2.2 / survival 3.5-3 / maxstat 0.7-25 on ``survival::lung``, computed by
  ``shared/data/golden/survival_R.R`` into ``survival_R.json`` (read here, not retyped);
- R's printed ``summary(coxph(Surv(time, status) ~ sex, data = lung))`` (the STHDA Cox tutorial,
  http://www.sthda.com/english/wiki/cox-proportional-hazards-model): coef −0.5310,
  exp(coef) 0.5880, se 0.1672, p 0.00149, 95 % CI 0.4237–0.816;
- hand computations written out in the docstrings (product-limit, Greenwood, Mantel–Haenszel
  log-rank, R's quantile type 7).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.analysis.km import kaplan_meier, lausen92_p, split_groups
from core.errors import AnalysisError

Z = 1.959963984540054


# --------------------------------------------------------------------------- lung (R)
@pytest.fixture(scope="module")
def golden(shared_data):
    return json.loads((shared_data / "golden" / "survival_R.json").read_text())


@pytest.fixture(scope="module")
def lung(shared_data):
    d = pd.read_csv(shared_data / "golden" / "lung.csv")
    d["event"] = (d["status"] == 2).astype(int)    # R coding: 1 = censored, 2 = dead
    return d


@pytest.mark.parametrize("ci,key", [("log", "km_sex_logci"), ("log-log", "km_sex_loglogci")])
def test_km_by_sex_matches_r(lung, golden, ci, key):
    """R: survfit(Surv(time, status) ~ sex, data = lung, conf.type = ci); summary(...)$table and
    summary(fit, times = c(0, 250, 500, 750, 1000)) — golden ``km_sex_logci`` / ``km_sex_loglogci``."""
    ref = golden[key]
    a = kaplan_meier(lung["time"], lung["event"], lung["sex"], ci=ci, risk_times=[0, 250, 500, 750, 1000])
    assert a.labels == ("1", "2")
    for i, g in enumerate(a.groups):
        assert (g.n, g.events) == (ref["n"][i], ref["events"][i])
        assert g.median == pytest.approx(ref["median"][i])
        assert g.median_ci == pytest.approx((ref["lower"][i], ref["upper"][i]))
        rows = [j for j, s in enumerate(ref["risk_strata"]) if s == f"sex={g.label}"]
        times = [ref["risk_times"][j] for j in rows]
        lookup = dict(zip(a.risk_times, g.at_risk))
        assert [lookup[t] for t in times] == [ref["n_risk"][j] for j in rows]
        assert g.survival_at(times) == pytest.approx([ref["surv"][j] for j in rows], rel=1e-9)
    # R leaves out sex=2 at 1000 days (beyond its last follow-up): nobody at risk, survival undefined
    female = a.group("2")
    assert female.at_risk[-1] == 0 and np.isnan(female.survival_at(1000)[0])


def test_default_ci_is_lifelines_log_log(lung):
    """lifelines' KaplanMeierFitter band is the log-log (exponential Greenwood) one, our default."""
    from lifelines import KaplanMeierFitter

    a = kaplan_meier(lung["time"], lung["event"], lung["sex"])
    assert a.ci == "log-log"
    g = a.group("1")
    m = lung["sex"] == 1
    kmf = KaplanMeierFitter().fit(lung.loc[m, "time"], lung.loc[m, "event"])
    band = kmf.confidence_interval_survival_function_.reindex(g.timeline)
    ok = (g.survival > 0) & (g.survival < 1)
    assert g.ci_lower[ok] == pytest.approx(band.iloc[:, 0].to_numpy()[ok], rel=1e-9)
    assert g.ci_upper[ok] == pytest.approx(band.iloc[:, 1].to_numpy()[ok], rel=1e-9)


def test_logrank_sex_matches_r(lung, golden):
    """R: survdiff(Surv(time, status) ~ sex, data = lung) — golden ``logrank_sex``."""
    ref = golden["logrank_sex"]
    a = kaplan_meier(lung["time"], lung["event"], lung["sex"])
    assert a.logrank_stat == pytest.approx(ref["chisq"], rel=1e-7)
    assert a.logrank_df == ref["df"]
    assert a.logrank_p == pytest.approx(ref["p"], rel=1e-6)


def test_logrank_ecog_four_groups_matches_r(lung, golden):
    """R: survdiff(Surv(time, status) ~ ph.ecog, data = lung), 4 groups, one of a single patient —
    golden ``logrank_ecog``; the patient without ph.ecog is left out as by R."""
    ref = golden["logrank_ecog"]
    a = kaplan_meier(lung["time"], lung["event"], lung["ph.ecog"])
    assert [f"ph.ecog={lab}" for lab in a.labels] == ref["groups"]
    assert [g.n for g in a.groups] == ref["n"]
    assert a.n_excluded == 1
    assert a.logrank_stat == pytest.approx(ref["chisq"], rel=1e-7)
    assert a.logrank_df == ref["df"]
    assert a.logrank_p == pytest.approx(ref["p"], rel=1e-6)
    assert all(np.isfinite(g.hr) for g in a.groups)       # the group of 1 (who died) still gets an HR


def test_cox_hr_sex_matches_r(lung):
    """R: summary(coxph(Surv(time, status) ~ sex, data = lung)), Efron ties, as printed (STHDA):
    exp(coef) 0.5880, lower .95 0.4237, upper .95 0.816, Pr(>|z|) 0.00149."""
    a = kaplan_meier(lung["time"], lung["event"], lung["sex"])
    female = a.group("2")
    assert female.hr == pytest.approx(0.5880, abs=5e-5)
    assert female.hr_ci == pytest.approx((0.4237, 0.816), abs=5e-4)
    assert female.hr_p == pytest.approx(0.00149, abs=5e-6)
    male = a.group("1")
    assert male.is_reference and male.hr == 1.0 and np.isnan(male.hr_p)
    # the other way round: HR inverts
    b = kaplan_meier(lung["time"], lung["event"], lung["sex"], reference="2")
    assert b.group("1").hr == pytest.approx(1 / 0.5880, abs=2e-4)


def test_maxstat_age_matches_r(lung, golden):
    """R: maxstat.test(Surv(time, status) ~ age, data = lung, smethod = "LogRank", pmethod = "Lau92",
    minprop = 0.1, maxprop = 0.9) — golden ``maxstat_age_lau92``: cut 70, statistic 2.0136, p 0.4546."""
    ref = golden["maxstat_age_lau92"]
    s = split_groups(lung["age"], "optimal", time=lung["time"], event=lung["event"],
                     minprop=ref["minprop"], maxprop=ref["maxprop"])
    assert s.method == "optimal"
    assert s.cutpoints == (ref["cutpoint"],)
    assert s.statistic == pytest.approx(ref["statistic"], rel=1e-9)
    assert s.p_value == pytest.approx(ref["p"], rel=1e-9)
    assert s.categories == ("low (≤ 70)", "high (> 70)")
    assert (s.labels == "low (≤ 70)").sum() == (lung["age"] <= 70).sum()
    assert s.profile["statistic"].max() == pytest.approx(ref["statistic"])


def test_lausen92_formula_by_hand():
    """Lausen & Schumacher (1992), eq. for P(M ≥ b) with ε = (0.1, 0.9): at b = 2,
    φ(2) = e⁻²/√(2π) = 0.0539909665; 4φ/b = 0.107981933; φ (b − 1/b) log(81)
    = 0.0539909665 × 1.5 × 4.39444915 = 0.355890836; sum 0.463872769 (by calculator, 9 digits)."""
    assert lausen92_p(2.0) == pytest.approx(0.463872769, abs=2e-9)
    assert lausen92_p(0.5) == 1.0          # the approximation is for large b: no p below 1 there


# --------------------------------------------------------------------------- hand example
TINY = pd.DataFrame({"time": [1, 3, 4, 6, 2, 3, 5, 7], "event": [1, 1, 0, 1, 1, 0, 1, 0],
                     "group": ["A"] * 4 + ["B"] * 4})


def test_tiny_km_by_hand():
    """Product-limit by hand. A: t=1 (4 at risk, 1 death) S = 3/4; t=3 (3, 1) S = 1/2; 4 censored;
    t=6 (1, 1) S = 0. S is exactly 1/2 from t=3 to t=6, so the median is R's midpoint (3 + 6)/2 = 4.5.
    B: t=2 (4, 1) S = 3/4; 3 censored; t=5 (2, 1) S = 3/8; 7 censored: median 5.
    Greenwood for A at t=3: Var(log S) = 1/(4·3) + 1/(3·2) = 1/4, se 0.5, so the log band is
    0.5·exp(±1.96·0.5) = (0.18763, 1 (capped)); log-log: exp(−exp(log(log 2) ∓ 1.96·0.5/log 2))."""
    a = kaplan_meier(TINY["time"], TINY["event"], TINY["group"], ci="log")
    A, B = a.group("A"), a.group("B")
    assert A.survival_at([0, 1, 2, 3, 4, 5, 6]) == pytest.approx([1, 3 / 4, 3 / 4, 1 / 2, 1 / 2, 1 / 2, 0])
    assert B.survival_at([1, 2, 3, 5, 7]) == pytest.approx([1, 3 / 4, 3 / 4, 3 / 8, 3 / 8])
    assert np.isnan(B.survival_at(8)[0])
    assert A.median == 4.5 and B.median == 5
    assert list(A.censor_times) == [4] and list(A.censor_survival) == [0.5]
    assert list(B.censor_times) == [3, 7] and list(B.censor_survival) == pytest.approx([3 / 4, 3 / 8])
    i3 = list(A.timeline).index(3)
    assert A.ci_lower[i3] == pytest.approx(0.5 * math.exp(-Z * 0.5))
    assert A.ci_upper[i3] == 1.0
    b = kaplan_meier(TINY["time"], TINY["event"], TINY["group"], ci="log-log")
    ll = math.log(math.log(2))
    assert b.group("A").ci_lower[i3] == pytest.approx(math.exp(-math.exp(ll + Z * 0.5 / math.log(2))))
    assert b.group("A").ci_upper[i3] == pytest.approx(math.exp(-math.exp(ll - Z * 0.5 / math.log(2))))


def test_tiny_logrank_by_hand():
    """Mantel–Haenszel log-rank by hand at the death times 1, 2, 3, 5, 6 (at risk A/B, deaths):
    E_A = 4/8 + 3/7 + 3/6 + 1/3 + 1/2 = 95/42, O_A = 3;
    V = 1/4 + 12/49 + 1/4 + 2/9 + 1/4 = 2147/1764; χ² = (31/42)² / V = 961/2147."""
    a = kaplan_meier(TINY["time"], TINY["event"], TINY["group"])
    assert a.logrank_stat == pytest.approx(961 / 2147, rel=1e-12)
    assert a.logrank_df == 1
    assert (a.n, a.events) == (8, 5)
    assert a.group("A").at_risk[0] == 4


# --------------------------------------------------------------------------- splits
def test_median_split_boundary():
    """Median of 1, 2, 2, 2, 3 is 2 (hand): low is ≤ 2, so four low and one high."""
    s = split_groups(pd.Series([1, 2, 2, 2, 3], name="x"), "median")
    assert s.cutpoints == (2.0,)
    assert list(s.labels) == ["low (≤ 2)"] * 4 + ["high (> 2)"]
    assert s.labels.cat.ordered


def test_tertile_and_quartile_split_boundaries():
    """R's quantile type 7 by hand: quantile(1:6, c(1/3, 2/3)) = 1 + 5/3, 1 + 10/3 = 2.667, 4.333;
    quantile(1:9, c(.25, .5, .75)) = 3, 5, 7 — values on a cut go to the lower group."""
    t = split_groups(pd.Series(range(1, 7)), "tertile")
    assert t.cutpoints == pytest.approx((8 / 3, 13 / 3))
    assert t.labels.value_counts(sort=False).tolist() == [2, 2, 2]
    assert t.categories == ("low (≤ 2.67)", "mid (2.67–4.33)", "high (> 4.33)")
    q = split_groups(pd.Series(range(1, 10)), "quartile")
    assert q.cutpoints == (3.0, 5.0, 7.0)
    assert [str(v) for v in q.labels] == ["Q1 (≤ 3)"] * 3 + ["Q2 (3–5)"] * 2 + ["Q3 (5–7)"] * 2 + ["Q4 (> 7)"] * 2


def test_custom_cut_and_missing_values():
    s = split_groups(pd.Series([0.5, 1.0, 1.5, np.nan, 2.0], index=list("abcde")), 1.0)
    assert s.method == "custom" and s.cutpoints == (1.0,)
    assert s.labels.index.tolist() == list("abcde")
    assert s.labels.isna().tolist() == [False, False, False, True, False]
    assert list(s.labels.dropna()) == ["low (≤ 1)", "low (≤ 1)", "high (> 1)", "high (> 1)"]
    with pytest.raises(AnalysisError, match="leaves one group empty"):
        split_groups(pd.Series([1.0, 2.0, 3.0]), 3.0)
    with pytest.raises(AnalysisError, match="single non-empty group"):
        split_groups(pd.Series([5.0, 5.0, 5.0, 5.0]), "median")
    with pytest.raises(AnalysisError, match="Unknown split"):
        split_groups(pd.Series([1.0, 2.0]), "mean")
    with pytest.raises(AnalysisError, match="time and event"):
        split_groups(pd.Series([1.0, 2.0]), "optimal")


# --------------------------------------------------------------------------- horizon, units, errors
def test_horizon_censors_administratively(lung):
    """Censoring at 500 days by hand: deaths after 500 days become censored at 500; the curve up to
    500 days is unchanged (R golden surv at 250 days: 0.519234911527 for sex=1)."""
    a = kaplan_meier(lung["time"], lung["event"], lung["sex"], horizon_days=500)
    assert a.events == int(((lung["time"] <= 500) & (lung["event"] == 1)).sum())
    assert a.horizon_days == 500
    male = a.group("1")
    assert male.timeline.max() == 500
    assert male.survival_at(250)[0] == pytest.approx(0.519234911527, rel=1e-9)
    t = np.minimum(lung["time"], 500)
    e = np.where(lung["time"] > 500, 0, lung["event"])
    b = kaplan_meier(t, e, lung["sex"])
    assert a.logrank_stat == pytest.approx(b.logrank_stat)


def test_unit_scales_times_not_statistics(lung, golden):
    """Medians 270 and 426 days (R golden) are 270/30.4375 and 426/30.4375 months, /365.25 years."""
    d = kaplan_meier(lung["time"], lung["event"], lung["sex"])
    m = kaplan_meier(lung["time"], lung["event"], lung["sex"], unit="months")
    y = kaplan_meier(lung["time"], lung["event"], lung["sex"], unit="years")
    med = golden["km_sex_loglogci"]["median"]
    assert [g.median for g in m.groups] == pytest.approx([v / 30.4375 for v in med])
    assert [g.median for g in y.groups] == pytest.approx([v / 365.25 for v in med])
    assert m.group("1").timeline == pytest.approx(d.group("1").timeline / 30.4375)
    assert m.logrank_stat == d.logrank_stat and m.group("2").hr == d.group("2").hr
    assert list(d.risk_times) == [0, 200, 400, 600, 800, 1000]     # round days over 0–1022
    assert list(m.risk_times) == [0, 6, 12, 18, 24, 30]            # months step by 6 over 0–33.6
    assert m.group("1").at_risk[1] == (lung.loc[lung["sex"] == 1, "time"] >= 6 * 30.4375).sum()


def test_errors_name_the_counts():
    with pytest.raises(AnalysisError, match="at least 2 groups.*A: 3 patients"):
        kaplan_meier([1, 2, 3], [1, 1, 1], ["A", "A", "A"])
    with pytest.raises(AnalysisError, match="Only 2 events among 4 patients"):
        kaplan_meier([1, 2, 3, 4], [1, 0, 1, 0], ["A", "A", "B", "B"])
    with pytest.raises(AnalysisError, match="R-style status"):
        kaplan_meier([1, 2, 3, 4], [1, 2, 1, 2], ["A", "A", "B", "B"])
    with pytest.raises(AnalysisError, match="Unknown time unit"):
        kaplan_meier(TINY["time"], TINY["event"], TINY["group"], unit="weeks")
    with pytest.raises(AnalysisError, match="Reference group"):
        kaplan_meier(TINY["time"], TINY["event"], TINY["group"], reference="C")


def test_empty_categories_dropped_and_eventless_group():
    g = pd.Categorical(TINY["group"].tolist(), categories=["Z", "A", "B"], ordered=True)
    a = kaplan_meier(TINY["time"], TINY["event"], g)
    assert a.labels == ("A", "B") and a.reference == "A"
    t = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    e = [1, 1, 1, 0, 1, 0, 0, 0, 0]
    grp = ["A", "B", "A", "B", "A", "B"] + ["C"] * 3      # A and B interleaved: B's HR is estimable
    b = kaplan_meier(t, e, grp)
    assert np.isnan(b.group("C").hr)                         # no events: no finite HR
    assert np.isfinite(b.group("B").hr)
    assert b.to_json()["groups"][2]["hr"] is None
    # complete separation (every A event before any B follow-up): B's HR is infinite, reported undefined
    sep = kaplan_meier(t, e, ["A"] * 3 + ["B"] * 3 + ["C"] * 3)
    assert np.isnan(sep.group("B").hr)


def test_to_json_strict(lung):
    s = split_groups(lung["age"], "optimal", time=lung["time"], event=lung["event"])
    a = kaplan_meier(lung["time"], lung["event"], s, endpoint="OS", variable="age", unit="months")
    out = a.to_json()
    text = json.dumps(out, allow_nan=False)
    assert {"endpoint", "variable", "n", "events", "logrank_p", "logrank_stat", "groups"} <= set(out)
    assert (out["endpoint"], out["variable"], out["n"], out["events"]) == ("OS", "age", 228, 165)
    for grp in out["groups"]:
        assert {"label", "n", "events", "median", "hr", "hr_ci"} <= set(grp)
        assert len(grp["hr_ci"]) == 2
    assert out["groups"][0]["hr_ci"] == [None, None]            # the reference
    assert out["split"]["cutpoints"] == [70.0]
    assert json.loads(text)["risk_table"]["times"] == [0, 6, 12, 18, 24, 30]
    # an unreached median becomes null
    t = kaplan_meier([1, 2, 3, 4, 5, 6], [1, 0, 0, 1, 1, 1], ["A", "A", "A", "B", "B", "B"]).to_json()
    assert t["groups"][0]["median"] is None
    json.dumps(t, allow_nan=False)


# --------------------------------------------------------------------------- figures
def test_km_figure_and_static(lung):
    from core.analysis.km_plots import km_figure, km_static

    a = kaplan_meier(lung["time"], lung["event"], split_groups(lung["age"], "tertile"), endpoint="OS",
                     variable="age", unit="months")
    fig = km_figure(a, ci_bands=True)
    names = [tr.name for tr in fig.data if tr.showlegend is not False]
    assert names[0].startswith("low (≤") and "n=" in names[0] and "events=" in names[0]
    assert "log-rank p" in fig.layout.title.text
    assert any(getattr(tr.marker, "symbol", None) == "cross-thin" for tr in fig.data)
    texts = [tr for tr in fig.data if tr.mode == "text"]
    assert len(texts) == 3 and list(texts[0].text) == [str(v) for v in a.groups[0].at_risk]
    fig.to_json()
    svg = km_static(a, "svg")
    assert svg.startswith(b"<?xml") or b"<svg" in svg
    png = km_static(a, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(AnalysisError):
        km_static(a, "gif")
