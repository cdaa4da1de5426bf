"""Associations: a biomarker against a clinical variable (Mann–Whitney, Kruskal–Wallis, Spearman), a
screen of every gene against one variable with BH q, validation of predictions against measured RNA,
and the cohort table for export."""
import json

import pandas as pd
import streamlit as st

from core.analysis import cohort_stats as cs
from core.analysis.biomarkers import STATS
from core.analysis.report import table_bytes, to_jsonable
from core.safety import safe_filename
from pages import _ui



def _values(cohort, model, stat, spec):
    _, values = _ui.query(cs.resolve, cohort, spec, model_key=model, stat=stat)
    return values


def one_section(cohort, model, stat):
    from core.analysis.assoc_plots import box_figure, box_static, scatter_figure, scatter_static

    spec = _ui.variable_picker(cohort, model, "as_by", label="Biomarker")
    other = _ui.variable_picker(cohort, model, "as_with", label="Against", kinds=("Clinical column", "Measured gene"))
    if not spec or not other:
        return
    res = _ui.query(cs.associate_cohort, cohort, spec, other, model_key=model, stat=stat)
    out = res.to_json()
    m1, m2, m3 = st.columns(3)
    m1.metric("Patients", out["n"])
    m2.metric(out["test"], f"{out['statistic']:.3g}")
    m3.metric("p", f"{out['p']:.3g}")
    for note in out.get("notes", []):
        st.caption(note)
    x = _values(cohort, model, stat, spec)
    y = _ui.query(cs.association_other, cohort, other, model_key=model, stat=stat)
    if out["kind"] == "categorical":
        fig, static = box_figure(x, y, res), (lambda fmt: box_static(x, y, res, fmt=fmt))
        st.dataframe(pd.DataFrame(out.get("groups", [])), hide_index=True, key="as_groups")
    else:
        fig, static = scatter_figure(x, y, res), (lambda fmt: scatter_static(x, y, res, fmt=fmt))
    st.plotly_chart(fig, width="stretch", key="as_fig")
    _ui.downloads("Export", f"tessera_{cohort}_{safe_filename(spec)}_vs_{safe_filename(other)}", {
        "png": lambda: static("png"), "svg": lambda: static("svg"),
        "json": lambda: json.dumps(to_jsonable(res), indent=1, allow_nan=False).encode()}, key="as_one_dl")


def screen_section(cohort, model, stat):
    other = _ui.variable_picker(cohort, model, "as_scr_with", label="Against", kinds=("Clinical column",))
    options = ["predicted"] * bool(model) + (["measured"] if _ui.query(cs.usable_measured, cohort) else [])
    if not other or not options:
        st.info("A screen needs predicted or measured genes and a clinical column.")
        return
    variables = st.radio("Variables", options + (["all"] if len(options) == 2 else []), horizontal=True,
                         key="as_scr_vars")
    table = _ui.query(cs.associate_screen, cohort, other, variables=variables, model_key=model, stat=stat)
    st.metric("BH q < 0.05", f"{int((table['q'] < 0.05).sum())} of {len(table)}",
              help="Benjamini–Hochberg over every variable of this screen.")
    st.dataframe(table, hide_index=True, width="stretch", key="as_scr_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3g")
                                for c in ("statistic", "effect", "p", "q")})
    _ui.downloads("Export", f"tessera_{cohort}_screen_vs_{safe_filename(other)}", {
        "csv": lambda: table_bytes(table, "csv"), "xlsx": lambda: table_bytes(table, "xlsx")}, key="as_scr_dl")


def validation_section(cohort, model, stat):
    from core.analysis.assoc_plots import validation_scatter
    from core.analysis.associations import validation_summary

    if not model:
        st.info("Validation compares predictions with measured RNA: predict the cohort first.")
        return
    if not _ui.query(cs.usable_measured, cohort):
        st.info("This cohort has no measured expression: import a matrix on the Import page "
                "(or `python -m core.cli measured --cohort N --matrix FILE`).")
        return
    table = _ui.query(cs.validate_cohort, cohort, model, stat=stat)
    summary = validation_summary(table)
    m1, m2, m3 = st.columns(3)
    m1.metric("Genes in both", summary.get("n_genes", 0))
    m2.metric("Median Pearson r", f"{summary.get('median_r', float('nan')):.3f}")
    m3.metric("Patients (max per gene)", int(table["n"].max()) if len(table) else 0)
    st.caption("Per gene, over the patients with both: the slide-level prediction (the chosen statistic) "
               "against the measured value. Pearson on the values as stored; Spearman on ranks.")
    st.dataframe(table, hide_index=True, width="stretch", key="as_val_table",
                 column_config={c: st.column_config.NumberColumn(format="%.3g")
                                for c in ("pearson_r", "pearson_p", "spearman_r", "spearman_p")})
    gene = st.selectbox("Scatter of", list(table["gene"]), key="as_val_gene")
    if gene:
        pred = _values(cohort, model, stat, gene)
        meas = _values(cohort, model, stat, f"measured:{gene}")
        r = float(table.loc[table["gene"] == gene, "pearson_r"].iloc[0])
        st.plotly_chart(validation_scatter(pred, meas, gene, r), width="stretch", key="as_val_fig")
    _ui.downloads("Export", f"tessera_{cohort}_validation", {
        "csv": lambda: table_bytes(table, "csv"), "xlsx": lambda: table_bytes(table, "xlsx")}, key="as_val_dl")


def table_section(cohort, model, stat):
    panel = _ui.genes(model) if model else []
    from core.analysis.signatures import library

    measured = _ui.query(cs.usable_measured_genes, cohort)
    options = panel + [f"signature:{n}" for n in library()] * bool(panel) + [f"measured:{g}" for g in measured]
    chosen = st.multiselect("Biomarkers (columns after the clinical ones)", options,
                            default=[g for g in ("CD8A", "MKI67", "ERBB2") if g in panel], key="as_tbl_vars")
    table = _ui.query(cs.cohort_table, cohort, list(chosen), model_key=model, stat=stat)
    st.dataframe(table, hide_index=True, width="stretch", key="as_tbl")
    _ui.downloads("Export", f"tessera_{cohort}_cohort_table", {
        fmt: (lambda fmt=fmt: table_bytes(table, fmt)) for fmt in ("csv", "xlsx", "parquet")}, key="as_tbl_dl")


st.header("Associations")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        model = _ui.predicted_model(cohort, model)
        stat = st.selectbox("Slide statistic (predicted)", list(STATS), key="as_stat")
        t1, t2, t3, t4 = st.tabs(["Biomarker vs clinical", "Screen vs a clinical variable",
                                  "Validation vs measured RNA", "Cohort table"])
        with t1, _ui.guard():
            one_section(cohort, model, stat)
        with t2, _ui.guard():
            screen_section(cohort, model, stat)
        with t3, _ui.guard():
            validation_section(cohort, model, stat)
        with t4, _ui.guard():
            table_section(cohort, model, stat)
