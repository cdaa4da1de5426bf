"""Slide: predicted genes, signatures or nucleus densities as heatmaps over the thumbnail (one, or two
side by side); the tissue mask and tile grid preview."""
import streamlit as st

from core.analysis.maps import layer_tiles
from core.analysis.plots import heatmap_overlay
from core.store.db import Store
from core.vocab import READABLE_STATUSES, SlideStatus
from pages import _ui


def pick_layer(model: str, row, key: str, default: str, has_nuclei: bool) -> str:
    """A gene, a signature, or (when the run counted them) a class of nuclei."""
    from core.analysis.maps import nuclei_layers, parse_signature

    genes = _ui.genes(model)
    options = [f"gene:{g}" for g in genes] + ["sig:"] + (nuclei_layers() if has_nuclei else [])
    labels = {"sig:": "Signature (mean of several genes)…"}
    labels.update({o: f"Nuclei: {o.split(':')[1]} (per mm²)" for o in nuclei_layers()})
    index = options.index(f"gene:{default}") if f"gene:{default}" in options else 0
    choice = st.selectbox("Layer", options, index=index, key=f"layer_{key}",
                          format_func=lambda o: labels.get(o, o.split(":", 1)[1]))
    if choice == "sig:":
        text = st.text_input("Signature genes", "CD8A, CD3E, GZMB" if "GZMB" in genes else ", ".join(genes[:3]),
                             key=f"sig_{key}", help="Predicted log1p(CP10k) averaged over these genes, per tile.")
        choice = "sig:" + ",".join(parse_signature(text, genes))
    return choice


def heatmap(model: str, row, key: str, default: str, opacity: float) -> None:
    from core.analysis.maps import layer_title

    has_nuclei = _ui.query(Store.has_nuclei, row["run_key"])
    layer = pick_layer(model, row, key, default, has_nuclei)
    tile_um, _ = _ui.model_tiling(model)
    tiles = _ui.query(layer_tiles, model, row["run_key"], layer, tile_um)
    title = layer_title(layer)
    thumb, dims = _ui.thumbnail(row["slide_path"], 1024)
    fig = heatmap_overlay(thumb, dims, tiles, int(row["tile_size"]), title=title.split(" (")[0], opacity=opacity,
                          colorscale="Magma" if layer.startswith("nuclei:") else "Viridis")
    st.plotly_chart(fig, width="stretch", key=f"heatmap_{key}")
    unit = "" if layer.startswith("nuclei:") else "predicted log1p(CP10k) of "
    st.caption(f"{row['patient']} · {len(tiles)} tiles of {int(row['tile_size'])} px · {unit}{title}: "
               f"mean {tiles['value'].mean():.2f}, range {tiles['value'].min():.2f}–{tiles['value'].max():.2f}")


def heatmaps(model: str, row) -> None:
    c1, c2 = st.columns([1, 1])
    compare = c1.toggle("Side by side", value=False, key="compare",
                        help="Two layers of the same slide next to each other (e.g. a gene and a signature).")
    opacity = c2.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key="opacity")
    # each layer has its own guard: a bad signature fails that layer with its message, not the page
    if not compare:
        with _ui.guard():
            heatmap(model, row, "a", "ERBB2", opacity)
        return
    left, right = st.columns(2)
    with left, _ui.guard():
        heatmap(model, row, "a", "ERBB2", opacity)
    with right, _ui.guard():
        heatmap(model, row, "b", "CD8A", opacity)


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
        slides = _ui.query(Store.cohort_runs, cohort, model)
        slides = slides[slides["status"].isin(READABLE_STATUSES)]
        if slides.empty:
            st.info("This cohort has no readable slide.")
            st.stop()
        # predicted slides first, then ready ones, each patient's default slide before the others
        slides = slides.assign(_p=slides["run_key"].isna(), _ok=slides["status"] != SlideStatus.OK,
                               _sel=~slides["selected"].fillna(False).astype(bool))
        slides = slides.sort_values(["_p", "_ok", "_sel", "patient", "slide_name"])
        predicted = set(slides.loc[~slides["_p"], "slide_name"])
        slide_name = st.selectbox("Slide", list(slides["slide_name"]), key="slide",
                                  format_func=lambda n: n if n in predicted else f"{n} (not predicted)")
        row = slides[slides["slide_name"] == slide_name].iloc[0]
        if row["status"] == SlideStatus.NEEDS_MPP:
            st.warning(row["message"])
            _ui.mpp_fix_form(cohort, row["slide_name"], row["slide_path"], key="slide")
            st.stop()
        heat_tab, mask_tab = st.tabs(["Heatmap", "Tissue mask and tile grid"])
        with heat_tab:
            if row["run_key"] is None or row["run_key"] != row["run_key"]:
                _ui.not_predicted(cohort)
            else:
                heatmaps(model, row)
        with mask_tab, _ui.guard():
            tissue_preview(model, row)
