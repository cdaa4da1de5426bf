"""Cox screen, Benjamini–Hochberg and the cox.zph PH test against independent numbers.

Golden numbers: ``shared/data/golden/survival_R.json``, written by ``survival_R.R`` in the same folder
with R 4.2.2 and survival 3.5-3 (``coxph``, ``cox.zph``, ``p.adjust(method = "BH")``) on
``survival::lung`` (status 1 = censored, 2 = dead) and the Rossi recidivism data. Cross-checks use
lifelines (``CoxPHFitter`` with Efron ties, ``concordance_index``).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.analysis.cox import _fit_cox, benjamini_hochberg, cox_screen, ph_test
from core.errors import AnalysisError

LUNG_VARS = ["age", "ph.karno", "wt.loss"]
ROSSI_VARS = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


@pytest.fixture(scope="module")
def golden(shared_data):
    return json.loads((shared_data / "golden" / "survival_R.json").read_text())


@pytest.fixture(scope="module")
def lung(shared_data) -> pd.DataFrame:
    d = pd.read_csv(shared_data / "golden" / "lung.csv")
    return d.assign(event=(d["status"] == 2).astype(int))     # R coding: 2 = dead


@pytest.fixture(scope="module")
def rossi(shared_data) -> pd.DataFrame:
    return pd.read_csv(shared_data / "golden" / "rossi.csv")


def _lifelines_per_sd(df: pd.DataFrame, time: str, event: str, var: str):
    """lifelines CoxPHFitter on one variable, z-scored over its complete cases (ddof = 1)."""
    from lifelines import CoxPHFitter

    d = df[[time, event, var]].dropna()
    d = d.assign(**{var: (d[var] - d[var].mean()) / d[var].std()})
    fit = CoxPHFitter().fit(d, time, event, fit_options={"precision": 1e-14, "r_precision": 1e-15})
    return fit.summary.loc[var], d


def test_cox_univariate_per_sd_matches_r(lung, golden):
    """R: ``coxph(Surv(time, status) ~ z)`` with z the covariate z-scored over complete cases
    (``cox_univariate_per_sd`` in survival_R.json, survival 3.5-3, Efron ties)."""
    res = cox_screen(lung["time"], lung["event"], lung[LUNG_VARS].to_numpy(), LUNG_VARS).set_index("variable")
    assert list(res.index) == LUNG_VARS
    for v in LUNG_VARS:
        ref = golden["cox_univariate_per_sd"][v]
        assert res.loc[v, "n"] == ref["n"] and res.loc[v, "events"] == ref["events"]
        assert res.loc[v, "hr"] == pytest.approx(ref["hr_per_sd"], rel=1e-5)
        assert res.loc[v, "p"] == pytest.approx(ref["p"], rel=1e-5)
        assert res.loc[v, "ci_lower"] < res.loc[v, "hr"] < res.loc[v, "ci_upper"]


def test_bh_of_univariate_matches_r(lung, golden):
    """R: ``p.adjust(p, method = "BH")`` of the three univariate p-values (``bh_of_univariate``)."""
    ref = golden["bh_of_univariate"]
    np.testing.assert_allclose(benjamini_hochberg(ref["p"]), ref["q"], rtol=1e-9)
    res = cox_screen(lung["time"], lung["event"], lung[ref["names"]].to_numpy(), ref["names"])
    np.testing.assert_allclose(benjamini_hochberg(res["p"].to_numpy()), ref["q"], rtol=1e-5)


def test_bh_hand_computed():
    """Hand computation, m = 4 finite p-values (the NaN is kept and not counted):
    sorted p 0.01, 0.03, 0.04, 0.20 → p·m/rank = 0.04, 0.06, 0.0533…, 0.20; the running minimum from
    the top gives q = 0.04, 0.0533…, 0.0533…, 0.20, returned in the input order."""
    q = benjamini_hochberg([0.01, 0.04, 0.03, np.nan, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, np.nan, 0.20], rtol=1e-12)
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()
    q = benjamini_hochberg(np.linspace(0.5, 1.0, 7))
    assert (q <= 1).all() and (np.diff(q) >= 0).all()
    with pytest.raises(AnalysisError):
        benjamini_hochberg([0.2, 1.5])


def test_concordance_matches_lifelines(lung, rossi):
    """Harrell's C of coef·x against lifelines ``concordance_index(time, -risk, event)`` (lifelines takes
    predicted survival, so a higher risk is passed negated); ties count 1/2 in both."""
    from lifelines.utils import concordance_index

    cases = ((lung, "time", "event", LUNG_VARS), (rossi, "week", "arrest", ["age", "prio", "fin"]))
    for df, time, event, names in cases:
        res = cox_screen(df[time], df[event], df[names].to_numpy(), names).set_index("variable")
        for v in names:
            d = df[[time, event, v]].dropna()
            risk = np.sign(np.log(res.loc[v, "hr"])) * d[v]
            ref = concordance_index(d[time], -risk, d[event])
            assert res.loc[v, "c_index"] == pytest.approx(ref, abs=1e-12), v


def test_multivariable_fit_matches_r(lung, golden):
    """R: ``coxph(Surv(time, status) ~ age + sex + ph.ecog, lung)``, Efron and Breslow ties
    (``cox_age_sex_ecog``, ``cox_age_sex_ecog_breslow``) — the fit behind ``ph_test``."""
    d = lung.dropna(subset=["age", "sex", "ph.ecog"])
    args = (d["time"].to_numpy(float), d["event"].to_numpy(float), d[["age", "sex", "ph.ecog"]].to_numpy(float))
    fit = _fit_cox(*args)
    ref = golden["cox_age_sex_ecog"]
    np.testing.assert_allclose(fit.coef, ref["coef"], rtol=1e-7)
    np.testing.assert_allclose(np.sqrt(np.diag(fit.var)), ref["se"], rtol=1e-7)
    breslow = _fit_cox(*args, ties="breslow")
    np.testing.assert_allclose(breslow.coef, golden["cox_age_sex_ecog_breslow"]["coef"], rtol=1e-7)


@pytest.mark.parametrize("transform", ["km", "rank"])
def test_cox_zph_matches_r(lung, golden, transform):
    """R: ``cox.zph(coxph(Surv(time, status) ~ age + sex + ph.ecog, lung), transform = ...)``
    (``cox_zph_km`` / ``cox_zph_rank``, survival 3.5-3): per-term and GLOBAL chisq and p."""
    ref = golden[f"cox_zph_{transform}"]
    res = ph_test(lung, "time", "event", ["age", "sex", "ph.ecog"], transform=transform)  # drops NA ph.ecog
    assert list(res["term"]) == ref["terms"]
    np.testing.assert_allclose(res["chisq"], ref["chisq"], rtol=1e-6)
    np.testing.assert_allclose(res["p"], ref["p"], rtol=1e-6)
    assert list(res["df"]) == ref.get("df", [1, 1, 1, 3])


def test_ph_test_rejects_bad_input(lung):
    with pytest.raises(AnalysisError, match="transform"):
        ph_test(lung, "time", "event", ["age"], transform="identity")
    with pytest.raises(AnalysisError, match="no column"):
        ph_test(lung, "time", "event", ["age", "stage"])
    with pytest.raises(AnalysisError, match="does not vary"):
        ph_test(lung.assign(one=1.0), "time", "event", ["age", "one"])
    with pytest.raises(AnalysisError, match="0 \\(censored\\)"):
        ph_test(lung, "time", "status", ["age"])


def test_screen_equals_lifelines_loop_on_rossi(rossi):
    """cox_screen vs a lifelines CoxPHFitter loop (one z-scored variable at a time, Efron ties)."""
    X = rossi[ROSSI_VARS].to_numpy(float)
    res = cox_screen(rossi["week"], rossi["arrest"], X, ROSSI_VARS).set_index("variable")
    for v in ROSSI_VARS:
        ref, d = _lifelines_per_sd(rossi, "week", "arrest", v)
        assert abs(np.log(res.loc[v, "hr"]) - ref["coef"]) <= 1e-6, v
        assert abs(res.loc[v, "p"] - ref["p"]) <= 1e-6, v
        assert res.loc[v, "n"] == len(d) and res.loc[v, "events"] == d["arrest"].sum()


def test_nan_and_constant_columns(rossi):
    """Missing values: a column is analysed over its own complete cases (equal to lifelines on those
    rows); constant, all-missing and < 2-event columns give NaN rows, not exceptions."""
    rng = np.random.default_rng(3)
    prio = rossi["prio"].to_numpy(float).copy()
    prio[rng.random(len(prio)) < 0.2] = np.nan
    one_event = np.full(len(prio), np.nan)
    dead = np.flatnonzero(rossi["arrest"].to_numpy() == 1)
    one_event[np.flatnonzero(rossi["arrest"].to_numpy() == 0)[:50]] = rng.normal(size=50)
    one_event[dead[0]] = 0.3
    X = np.column_stack([prio, np.ones(len(prio)), np.full(len(prio), np.nan), one_event, rossi["age"]])
    names = ["prio_na", "constant", "empty", "one_event", "age"]
    res = cox_screen(rossi["week"], rossi["arrest"], X, names).set_index("variable")
    ref, d = _lifelines_per_sd(rossi.assign(prio_na=prio), "week", "arrest", "prio_na")
    assert res.loc["prio_na", "n"] == len(d)
    assert abs(np.log(res.loc["prio_na", "hr"]) - ref["coef"]) <= 1e-6
    assert abs(res.loc["prio_na", "p"] - ref["p"]) <= 1e-6
    for v in ("constant", "empty", "one_event"):
        assert res.loc[v, ["hr", "ci_lower", "ci_upper", "p", "c_index"]].isna().all(), v
    assert res.loc["empty", "n"] == 0 and res.loc["one_event", "events"] == 1
    alone = cox_screen(rossi["week"], rossi["arrest"], rossi[["age"]].to_numpy(float), ["age"])
    np.testing.assert_allclose(res.loc["age", ["hr", "p", "c_index"]].to_numpy(float),
                               alone.loc[0, ["hr", "p", "c_index"]].to_numpy(float), rtol=1e-12)


def test_screen_breslow_matches_multivariable_fit(lung, golden):
    """Breslow ties in the vectorised screen agree with the one-covariate Breslow fit, whose
    multivariable form is checked against R above (``cox_age_sex_ecog_breslow``)."""
    res = cox_screen(lung["time"], lung["event"], lung[LUNG_VARS].to_numpy(), LUNG_VARS, ties="breslow")
    for i, v in enumerate(LUNG_VARS):
        d = lung[["time", "event", v]].dropna()
        z = ((d[v] - d[v].mean()) / d[v].std()).to_numpy()[:, None]
        fit = _fit_cox(d["time"].to_numpy(float), d["event"].to_numpy(float), z, ties="breslow")
        assert np.log(res.loc[i, "hr"]) == pytest.approx(fit.coef[0], rel=1e-7, abs=1e-10)


def test_screen_rejects_bad_input():
    t, e = np.array([5.0, 3, 8, 2]), np.array([1, 0, 2, 1])
    with pytest.raises(AnalysisError, match="status == 2"):
        cox_screen(t, e, np.ones((4, 1)), ["a"])
    with pytest.raises(AnalysisError, match="one name per column"):
        cox_screen(t, np.array([1, 0, 1, 1]), np.ones((4, 2)), ["a"])
    with pytest.raises(AnalysisError, match="ties"):
        cox_screen(t, np.array([1, 0, 1, 1]), np.ones((4, 1)), ["a"], ties="exact")


def test_separation_gives_nan_row_and_ph_error():
    """A covariate that orders the deaths perfectly has an infinite MLE (monotone likelihood)."""
    t = np.arange(1, 21.0)
    e = np.r_[np.ones(10), np.zeros(10)]
    noise = np.random.default_rng(0).normal(size=20)
    res = cox_screen(t, e, np.column_stack([-t, noise]), ["separating", "noise"])
    assert res.loc[0, ["hr", "p", "c_index"]].isna().all()
    assert np.isfinite(res.loc[1, ["hr", "p", "c_index"]].to_numpy(float)).all()
    with pytest.raises(AnalysisError, match="does not converge"):
        ph_test(pd.DataFrame({"t": t, "e": e, "x": -t, "y": noise}), "t", "e", ["x", "y"])
