"""Survival statistics checked against an independent textbook computation (numpy).

Expected values come from the product-limit estimator and the Mantel–Haenszel log-rank
statistic written out below (Klein & Moeschberger, Survival Analysis, §4.2 and §7.3), not
from lifelines itself.
"""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.errors import AnalysisError
from core.analysis.survival import km_curve, split_survival


def km_by_hand(time, event):
    out = {}
    s = 1.0
    for t in np.unique(time[event == 1]):
        at_risk = (time >= t).sum()
        d = ((time == t) & (event == 1)).sum()
        s *= 1 - d / at_risk
        out[t] = s
    return out


def logrank_by_hand(t1, e1, t2, e2):
    times = np.unique(np.r_[t1[e1 == 1], t2[e2 == 1]])
    o_minus_e, var = 0.0, 0.0
    for t in times:
        n1, n2 = (t1 >= t).sum(), (t2 >= t).sum()
        d1 = ((t1 == t) & (e1 == 1)).sum()
        d = d1 + ((t2 == t) & (e2 == 1)).sum()
        n = n1 + n2
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    chi2 = o_minus_e ** 2 / var
    return chi2, stats.chi2.sf(chi2, 1)


@pytest.fixture(scope="module")
def brca(shared_data):
    from core.cohort.clinical import read_clinical
    from core.analysis.survival import survival_frame

    clin = read_clinical(shared_data / "clinical" / "TCGA-CDR_BRCA.csv").table
    surv = survival_frame(clin, "OS").merge(
        clin[["bcr_patient_barcode", "age_at_initial_pathologic_diagnosis"]].rename(
            columns={"bcr_patient_barcode": "patient", "age_at_initial_pathologic_diagnosis": "age"}))
    return surv.dropna()


def test_km_matches_product_limit(brca):
    t, e = brca["time"].to_numpy(), brca["event"].to_numpy()
    curve = km_curve(t, e, "all")
    expected = km_by_hand(t, e)
    lookup = dict(zip(curve.timeline, curve.survival))
    for time, s in list(expected.items())[::10]:
        assert lookup[time] == pytest.approx(s, rel=1e-9)


def test_logrank_and_cox_on_real_brca_age(brca):
    result = split_survival(brca, "age", "OS")
    hi = brca[brca["age"] > result.cutoff]
    lo = brca[brca["age"] <= result.cutoff]
    chi2, p = logrank_by_hand(hi["time"].to_numpy(), hi["event"].to_numpy(),
                              lo["time"].to_numpy(), lo["event"].to_numpy())
    assert result.logrank_stat == pytest.approx(chi2, rel=1e-6)
    assert result.logrank_p == pytest.approx(p, rel=1e-6)
    # Older age at diagnosis carries higher mortality in TCGA-BRCA (Liu et al. 2018).
    assert result.cox.hr > 1 and result.cox_continuous.hr > 1
    assert result.cox.ci_lower < result.cox.hr < result.cox.ci_upper
    assert result.n == len(brca) and result.events == int(brca["event"].sum())


def test_too_few_patients_is_a_clear_error():
    df = pd.DataFrame({"time": [1.0, 2, 3], "event": [1, 0, 1], "x": [0.1, 0.2, 0.3]})
    with pytest.raises(AnalysisError, match="too few"):
        split_survival(df, "x", "OS")
