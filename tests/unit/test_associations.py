"""Associations, screens and validation checked against independent numbers.

Golden sources (each test quotes its own):

* R's help-page examples (Hollander & Wolfe, *Nonparametric Statistical Methods*, 1973), whose
  printed outputs are: ``wilcox.test(x, y, alternative = "g")`` on the chorioamnion permeability
  data → W = 35, p = 0.1272; ``kruskal.test(list(x, y, z))`` on the mucociliary-efficiency data →
  chi-squared = 0.77143, df = 2, p = 0.68; ``cor.test(x, y)`` on the p. 187 data → t = 1.8411,
  df = 7, p = 0.1082, cor = 0.5711816; ``cor.test(x, y, method = "spearman")`` → S = 48, rho = 0.6.
* Hand computations written out below (ranks, tie corrections, the normal and chi-squared tails
  via ``math.erfc``/``math.exp``, the t tail via Abramowitz & Stegun 26.7.3 for odd df).
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from core.analysis import assoc_plots as ap
from core.analysis.cox import benjamini_hochberg
from core.analysis.associations import (Association, _mw_exact_p, associate, associate_many, detect_kind,
                                        validate, validation_summary)
from core.errors import AnalysisError

# Hollander & Wolfe (1973) p. 69, as in R's ?wilcox.test: permeability at term (x) and at 12–26 weeks (y)
PERM_X = [0.80, 0.83, 1.89, 1.04, 1.45, 1.38, 1.91, 1.64, 0.73, 1.46]
PERM_Y = [1.15, 0.88, 0.90, 0.74, 1.21]
# Hollander & Wolfe (1973) p. 116, as in R's ?kruskal.test: mucociliary efficiency
MUCO = {"normal": [2.9, 3.0, 2.5, 2.6, 3.2], "obstructive": [3.8, 2.7, 4.0, 2.4],
        "asbestosis": [2.8, 3.4, 3.7, 2.2, 2.0]}
# Hollander & Wolfe (1973) p. 187, as in R's ?cor.test
HW_X = [44.4, 45.9, 41.9, 53.3, 44.7, 44.1, 50.7, 45.2, 60.1]
HW_Y = [2.6, 3.1, 2.5, 5.0, 3.6, 4.0, 5.2, 2.8, 3.8]


def groups_series(groups: dict[str, list[float]]) -> tuple[pd.Series, pd.Series]:
    vals, labels = [], []
    for g, v in groups.items():
        vals += v
        labels += [g] * len(v)
    idx = [f"P{i:03d}" for i in range(len(vals))]
    return pd.Series(vals, index=idx, name="GENE"), pd.Series(labels, index=idx, name="group")


def t_two_sided_odd_df(t: float, df: int) -> float:
    """Two-sided t tail for odd df, Abramowitz & Stegun 26.7.3 (a closed form, no scipy)."""
    th = math.atan(abs(t) / math.sqrt(df))
    c = math.cos(th)
    series, term = 0.0, c
    for k in range(1, (df - 1) // 2 + 1):
        series += term
        term *= c * c * (2 * k) / (2 * k + 1)
    a = 2 / math.pi * (th + math.sin(th) * series) if df > 1 else 2 / math.pi * th
    return 1 - a


# ---------------------------------------------------------------- two groups

def test_mann_whitney_exact_matches_r_help_example():
    """R ?wilcox.test: wilcox.test(x, y, alternative = "g") → W = 35, p-value = 0.1272 (exact, no ties);
    the two-sided exact p is twice that. Also checked by enumerating all C(15, 5) rank sets by hand."""
    v, g = groups_series({"term": PERM_X, "early": PERM_Y})
    g = pd.Series(pd.Categorical(g, categories=["term", "early"]), index=g.index, name="group")
    a = associate(v, g)
    assert a.test.endswith("(exact)") and a.statistic_name == "W"
    assert a.statistic == 35
    assert a.p == pytest.approx(2 * 0.1272, abs=2e-4)
    # enumeration: U of "term" over every way the 5 "early" ranks can fall among 15
    us = [sum(1 for i in range(15) if i not in c for j in c if i > j) for c in itertools.combinations(range(15), 5)]
    upper = sum(u >= 35 for u in us) / len(us)
    assert a.p == pytest.approx(2 * upper, rel=1e-12)
    assert a.effect == pytest.approx(1 - 2 * 35 / 50)          # rank-biserial, > 0 ⇒ second group higher
    assert [gr.group for gr in a.groups] == ["term", "early"] and [gr.n for gr in a.groups] == [10, 5]
    assert a.groups[1].median == 0.90


def test_exact_distribution_small_by_enumeration():
    """Hand enumeration: with n1 = 3, n2 = 2 there are C(5, 2) = 10 arrangements, U of group 1 takes
    values 0,1,2,2,3,3,4,4,5,6, so P(U ≤ 1) = 2/10 and the two-sided exact p of U = 1 is 0.4."""
    assert _mw_exact_p(1, 3, 2) == pytest.approx(0.4)
    assert _mw_exact_p(3, 3, 2) == pytest.approx(1.0)
    assert _mw_exact_p(0, 3, 2) == pytest.approx(0.2)


def test_mann_whitney_normal_with_ties_by_hand():
    """Hand computation (R's wilcox.test(exact=FALSE, correct=TRUE) formula).
    A = 1, 2, 2, 3, 5; B = 2, 4, 4, 6, 7, 8. Pooled ranks: 1→1, 2,2,2→3, 3→5, 4,4→6.5, 5→8, 6→9, 7→10, 8→11.
    R_A = 1+3+3+5+8 = 20, W = 20 − 5·6/2 = 5; E[W] = 15; Σ(t³−t) = 24 + 6 = 30;
    Var = 5·6/12 · (12 − 30/(11·10)) = 29.318182; z = (5 − 15 + 0.5)/√Var = −1.754507;
    p = erfc(|z|/√2) = 0.0793437."""
    v, g = groups_series({"A": [1, 2, 2, 3, 5], "B": [2, 4, 4, 6, 7, 8]})
    a = associate(v.astype(float), g)
    assert a.test.startswith("Mann–Whitney U (normal")
    assert a.statistic == 5
    z = (5 - 15 + 0.5) / math.sqrt(5 * 6 / 12 * (12 - 30 / 110))
    assert a.p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-10)
    assert a.p == pytest.approx(0.0793437, abs=1e-6)
    assert a.effect == pytest.approx(1 - 2 * 5 / 30)
    assert a.groups[0].median == 2 and a.groups[0].q1 == 2 and a.groups[0].q3 == 3   # R quantile type 7
    assert any("Normal approximation" in n for n in a.notes)


# ---------------------------------------------------------------- k groups

def test_kruskal_matches_r_help_example():
    """R ?kruskal.test: kruskal.test(list(x, y, z)) → Kruskal-Wallis chi-squared = 0.77143, df = 2, p = 0.68.
    By hand: rank sums 36, 36, 33 (n 5, 4, 5, N = 14), H = 12/(14·15)·(36²/5 + 36²/4 + 33²/5) − 45 = 0.771429;
    p = exp(−H/2) for 2 df = 0.679965."""
    v, g = groups_series(MUCO)
    a = associate(v, g)
    assert a.test.startswith("Kruskal") and a.df == 2 and a.n == 14
    assert a.statistic == pytest.approx(0.77143, abs=1e-5)
    assert a.statistic == pytest.approx(12 / 210 * (36 ** 2 / 5 + 36 ** 2 / 4 + 33 ** 2 / 5) - 45, rel=1e-12)
    assert a.p == pytest.approx(0.68, abs=5e-3)
    assert a.p == pytest.approx(math.exp(-a.statistic / 2), rel=1e-12)
    assert a.effect == pytest.approx(a.statistic / 13)            # epsilon² = H / (n − 1)


def test_kruskal_tie_correction_by_hand():
    """Hand computation: a = 1,2,2,4; b = 3,3,5,6; c = 6,7,8,8 (N = 12).
    Ranks: 1→1, 2,2→2.5, 3,3→4.5, 4→6, 5→7, 6,6→8.5, 7→10, 8,8→11.5; rank sums 12, 24.5, 41.5.
    H0 = 12/(12·13)·(12² + 24.5² + 41.5²)/4 − 39 = 8.432692; four ties of 2: C = 1 − 24/(12³ − 12);
    H = H0 / C = 8.552305; p = exp(−H/2) = 0.0138960."""
    v, g = groups_series({"a": [1, 2, 2, 4], "b": [3, 3, 5, 6], "c": [6, 7, 8, 8]})
    a = associate(v.astype(float), g)
    h0 = 12 / (12 * 13) * (12 ** 2 + 24.5 ** 2 + 41.5 ** 2) / 4 - 39
    assert a.statistic == pytest.approx(h0 / (1 - 24 / 1716), rel=1e-12)
    assert a.statistic == pytest.approx(8.552305, abs=1e-6)
    assert a.p == pytest.approx(0.0138960, abs=1e-7)


# ---------------------------------------------------------------- continuous

def test_spearman_matches_r_help_example_and_t_by_hand():
    """R ?cor.test: cor.test(x, y, method = "spearman") → S = 48, rho = 0.6 (S = (n³ − n)(1 − rho)/6).
    With exact = FALSE R uses t = rho·√((n − 2)/(1 − rho²)) = 1.984313 on 7 df; its two-sided tail
    by Abramowitz & Stegun 26.7.3 is 0.0876228."""
    a = associate(pd.Series(HW_X, name="x"), pd.Series(HW_Y, name="y"))
    assert a.kind == "continuous" and a.test.startswith("Spearman") and a.n == 9
    assert a.rho == pytest.approx(0.6, abs=1e-12)
    assert (9 ** 3 - 9) * (1 - a.rho) / 6 == pytest.approx(48)
    t = 0.6 * math.sqrt(7 / (1 - 0.36))
    assert a.p == pytest.approx(t_two_sided_odd_df(t, 7), rel=1e-9)
    assert a.p == pytest.approx(0.0876228, abs=1e-7)


def test_t_tail_helper_against_known_table_value():
    """Sanity check of the test's own helper: the two-sided 5 % critical t on 7 df is 2.365 (t tables)."""
    assert t_two_sided_odd_df(2.364624, 7) == pytest.approx(0.05, abs=1e-6)


def test_join_on_patients_and_missing_dropped():
    x = pd.Series([1.0, 2, 3, 4, 5, 6, np.nan], index=list("abcdefg"), name="g")
    y = pd.Series([2.0, 1, 4, 3, 6, 5, 7, 8], index=list("abcdefgh"), name="age")
    y["c"] = np.nan
    a = associate(x, y, kind="continuous")
    assert a.n == 5                                  # a, b, d, e, f


# ---------------------------------------------------------------- kind, small groups, errors

def test_detect_kind():
    assert detect_kind(pd.Series([1.0, 2, 3, 4, 5, 6])) == "continuous"
    assert detect_kind(pd.Series([1, 2, 3, 4, 5, 5, 1])) == "categorical"       # 5 distinct
    assert detect_kind(pd.Series(["I", "II", "III", "IV", "V", "VI", "VII"])) == "categorical"
    assert detect_kind(pd.Series([True, False, True])) == "categorical"
    assert detect_kind(pd.Series([1.0, 2, np.nan, np.nan, np.nan, np.nan])) == "categorical"


def test_kind_errors():
    v = pd.Series(np.arange(10.0))
    with pytest.raises(AnalysisError, match="not numeric"):
        associate(v, pd.Series(list("abababcbca")), kind="continuous")
    with pytest.raises(AnalysisError, match="Unknown kind"):
        associate(v, pd.Series(np.arange(10.0)), kind="ordinal")


def test_small_groups_dropped_and_reported():
    v, g = groups_series({"low": [1.0, 2, 3, 4], "high": [5.0, 6, 7, 8], "rare": [9.0, 10]})
    a = associate(v, g)
    assert [gr.group for gr in a.groups] == ["high", "low"]          # sorted; "rare" dropped
    assert a.n == 8 and a.test.startswith("Mann–Whitney")
    assert any("rare" in n and "2 patients" in n for n in a.notes)
    v, g = groups_series({"low": [1.0, 2, 3], "rare": [9.0, 10]})
    with pytest.raises(AnalysisError, match="fewer than 2 groups"):
        associate(v, g)


def test_numeric_codes_are_categorical_with_clean_labels():
    v = pd.Series(np.arange(12.0), name="g")
    g = pd.Series([0.0, 1.0] * 6, name="status")
    a = associate(v, g)
    assert a.kind == "categorical" and [gr.group for gr in a.groups] == ["0", "1"]


def test_constant_and_too_few_raise():
    with pytest.raises(AnalysisError, match="constant"):
        associate(pd.Series(np.ones(8)), pd.Series(list("aaaabbbb")))
    with pytest.raises(AnalysisError, match="at least 3"):
        associate(pd.Series([1.0, 2.0]), pd.Series([1.0, 2.0]), kind="continuous")
    with pytest.raises(AnalysisError, match="more than once"):
        associate(pd.Series([1.0, 2, 3], index=list("aab")), pd.Series([1.0, 2, 3], index=list("abc")))


# ---------------------------------------------------------------- BH

def test_bh_by_hand():
    """Hand computation: p = .01, .04, .03, .005, .5 (m = 5). Sorted p·m/rank: .005·5/1 = .025,
    .01·5/2 = .025, .03·5/3 = .05, .04·5/4 = .05, .5·5/5 = .5; running minimum from the top leaves
    them, so q = .025, .05, .05, .025, .5 in the original order. p = .02, .021: .04 then .021 → both .021.
    NaN stays NaN and is not counted in m."""
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.005, 0.5])), [0.025, 0.05, 0.05, 0.025, 0.5])
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.02, 0.021])), [0.021, 0.021])
    q = benjamini_hochberg(np.array([0.02, np.nan, 0.021]))
    assert np.isnan(q[1]) and q[0] == pytest.approx(0.021)
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.9, 0.8])), [0.9, 0.9])
    assert np.isnan(benjamini_hochberg(np.array([np.nan]))).all()


