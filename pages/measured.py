"""Measured vs predicted: a spatial-transcriptomics section's measured expression next to the model's
prediction at the same spots (one colour scale), the per-gene correlation table and its CSV."""
from pathlib import Path

import streamlit as st

from core.analysis.measured_spatial import (best_gene, measured_vs_predicted, section_thumbnail, shared_range,
                                            sorted_table, spot_maps, table_csv)
from core.safety import md_escape, safe_filename
from core.training.st_compare import compare_section, section_mtime, section_paths
from pages import _ui


@st.cache_data(show_spinner=False, ttl=60)
def found_sections(roots: tuple[str, ...]) -> list[str]:
    return [str(p) for p in section_paths(roots)]


@st.cache_data(show_spinner="Predicting the section's spots…", max_entries=8)
def comparison(path: str, mtime: float, model_key: str):
    # keyed by the section's path + modification time + the model's id@version: predicting costs seconds
    from core.training.stdata import read_section

    return compare_section(_ui.model(model_key), read_section(path))


@st.cache_data(show_spinner=False, max_entries=16)
def thumbnail(image_path: str, mtime: float):
    return section_thumbnail(image_path, 1024)


def pick_section() -> Path | None:
    """A section found under the data roots, or a typed server path (checked against the roots)."""
    roots = tuple(str(r) for r in _ui.settings().data_roots_or_default())
    found = found_sections(roots)
    left, right = st.columns([3, 2])
    chosen = None
    if found:
        _ui.url_seed("mv_section", "section", found)
        chosen = left.selectbox("Section", found, key="mv_section", format_func=lambda p: f"{Path(p).name} — {p}",
                                help="Spatial-transcriptomics sections found in the server's data folders "
                                     "(HER2ST / legacy ST, Visium outs/, .h5ad beside its H&E).")
    else:
        left.info("No spatial-transcriptomics section in the data folders; type the path of one.")
    typed = right.text_input("…or a server path", key="mv_path", placeholder="/data/st/SECTION",
                             help="A section folder or .h5ad inside the data folders: " + ", ".join(roots))
    if typed.strip():
        return _ui.server_path(typed, kind="section path")
    _ui.url_sync({"section": chosen})
    return Path(chosen) if chosen else None


def show(cmp) -> None:
    genes = list(sorted_table(cmp, "r")["gene"])
    _ui.url_seed("mv_gene", "gene", genes)
    if st.session_state.get("mv_gene") not in genes:   # another section or model: back to the best gene
        st.session_state["mv_gene"] = best_gene(cmp)
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    gene = c1.selectbox("Gene", genes, key="mv_gene", help="Sorted by Pearson r, best first.")
    _ui.url_sync({"gene": gene})
    c2.metric("Spots", cmp.n_spots)
    c3.metric("Genes", len(cmp.genes))
    c4.metric("Median r", f"{cmp.median_r:.3f}")
    if cmp.training_notice:
        st.warning(md_escape(cmp.training_notice))
    robust = st.toggle("Robust colour range (2nd–98th percentile)", value=True, key="mv_robust")
    mode = "robust" if robust else "minmax"
    thumb = thumbnail(cmp.image_path, Path(cmp.image_path).stat().st_mtime)
    st.plotly_chart(spot_maps(cmp, gene, thumb, mode=mode), width="stretch", key="mv_maps")
    lo, hi = shared_range(cmp, gene, mode)
    row = cmp.table.set_index("gene").loc[gene]
    st.caption(f"{md_escape(gene)} on {md_escape(cmp.section)}: one colour scale for both maps, {lo:.2f}–{hi:.2f} "
               f"log1p(CP10k) ({'2nd–98th percentile' if robust else 'min–max'} of measured and predicted together). "
               f"Pearson r = {row['pearson_r']:.3f}, Spearman ρ = {row['spearman_rho']:.3f} over {cmp.n_spots} spots"
               + (f"; {cmp.n_dropped} spots left out (their patch leaves the image)" if cmp.n_dropped else "") + ".")
    left, right = st.columns([2, 3])
    left.plotly_chart(measured_vs_predicted(cmp, gene), width="stretch", key="mv_scatter")
    with right:
        st.dataframe(sorted_table(cmp, "r"), hide_index=True, width="stretch", key="mv_table",
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in
                                    ("pearson_r", "spearman_rho", "measured_mean", "predicted_mean")})
        st.caption("Click a column to sort. r and ρ are empty where the measured or predicted values are constant "
                   f"over the spots. Units: {md_escape(cmp.units)}.")
        name = safe_filename(f"{cmp.section}_{cmp.model.split('@')[0]}_measured_vs_predicted.csv")
        st.download_button("Download the table (CSV)", data=table_csv(cmp, "r"), file_name=name, mime="text/csv",
                           key="mv_csv", on_click="ignore")


st.header("Measured vs predicted")
st.caption("A section with measured spatial transcriptomics, the model's prediction at the same spots, and how well "
           "they agree gene by gene. The same table from a shell: `python -m core.cli st-compare --section PATH`.")
with _ui.guard():
    cohort, model = _ui.sidebar()
    _ui.require_model(model)
    path = pick_section()
    if path is not None:
        show(comparison(str(path), section_mtime(path), model))
