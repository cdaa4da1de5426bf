"""Cross-modal: gene or signature → the tiles that score highest; tile → its predicted profile and look-alikes."""
import streamlit as st

from core.analysis import crossmodal
from core.analysis.plots import profile_bars
from core.safety import md_escape
from core.store.db import Store
from core.vocab import MPP_MAX, MPP_MIN
from pages import _ui


def gallery(df, caption_col: str, n_cols: int = 6) -> None:
    cols = st.columns(n_cols)
    for i, row in enumerate(df.itertuples(index=False)):
        img = _ui.tile_image(row.slide_path, row.x, row.y, row.tile_size)
        cols[i % n_cols].image(img, caption=f"{row.slide_name[:12]} · {getattr(row, caption_col):.2f}",
                               width="stretch")


def signature_query(cohort: str, model: str, genes: list[str], run_keys: tuple) -> None:
    """Gene, library signature or typed genes → the top tiles across the cohort (typed text wins,
    then the library choice, then the gene), scored by the chosen method."""
    from core.analysis.signature_scores import DEFAULT_METHOD, METHODS
    from core.analysis.signatures import SIGNATURES, available

    names = available(genes)
    c1, c2, c3 = st.columns([2, 2, 1])
    _ui.url_seed("xm_gene", "gene", genes)
    _ui.url_seed("xm_lib", "signature", names)
    _ui.url_seed("xm_method", "method", list(METHODS))
    start = {} if "xm_gene" in st.session_state else {"index": genes.index("CD8A") if "CD8A" in genes else 0}
    gene = c1.selectbox("Gene", genes, key="xm_gene", **start)
    library = c2.selectbox("…or a library signature", ["—"] + names, key="xm_lib",
                           format_func=lambda n: n if n == "—" else f"{n} · {SIGNATURES[n].description}")
    k = c3.slider("Tiles", 6, 48, 24, 6, key="xm_k")
    c4, c5 = st.columns([3, 2])
    typed = c4.text_input("…or type a signature (genes separated by commas, or a library name)", key="xm_sig")
    start = {} if "xm_method" in st.session_state else {"index": list(METHODS).index(DEFAULT_METHOD)}
    method = c5.selectbox("Signature score", list(METHODS), key="xm_method",
                          help="; ".join(f"{m}: {d}" for m, d in METHODS.items()), **start)
    spec = typed.strip() or (library if library != "—" else "")
    _ui.url_sync({"gene": gene, "signature": library if library != "—" else None,
                  "method": method if spec else None})
    if not spec:
        top = _ui.query(crossmodal.top_tiles, model, [gene], list(run_keys), k)
        st.caption(f"The {len(top)} tiles across {len(run_keys)} slides with the highest predicted {gene}.")
    else:
        top, scoring = _ui.query(crossmodal.signature_top_tiles, model, spec, list(run_keys), k, method=method)
        if scoring.notice:
            st.info(md_escape(scoring.notice))
        source = "" if not scoring.signature.is_library else f" Source: {scoring.signature.source}."
        st.caption(md_escape(f"The {len(top)} tiles across {len(run_keys)} slides with the highest {scoring.name} "
                             f"score by {scoring.describe()}. Reference: {scoring.n_tiles} tiles of "
                             f"{scoring.n_runs} slides.{source}"))
        if st.toggle("Per-slide mean and 90th percentile", key="xm_per_slide",
                     help="The table `python -m core.cli signatures score` prints."):
            from core.analysis.signature_scores import slide_scores

            table, _ = _ui.query(slide_scores, cohort, model, spec, method)
            st.dataframe(table, hide_index=True, width="stretch", key="xm_slide_scores")
    gallery(top, "value")


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
        with to_tiles, _ui.guard():          # a bad signature fails this tab with its message, not the page
            signature_query(cohort, model, genes, run_keys)
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
