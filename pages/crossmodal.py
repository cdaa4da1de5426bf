"""Cross-modal: gene → the tiles that express it most; tile → its predicted profile and look-alikes."""
import streamlit as st

from core.analysis import crossmodal
from core.analysis.maps import parse_signature
from core.analysis.plots import profile_bars
from core.store.db import Store
from core.vocab import MPP_MAX, MPP_MIN
from pages import _ui


def gallery(df, caption_col: str, n_cols: int = 6) -> None:
    cols = st.columns(n_cols)
    for i, row in enumerate(df.itertuples(index=False)):
        img = _ui.tile_image(row.slide_path, row.x, row.y, row.tile_size)
        cols[i % n_cols].image(img, caption=f"{row.slide_name[:12]} · {getattr(row, caption_col):.2f}",
                               width="stretch")


def patch_query(model_key: str, run_keys: tuple):
    """Upload → the model's tile → predicted profile (vs the cohort) → the most similar tiles."""
    tile_um, model_mpp = _ui.model_tiling(model_key)
    c1, c2 = st.columns([2, 1])
    upload = c1.file_uploader("H&E patch (PNG, JPEG or TIFF)", type=["png", "jpg", "jpeg", "tif", "tiff"],
                              key="xm_upload")
    mpp = c2.number_input("Patch µm per pixel", min_value=MPP_MIN, max_value=MPP_MAX, value=float(model_mpp),
                          step=0.05, format="%.3f", key="xm_patch_mpp",
                          help=f"The model looks at {tile_um:.0f} µm tiles; the patch is cropped/resized to match.")
    if upload is None:
        st.caption(f"Upload a patch of at least {tile_um / 2:.0f} µm; its centre {tile_um:.0f} µm is used.")
        return None
    out = _ui.patch_prediction(model_key, upload.getvalue(), upload.name, float(mpp), tile_um)
    left, right = st.columns([1, 2])
    left.image(out["tile"], caption=f"{upload.name}: {out['note']}", width="stretch")
    profile = _ui.query(crossmodal.patch_profile, model_key, list(run_keys), out["expression"])
    right.plotly_chart(profile_bars(profile), width="stretch", key="xm_patch_profile")
    st.caption("Bars: predicted log1p(CP10k); red = above the cohort's mean of slide means.")
    st.subheader("Most similar tiles across the cohort")
    return _ui.query(crossmodal.similar_to_embedding, model_key, list(run_keys), out["embedding"])


st.header("Cross-modal")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        _ui.require_model(model)
        runs = _ui.query(Store.cohort_runs, cohort, model).dropna(subset=["run_key"])
        if runs.empty:
            st.info("No predictions for this cohort and model yet.")
            st.stop()
        run_keys = tuple(runs["run_key"])
        genes = _ui.genes(model)
        to_tiles, to_genes = st.tabs(["Gene → morphology", "Tile → genes"])
        with to_tiles:
            c1, c2, c3 = st.columns([2, 2, 1])
            gene = c1.selectbox("Gene", genes, index=genes.index("CD8A") if "CD8A" in genes else 0, key="xm_gene")
            signature = c2.text_input("…or a signature (genes separated by commas)", key="xm_sig",
                                      help="Tiles ranked by the mean predicted log1p(CP10k) of these genes.")
            k = c3.slider("Tiles", 6, 48, 24, 6, key="xm_k")
            query_genes = parse_signature(signature, genes) if signature.strip() else [gene]
            what = ", ".join(query_genes) if len(query_genes) > 1 else query_genes[0]
            top = _ui.query(crossmodal.top_tiles, model, query_genes, list(run_keys), k)
            st.caption(f"The {len(top)} tiles across {len(run_keys)} slides with the highest predicted "
                       + (f"mean of {what}." if len(query_genes) > 1 else f"{what}."))
            gallery(top, "value")
        with to_genes:
            source = st.radio("Query", ["A tile of a slide", "An uploaded image patch"], horizontal=True,
                              key="xm_source")
            if source == "A tile of a slide":
                c1, c2 = st.columns([2, 1])
                slide_name = c1.selectbox("Slide", list(runs["slide_name"]), key="xm_slide")
                row = runs[runs["slide_name"] == slide_name].iloc[0]
                tile_idx = c2.number_input("Tile index", 0, int(row["n_tiles"]) - 1, 0, key="xm_tile")
                tiles = _ui.query(Store.heatmap, model, row["run_key"], genes[0])
                tile = tiles[tiles["tile_idx"] == tile_idx].iloc[0]
                left, right = st.columns([1, 2])
                left.image(_ui.tile_image(row["slide_path"], tile["x"], tile["y"], int(row["tile_size"]), 320),
                           caption=f"tile {tile_idx} at ({tile['x']}, {tile['y']})", width="stretch")
                profile = _ui.query(crossmodal.tile_profile, model, row["run_key"], int(tile_idx))
                right.plotly_chart(profile_bars(profile), width="stretch", key="xm_profile")
                st.subheader("Similar tiles across the cohort")
                similar = _ui.query(crossmodal.similar_tiles, model, list(run_keys), row["run_key"],
                                    int(tile_idx))
            else:
                similar = patch_query(model, run_keys)
            if similar is not None:
                gallery(similar, "similarity")
