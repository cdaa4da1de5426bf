"""Cross-modal: gene → the tiles that express it most; tile → its predicted profile and look-alikes."""
import streamlit as st

from core.plots import profile_bars
from pages import _ui


def gallery(df, caption_col: str, n_cols: int = 6) -> None:
    cols = st.columns(n_cols)
    for i, row in enumerate(df.itertuples(index=False)):
        img = _ui.tile_image(row.slide_path, row.x, row.y, row.tile_size)
        cols[i % n_cols].image(img, caption=f"{row.slide_name[:12]} · {getattr(row, caption_col):.2f}",
                               width="stretch")


st.header("Cross-modal")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        _ui.require_model(model)
        runs = _ui.query("store:cohort_runs", cohort, model).dropna(subset=["run_key"])
        if runs.empty:
            st.info("No predictions for this cohort and model yet.")
            st.stop()
        run_keys = tuple(runs["run_key"])
        genes = _ui.genes(model)
        to_tiles, to_genes = st.tabs(["Gene → morphology", "Tile → genes"])
        with to_tiles:
            c1, c2 = st.columns([2, 1])
            gene = c1.selectbox("Gene", genes, index=genes.index("CD8A") if "CD8A" in genes else 0, key="xm_gene")
            k = c2.slider("Tiles", 6, 48, 24, 6, key="xm_k")
            top = _ui.query("core.crossmodal:top_tiles", model, gene, list(run_keys), k)
            st.caption(f"The {len(top)} tiles across {len(run_keys)} slides with the highest predicted {gene}.")
            gallery(top, "value")
        with to_genes:
            c1, c2 = st.columns([2, 1])
            slide_name = c1.selectbox("Slide", list(runs["slide_name"]), key="xm_slide")
            row = runs[runs["slide_name"] == slide_name].iloc[0]
            tile_idx = c2.number_input("Tile index", 0, int(row["n_tiles"]) - 1, 0, key="xm_tile")
            tiles = _ui.query("store:heatmap", model, row["run_key"], genes[0])
            tile = tiles[tiles["tile_idx"] == tile_idx].iloc[0]
            left, right = st.columns([1, 2])
            left.image(_ui.tile_image(row["slide_path"], tile["x"], tile["y"], int(row["tile_size"]), 320),
                       caption=f"tile {tile_idx} at ({tile['x']}, {tile['y']})", width="stretch")
            profile = _ui.query("core.crossmodal:tile_profile", model, row["run_key"], int(tile_idx))
            right.plotly_chart(profile_bars(profile), width="stretch", key="xm_profile")
            st.subheader("Similar tiles across the cohort")
            similar = _ui.query("core.crossmodal:similar_tiles", model, list(run_keys), row["run_key"], int(tile_idx))
            gallery(similar, "similarity")
