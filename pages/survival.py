"""Survival: a predicted biomarker split at the median, KM curves, log-rank p, Cox HR (95 % CI)."""
import streamlit as st

from core.analysis.biomarkers import STATS, survival_table
from core.vocab import ENDPOINTS
from core.analysis.plots import km_figure
from core.analysis.survival import split_survival
from pages import _ui

st.header("Survival")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        _ui.require_model(model)
        genes = _ui.genes(model)
        c1, c2, c3, c4 = st.columns(4)
        gene = c1.selectbox("Gene", genes, index=genes.index("CD8A") if "CD8A" in genes else 0, key="sv_gene")
        endpoint = c2.selectbox("Endpoint", list(ENDPOINTS), key="sv_endpoint")
        stat = c3.selectbox("Slide statistic", list(STATS), key="sv_stat",
                            help="morans_i: spatial heterogeneity; frac_high: share of tiles above the cohort's 75th percentile")
        split = c4.selectbox("Split", ["median", "tertile"], key="sv_split")
        data = _ui.query(survival_table, cohort, model, gene, endpoint, stat=stat)
        result = split_survival(data, gene, endpoint, split=split)
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("Patients (events)", f"{result.n} ({result.events})",
                  help="Patients in the two groups compared, and their events.")
        if result.n_excluded:
            m1.caption(f"Tertile split: top vs bottom third; the middle third ({result.n_excluded} patients) "
                       "is left out of the curves, the log-rank test and the high-vs-low HR.")
        m2.metric("Log-rank p", f"{result.logrank_p:.3g}")
        m3.metric("Cox HR high vs low", f"{result.cox.hr:.2f}",
                  help=f"95 % CI {result.cox.ci_lower:.2f}–{result.cox.ci_upper:.2f}, p={result.cox.p:.3g}")
        m4.metric("Cox HR per SD", f"{result.cox_continuous.hr:.2f}",
                  help=f"95 % CI {result.cox_continuous.ci_lower:.2f}–{result.cox_continuous.ci_upper:.2f}")
        st.caption(f"HR high vs low {result.cox.hr:.2f} (95 % CI {result.cox.ci_lower:.2f}–"
                   f"{result.cox.ci_upper:.2f}); cut-off {result.cutoff:.3f} ({split}) of the slide-level "
                   f"{stat} of predicted {gene}.")
        st.plotly_chart(km_figure(result), width="stretch", key="km")
        st.download_button("Export table", data.to_csv(index=False), file_name=f"tessera_{cohort}_{gene}_{endpoint}.csv",
                           mime="text/csv", key="sv_export")
