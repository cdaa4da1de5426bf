"""Slide: a predicted gene as a heatmap over the thumbnail; the tissue mask and tile grid preview."""
import streamlit as st

from core.plots import heatmap_overlay
from pages import _ui


def heatmap(model: str, row) -> None:
    genes = _ui.genes(model)
    c1, c2 = st.columns([1, 1])
    gene = c1.selectbox("Gene", genes, index=genes.index("ERBB2") if "ERBB2" in genes else 0, key="gene")
    opacity = c2.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key="opacity")
    tiles = _ui.query("store:heatmap", model, row["run_key"], gene)
    thumb, dims = _ui.thumbnail(row["slide_path"], 1024)
    fig = heatmap_overlay(thumb, dims, tiles, int(row["tile_size"]), title=gene, opacity=opacity)
    st.plotly_chart(fig, width="stretch", key="heatmap")
    st.caption(f"{row['patient']} · {len(tiles)} tiles of {int(row['tile_size'])} px · "
               f"predicted log1p(CP10k) of {gene}: mean {tiles['value'].mean():.2f}, "
               f"range {tiles['value'].min():.2f}–{tiles['value'].max():.2f}")


def tissue_preview(model: str, row) -> None:
    tile_um, mpp = _ui.model_tiling(model)
    override = float(row["mpp"]) if row["mpp_source"] == "override" else None
    image, info = _ui.preview(row["slide_path"], tile_um, mpp, override)
    st.image(image, caption=f"Tissue (green outline), pen ink (red), {info['n_tiles']} tiles of {tile_um:g} µm "
                            f"({info['tile_px']} px at level 0); tissue covers {info['tissue_fraction']:.0%}.",
             width="stretch")


st.header("Slide")
with _ui.guard():
    _ui.flash()
    cohort, model = _ui.sidebar()
    if cohort:
        slides = _ui.query("store:cohort_runs", cohort, model)
        slides = slides[slides["status"].isin(["ok", "needs_mpp", "no_tissue"])]
        if slides.empty:
            st.info("This cohort has no readable slide.")
            st.stop()
        # predicted slides first, then ready ones, each patient's default slide before the others
        slides = slides.assign(_p=slides["run_key"].isna(), _ok=slides["status"] != "ok",
                               _sel=~slides["selected"].fillna(False).astype(bool))
        slides = slides.sort_values(["_p", "_ok", "_sel", "patient", "slide_name"])
        predicted = set(slides.loc[~slides["_p"], "slide_name"])
        slide_name = st.selectbox("Slide", list(slides["slide_name"]), key="slide",
                                  format_func=lambda n: n if n in predicted else f"{n} (not predicted)")
        row = slides[slides["slide_name"] == slide_name].iloc[0]
        if row["status"] == "needs_mpp":
            st.warning(row["message"])
            _ui.mpp_fix_form(cohort, row["slide_name"], row["slide_path"], key="slide")
            st.stop()
        heat_tab, mask_tab = st.tabs(["Heatmap", "Tissue mask and tile grid"])
        with heat_tab:
            if row["run_key"] is None or row["run_key"] != row["run_key"]:
                st.info("Not predicted yet with this model: run `python -m core.cli predict "
                        f"--cohort {cohort}`.")
            else:
                heatmap(model, row)
        with mask_tab:
            tissue_preview(model, row)
