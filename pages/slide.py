"""Slide: thumbnail with a heatmap of a predicted gene (colour bar, opacity)."""
import streamlit as st

from core.plots import heatmap_overlay
from pages import _ui

st.header("Slide")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        runs = _ui.query("store:cohort_runs", cohort, model).dropna(subset=["run_key"])
        if runs.empty:
            st.info("No slide of this cohort has predictions from this model yet.")
            st.stop()
        genes = _ui.genes(model)
        c1, c2, c3 = st.columns([2, 1, 1])
        slide_name = c1.selectbox("Slide", list(runs["slide_name"]), key="slide")
        gene = c2.selectbox("Gene", genes, index=genes.index("ERBB2") if "ERBB2" in genes else 0, key="gene")
        opacity = c3.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key="opacity")
        row = runs[runs["slide_name"] == slide_name].iloc[0]
        tiles = _ui.query("store:heatmap", model, row["run_key"], gene)
        thumb, dims = _ui.thumbnail(row["slide_path"], 1024)
        fig = heatmap_overlay(thumb, dims, tiles, int(row["tile_size"]), title=gene, opacity=opacity)
        st.plotly_chart(fig, width="stretch", key="heatmap")
        st.caption(f"{row['patient']} · {len(tiles)} tiles of {int(row['tile_size'])} px · "
                   f"predicted log1p(CP10k) of {gene}: mean {tiles['value'].mean():.2f}, "
                   f"range {tiles['value'].min():.2f}–{tiles['value'].max():.2f}")
