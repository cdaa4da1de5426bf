"""Survival statistics checked against an independent textbook computation (numpy).

Expected values come from the product-limit estimator and the Mantel–Haenszel log-rank
statistic written out below (Klein & Moeschberger, Survival Analysis, §4.2 and §7.3), not
from lifelines itself.
"""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.analysis.km import kaplan_meier, split_groups
from core.errors import AnalysisError


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
    half = np.where(np.arange(len(t)) % 2 == 0, "a", "b")   # two arbitrary halves, each checked by hand
    res = kaplan_meier(t, e, half)
    for label in ("a", "b"):
        group = res.group(label)
        expected = km_by_hand(t[half == label], e[half == label])
        lookup = dict(zip(group.timeline, group.survival))
        for time, s in list(expected.items())[::10]:
            assert lookup[time] == pytest.approx(s, rel=1e-9)


def test_logrank_on_real_brca_age_median_split(brca):
    split = split_groups(brca["age"].reset_index(drop=True), "median")
    res = kaplan_meier(brca["time"].to_numpy(), brca["event"].to_numpy(), split)
    high = (split.labels == split.categories[1]).to_numpy()
    t, e = brca["time"].to_numpy(), brca["event"].to_numpy()
    chi2, p = logrank_by_hand(t[high], e[high], t[~high], e[~high])
    assert res.logrank_stat == pytest.approx(chi2, rel=1e-6)
    assert res.logrank_p == pytest.approx(p, rel=1e-6)
    # Older age at diagnosis carries higher mortality in TCGA-BRCA (Liu et al. 2018).
    older = res.group(split.categories[1])
    assert older.hr > 1 and older.hr_ci[0] < older.hr < older.hr_ci[1]
    assert res.n == len(brca) and res.events == int(brca["event"].sum())


def test_too_few_events_is_a_clear_error():
    with pytest.raises(AnalysisError, match="events"):
        kaplan_meier([1.0, 2, 3, 4], [1, 0, 0, 0], ["a", "a", "b", "b"])
