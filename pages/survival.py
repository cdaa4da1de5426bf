"""Survival: Kaplan–Meier by any variable (risk table, censor ticks, medians, HRs), a univariate Cox
screen of every gene and signature with BH q, and a multivariable Cox model with a PH check."""
import json

import pandas as pd
import streamlit as st

from core.analysis import cohort_stats as cs
from core.analysis.biomarkers import STATS
from core.analysis.report import table_bytes, to_jsonable
from core.safety import safe_filename
from core.vocab import ENDPOINTS
from pages import _ui

SPLITS = ["median", "tertile", "quartile", "optimal", "custom value"]


def km_section(cohort, model, endpoint, stat, unit, horizon, spec, key, *, split=None):
    from core.analysis.km_plots import km_figure, km_static

    if split is None:
        c1, c2, c3 = st.columns(3)
        split = c1.selectbox("Split (continuous variables)", SPLITS, key=f"{key}_split",
                             help="optimal: the maximally selected log-rank cut between the 10th and 90th "
                                  "percentiles, its p-value corrected for the search (Lausen–Schumacher 1992).")
        if split == "custom value":
            split = float(c2.number_input("Cut value", value=0.0, format="%.4f", key=f"{key}_cut"))
        reference = c3.text_input("Reference group (empty: the first)", key=f"{key}_ref") or None
    else:
        reference = None
    res = _ui.query(cs.km_by, cohort, endpoint, spec, model_key=model, stat=stat, split=split, unit=unit,
                    horizon_days=horizon, reference=reference)
    out = res.to_json()
    m1, m2, m3 = st.columns(3)
    m1.metric("Patients (events)", f"{out['n']} ({out['events']})")
    m2.metric("Log-rank p", f"{out['logrank_p']:.3g}", help=f"χ² = {out['logrank_stat']:.2f}, "
              f"{len(out['groups']) - 1} df; over all groups")
    if (out.get("split") or {}).get("method") == "optimal":
        m3.metric("Optimal-cut p (corrected)", f"{out['split']['p']:.3g}" if out["split"]["p"] is not None else "—",
                  help="Lausen–Schumacher correction for searching over cut points; the plain log-rank p "
                       "of the chosen cut overstates the evidence.")
    st.plotly_chart(km_figure(res), width="stretch", key=f"{key}_fig")
    rows = []
    for g in out["groups"]:
        ci = g.get("median_ci") or [None, None]
        rows.append({"group": g["label"], "n": g["n"], "events": g["events"], f"median ({unit})": g["median"],
                     "median 95% CI": _ci(ci), "HR vs reference": g["hr"], "HR 95% CI": _ci(g["hr_ci"]),
                     "p": g.get("hr_p")})
    table = pd.DataFrame(rows)
    st.dataframe(table, hide_index=True, width="stretch", key=f"{key}_groups")
    base = f"tessera_{cohort}_{endpoint}_km_{safe_filename(spec)}"
    _ui.downloads("Export", base, {
        "png": lambda: km_static(res, fmt="png"), "svg": lambda: km_static(res, fmt="svg"),
        "csv": lambda: table_bytes(table, "csv"),
        "json": lambda: json.dumps(to_jsonable(res), indent=1, allow_nan=False).encode()}, key=f"{key}_dl")
    return res


def _ci(ci) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "—"
    return f"{ci[0]:.3g}–{ci[1]:.3g}"



def screen_section(cohort, model, endpoint, stat, unit, horizon):
    from core.analysis.assoc_plots import volcano_figure, volcano_static

    options = ["predicted"] * bool(model) + (["measured"] if _ui.query(cs.usable_measured, cohort) else [])
    if not options:
        st.info("A screen needs predicted or measured genes: predict the cohort, or import a measured matrix.")
        return
    if len(options) == 2:
        options.append("all")
    variables = st.radio("Variables", options, horizontal=True, key="sv_screen_vars",
                         help="predicted: every panel gene and built-in signature; measured: every gene of the "
                              "imported matrix.")
    res = _ui.query(cs.cox_screen_cohort, cohort, endpoint, variables=variables, model_key=model, stat=stat)
    rows = res.rows
    m1, m2, m3 = st.columns(3)
    m1.metric("Patients (events)", f"{res.n} ({res.events})")
    m2.metric("Variables", len(rows))
    m3.metric("BH q < 0.05", int((rows["q"] < 0.05).sum()),
              help="Benjamini–Hochberg over every variable of this screen.")
    st.plotly_chart(volcano_figure(rows), width="stretch", key="sv_volcano")
    st.caption(res.notes[0] if res.notes else "")
    st.dataframe(rows, hide_index=True, width="stretch", key="sv_screen_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3g")
                                for c in ("hr", "ci_lower", "ci_upper", "p", "q", "c_index")})
    base = f"tessera_{cohort}_{endpoint}_cox_screen_{variables}"
    _ui.downloads("Export", base, {
        "csv": lambda: table_bytes(rows, "csv"), "xlsx": lambda: table_bytes(rows, "xlsx"),
        "png": lambda: volcano_static(rows, fmt="png"), "svg": lambda: volcano_static(rows, fmt="svg"),
        "json": lambda: json.dumps(to_jsonable(res), indent=1, allow_nan=False).encode()}, key="sv_screen_dl")
    st.subheader("Kaplan–Meier of a screened variable")
    pick = st.selectbox("Variable (sorted by p)", list(rows["variable"]), key="sv_screen_pick")
    if pick:
        km_section(cohort, model, endpoint, stat, unit, horizon, pick, "sv_screen_km", split="median")