# ---------------------------------------------------------------- screens

def _screen_matrix(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idx = [f"TCGA-{i:04d}" for i in range(n)]
    m = pd.DataFrame(rng.normal(size=(n, 30)), index=idx, columns=[f"G{i}" for i in range(30)])
    m["TIES"] = rng.integers(0, 4, n).astype(float)               # tie correction in the vectorised path
    m["CONST"] = 1.0
    m.loc[idx[:3], "G5"] = np.nan                                  # the one-by-one path
    return m


@pytest.mark.parametrize("case", ["two_small", "two_large", "k", "continuous"])
def test_associate_many_equals_loop(case):
    n = 130 if case == "two_large" else 40
    m = _screen_matrix(n)
    rng = np.random.default_rng(1)
    if case == "continuous":
        other = pd.Series(rng.normal(size=n), index=m.index, name="age")
    else:
        levels = list("ab") if case.startswith("two") else list("abcd")
        other = pd.Series(rng.choice(levels, n), index=m.index, name="grp")
        other.iloc[:2] = "tiny"                                      # a group dropped in every column
    other.iloc[5] = np.nan
    out = associate_many(m, other).set_index("variable")
    assert list(out.columns) == ["test", "statistic", "effect", "p", "q", "n"]
    for col in m.columns.drop("CONST"):
        a = associate(m[col], other)
        row = out.loc[col]
        assert row["test"] == a.test and row["n"] == a.n
        assert row["statistic"] == pytest.approx(a.statistic, rel=1e-10)
        assert row["effect"] == pytest.approx(a.effect, rel=1e-10)
        assert row["p"] == pytest.approx(a.p, rel=1e-9)
    assert np.isnan(out.loc["CONST", "p"]) and np.isnan(out.loc["CONST", "q"])
    ok = out["p"].notna()
    np.testing.assert_allclose(out.loc[ok, "q"], benjamini_hochberg(out.loc[ok, "p"].to_numpy()))
    assert (np.diff(out["p"].dropna().to_numpy()) >= 0).all()        # sorted by p
    if case == "two_small":
        assert out.loc["G0", "test"].endswith("(exact)")
    if case == "two_large":
        assert out.loc["G0", "test"].startswith("Mann–Whitney U (normal")


def test_associate_many_errors():
    m = _screen_matrix(20)
    with pytest.raises(AnalysisError, match="no variables"):
        associate_many(m.iloc[:, :0], pd.Series(1.0, index=m.index))


# ---------------------------------------------------------------- validation

def _validation_frames():
    pats = [f"P{i}" for i in range(15)]
    rng = np.random.default_rng(3)
    base = rng.normal(size=15)
    predicted = pd.DataFrame({"TP53": base, "MYC": base, "FLAT": 2.0, "HWX": np.r_[HW_X, np.zeros(6)],
                              "ONLYPRED": base}, index=pats)
    meas_pats = pats[:9] + ["Q1", "Q2"]                                 # 9 shared patients, 2 foreign
    measured = pd.DataFrame({"tp53": 3 * base[:9] + 1, "myc": -base[:9], "flat": base[:9], "hwx": HW_Y,
                             "only_meas": base[:9]}, index=pats[:9])
    measured = pd.concat([measured, pd.DataFrame(0.0, index=["Q1", "Q2"], columns=measured.columns)])
    measured.loc["P0", "myc"] = np.nan                                  # MYC has 8 pairs
    return predicted, measured.loc[meas_pats]


def test_validate_known_correlations():
    """HWX carries the Hollander & Wolfe p. 187 data: R ?cor.test, cor.test(x, y) → t = 1.8411, df = 7,
    p = 0.1082, cor = 0.5711816; Spearman rho = 0.6 (see above). TP53 is a linear map (r = 1),
    MYC its negative (r = −1), FLAT is constant (r = NaN with its n)."""
    predicted, measured = _validation_frames()
    out = validate(predicted, measured)
    assert list(out.columns) == ["gene", "n", "pearson_r", "pearson_p", "spearman_r", "spearman_p"]
    assert list(out["gene"]) == ["TP53", "HWX", "MYC", "FLAT"]        # by r, NaN last; names as predicted
    r = out.set_index("gene")
    assert r.loc["TP53", "pearson_r"] == pytest.approx(1.0) and r.loc["TP53", "n"] == 9
    assert r.loc["MYC", "pearson_r"] == pytest.approx(-1.0) and r.loc["MYC", "n"] == 8
    assert r.loc["HWX", "pearson_r"] == pytest.approx(0.5711816, abs=1e-7)
    assert r.loc["HWX", "pearson_p"] == pytest.approx(0.1082, abs=1e-4)
    t = 0.5711816 * math.sqrt(7 / (1 - 0.5711816 ** 2))
    assert t == pytest.approx(1.8411, abs=1e-4)
    assert r.loc["HWX", "pearson_p"] == pytest.approx(t_two_sided_odd_df(t, 7), rel=1e-5)
    assert r.loc["HWX", "spearman_r"] == pytest.approx(0.6)
    assert r.loc["HWX", "spearman_p"] == pytest.approx(0.0876228, abs=1e-7)
    assert np.isnan(r.loc["FLAT", "pearson_r"]) and r.loc["FLAT", "n"] == 9

    s = validation_summary(out)
    json.dumps(s, allow_nan=False)
    assert s["n_genes"] == 4 and s["n_evaluable"] == 3
    assert s["median_r"] == pytest.approx(0.5711816, abs=1e-7)
    assert s["fraction_positive"] == pytest.approx(2 / 3)
    assert [g["gene"] for g in s["top_genes"]] == ["TP53", "HWX", "MYC"]


def test_validate_errors():
    predicted, measured = _validation_frames()
    with pytest.raises(AnalysisError, match="share no gene"):
        validate(predicted[["ONLYPRED"]], measured[["only_meas"]])
    with pytest.raises(AnalysisError, match="No patient"):
        validate(predicted, measured.rename(index=lambda p: "X" + p))
    with pytest.raises(AnalysisError, match="differ only in case"):
        validate(predicted.assign(tp53=1.0), measured)


# ---------------------------------------------------------------- JSON

def test_to_json_is_strict_json():
    v, g = groups_series({"a": [1.0, 2, 3, 4], "b": [3.0, 5, 6, 7], "c": [1.0]})
    a = associate(v, g)
    d = a.to_json()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert set(back) >= {"variable", "against", "kind", "test", "statistic", "p", "n", "groups", "notes"}
    assert back["groups"][0] == {"group": "a", "n": 4, "median": 2.5, "q1": 1.75, "q3": 3.25, "iqr": 1.5}
    assert back["notes"] and "c" in back["notes"][0]
    c = associate(pd.Series(HW_X), pd.Series(HW_Y)).to_json()
    assert json.loads(json.dumps(c, allow_nan=False))["rho"] == pytest.approx(0.6)
    nan_assoc = Association("x", "y", "continuous", "t", float("nan"), "rho", float("nan"), 3, float("inf"), "rho",
                            rho=float("nan"))
    assert json.loads(json.dumps(nan_assoc.to_json(), allow_nan=False))["p"] is None


# ---------------------------------------------------------------- figures

def _screen_table() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    n = 40
    p = np.r_[10.0 ** -rng.uniform(4, 8, 5), rng.uniform(0.01, 1, n - 5)]
    hr = np.exp(rng.normal(0, 0.5, n))
    return pd.DataFrame({"variable": [f"G{i}" for i in range(n)], "hr": hr, "ci_lower": hr * 0.7,
                         "ci_upper": hr * 1.4, "p": p, "q": benjamini_hochberg(p),
                         "source": np.where(np.arange(n) % 3, "predicted", "measured")})


def _is_png(b: bytes) -> bool:
    return b[:8] == b"\x89PNG\r\n\x1a\n"


def _is_svg(b: bytes) -> bool:
    return b"<svg" in b[:2000] and b.rstrip().endswith(b"</svg>")


def test_volcano_figure_and_static():
    screen = _screen_table()
    fig = ap.volcano_figure(screen, label_top=3)
    labels = [t for tr in fig.data if tr.mode == "markers+text" for t in tr.text if t]
    assert len(labels) == 3
    assert any("HR =" in str(h) for tr in fig.data for h in (tr.customdata if tr.customdata is not None else []))
    assert _is_png(ap.volcano_static(screen, "png"))
    assert _is_svg(ap.volcano_static(screen, "svg"))
    with pytest.raises(AnalysisError, match="format"):
        ap.volcano_static(screen, "jpg")
    with pytest.raises(AnalysisError, match="lacks"):
        ap.volcano_figure(screen.drop(columns="q"))


def test_box_figure_and_static():
    v, g = groups_series({"I": [1.0, 2, 3, 4], "II": [3.0, 5, 6, 7], "III": [5.0, 6, 8, 9], "X": [1.0]})
    a = associate(v, g)
    fig = ap.box_figure(v, g, a)
    assert len(fig.data) == 3 and "(n=4)" in fig.data[0].x[0]
    assert "Kruskal" in fig.layout.title.text and "p =" in fig.layout.title.text
    assert _is_png(ap.box_static(v, g, a, "png"))
    assert _is_svg(ap.box_static(v, g, a, "svg"))


def test_scatter_and_validation_figures():
    x, y = pd.Series(HW_X, name="GENE"), pd.Series(HW_Y, name="age")
    a = associate(x, y)
    fig = ap.scatter_figure(x, y, a)
    assert len(fig.data) == 2 and "ρ = 0.60" in fig.layout.title.text
    assert len(ap.scatter_figure(x, y, 0.6, trend="linear").data) == 2
    assert _is_png(ap.scatter_static(x, y, a, "png"))
    assert _is_svg(ap.scatter_static(x, y, 0.6, "svg", trend="none"))
    fig = ap.validation_scatter(y, x, "HWX", 0.5711816)
    assert "r = 0.57" in fig.layout.title.text
    assert _is_png(ap.validation_static(y, x, "HWX", 0.57, "png"))
    assert _is_svg(ap.validation_static(y, x, "HWX", float("nan"), "svg"))


def test_lowess_follows_a_line_exactly():
    """A local linear fit reproduces a straight line exactly, whatever the weights."""
    x = np.linspace(0, 10, 30)
    gx, gy = ap.lowess(x, 2 * x + 1)
    np.testing.assert_allclose(gy, 2 * gx + 1, atol=1e-9)
    assert ap.lowess(np.ones(5), np.arange(5.0))[0].size == 0