def multivariable_section(cohort, model, endpoint, stat):
    spec = _ui.variable_picker(cohort, model, "sv_mv", label="Biomarker")
    if not spec:
        return
    clinical = _ui.query(cs.usable_clinical, cohort)
    aliases = [a for a in cs.COVARIATE_ALIASES if _ui.query(cs.has_covariate, cohort, a)]
    choices = aliases + [c for c in clinical if c not in aliases]
    c1, c2 = st.columns([3, 1])
    covariates = c1.multiselect("Clinical covariates", choices, default=[a for a in ("age", "stage") if a in aliases],
                                key="sv_mv_covs", help="age, stage (AJCC, sub-stages merged to I–IV), subtype: "
                                "found among the clinical columns. Categorical covariates are dummy-coded against "
                                "their most frequent level.")
    penalizer = c2.number_input("Penaliser (ridge)", min_value=0.0, max_value=10.0, value=0.0, step=0.05,
                                key="sv_mv_pen", help="> 0 stabilises small cohorts; the estimates shrink towards 1.")
    res = _ui.query(cs.cox_multivariable, cohort, endpoint, spec, list(covariates), model_key=model, stat=stat,
                    penalizer=float(penalizer))
    m1, m2 = st.columns(2)
    m1.metric("Patients (events)", f"{res.n} ({res.events})")
    m2.metric("Concordance", f"{res.concordance:.3f}")
    if res.ph_violations:
        st.warning("Proportional hazards rejected (cox.zph test, p < 0.05) for "
                   f"{', '.join(res.ph_violations)}: the HR of that term changes over time, so read it as an "
                   "average. Consider stratifying on it or a time horizon.")
    refs = "; ".join(f"{k}: {v}" for k, v in res.references.items())
    st.dataframe(res.terms, hide_index=True, width="stretch", key="sv_mv_terms",
                 column_config={c: st.column_config.NumberColumn(format="%.3g")
                                for c in ("hr", "ci_lower", "ci_upper", "p")})
    st.caption(" ".join(res.notes) + (f" Reference levels — {refs}." if refs else ""))
    with st.expander("Proportional-hazards check (R cox.zph, KM transform)"):
        st.dataframe(res.ph_test, hide_index=True, key="sv_mv_ph")
    _ui.downloads("Export", f"tessera_{cohort}_{endpoint}_cox_{safe_filename(spec)}", {
        "csv": lambda: table_bytes(res.terms, "csv"),
        "json": lambda: json.dumps(to_jsonable(res), indent=1, allow_nan=False).encode()}, key="sv_mv_dl")


st.header("Survival")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        model = _ui.predicted_model(cohort, model)
        c1, c2, c3, c4 = st.columns(4)
        endpoint = c1.selectbox("Endpoint", list(ENDPOINTS), key="sv_endpoint",
                                help="TCGA-CDR endpoints: overall, disease-specific survival, disease-free and "
                                     "progression-free intervals.")
        stat = c2.selectbox("Slide statistic (predicted)", list(STATS), key="sv_stat",
                            help="morans_i: spatial heterogeneity; frac_high: share of tiles above the cohort's "
                                 "75th percentile")
        unit = c3.selectbox("Time unit", ["months", "days", "years"], key="sv_unit")
        horizon_years = c4.number_input("Horizon (years, 0 = none)", min_value=0.0, max_value=50.0, value=0.0,
                                        step=1.0, key="sv_horizon",
                                        help="Administrative censoring: follow-up beyond it is censored there.")
        horizon = horizon_years * 365.25 or None
        km_tab, screen_tab, mv_tab = st.tabs(["Kaplan–Meier", "Cox screen", "Multivariable Cox"])
        with km_tab, _ui.guard():
            spec = _ui.variable_picker(cohort, model, "sv_km")
            if spec:
                km_section(cohort, model, endpoint, stat, unit, horizon, spec, "sv_km")
        with screen_tab, _ui.guard():
            screen_section(cohort, model, endpoint, stat, unit, horizon)
        with mv_tab, _ui.guard():
            multivariable_section(cohort, model, endpoint, stat)
