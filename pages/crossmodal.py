"""Cross-modal: gene, signature or measured profile → tiles; tile or patch → its top genes and look-alikes.

Every search is :func:`core.analysis.retrieval.retrieve` (the CLI's ``query``), with the space,
caps, bottom-k and clinical filter chosen here."""
import urllib.parse

import streamlit as st

from core.analysis import crossmodal, retrieval
from core.analysis.plots import profile_bars
from core.safety import md_escape
from core.store.db import Store
from core.vocab import MPP_MAX, MPP_MIN
from pages import _ui

SPACE_HELP = {"predicted": "the stored predictions (a gene's value; a profile's z-projection against the cohort)",
              "image": "the model's image embedding (cosine): tiles that look alike",
              "joint": "the joint image ↔ expression space (cosine): tiles whose image matches the profile"}


def slide_link(slide: str, x: int, y: int) -> str:
    """The Slide page at that tile (``at`` = the tile's level-0 top-left)."""
    return "slide?" + urllib.parse.urlencode({"slide": slide, "at": f"{int(x)},{int(y)}"})


def options(prefix: str, spaces: list[str], cohort: str, has_joint: bool) -> dict:
    """The result controls shared by both tabs; returns retrieve()'s keyword arguments."""
    offered = [s for s in spaces if s != "joint" or has_joint]
    c1, c2, c3 = st.columns([2, 1, 1])
    space = c1.radio("Space", offered, horizontal=True, key=f"{prefix}_space",
                     format_func=lambda s: {"predicted": "Predicted", "image": "Image", "joint": "Joint"}[s],
                     help="; ".join(f"{s}: {SPACE_HELP[s]}" for s in offered))
    k = c2.slider("Tiles", 6, 48, 24, 6, key=f"{prefix}_k")
    lowest = c3.toggle("Bottom k", key=f"{prefix}_lowest", help="The lowest-scoring tiles instead, for contrast.")
    with st.expander("Diversity and clinical filter"):
        d1, d2 = st.columns(2)
        per_slide = d1.number_input("At most per slide (0 = no cap)", 0, 48, 0, key=f"{prefix}_cap_slide")
        per_patient = d2.number_input("At most per patient (0 = no cap)", 0, 48, 0, key=f"{prefix}_cap_patient")
        where = clinical_filter(prefix, cohort)
        composition = st.toggle("Compare the results' cell-type composition with the cohort's",
                                key=f"{prefix}_composition")
    return {"space": space, "k": int(k), "lowest": bool(lowest), "per_slide": int(per_slide) or None,
            "per_patient": int(per_patient) or None, "where": where, "composition": composition}


def clinical_filter(prefix: str, cohort: str) -> dict | None:
    from core.analysis.variables import clinical_variables

    clinical = _ui.query(Store.clinical, cohort)
    groups = [c for c, kind in clinical_variables(clinical).items() if kind == "categorical"]
    if not groups:
        return None
    f1, f2 = st.columns([1, 2])
    column = f1.selectbox("Only patients with", ["—"] + groups, key=f"{prefix}_where_col")
    if column == "—":
        return None
    values = sorted(clinical[column].dropna().astype(str).unique())
    chosen = f2.multiselect(f"{column} in", values, key=f"{prefix}_where_vals")
    return {column: chosen} if chosen else None


def show(res: retrieval.Retrieval, cohort: str, model: str, opts: dict) -> None:
    """The results: what found them and what the score means, a gallery, a table with links."""
    for note in res.notes:
        st.info(md_escape(note))
    st.caption(md_escape(f"{len(res.results)} tiles of {res.n_slides} slides, {res.found_by} · {res.space} space. "
                         f"Score: {res.score}."))
    df = res.results
    cols = st.columns(6)
    for i, row in enumerate(df.itertuples(index=False)):
        img = _ui.tile_image(row.slide_path, row.x, row.y, row.tile_size)
        cols[i % 6].image(img, caption=f"#{row.rank} {row.patient} · {row.score:.3g}", width="stretch")
    table = df[["rank", "slide", "patient", "tile", "x", "y", "score"]].assign(
        open=[slide_link(s, x, y) for s, x, y in zip(df["slide"], df["x"], df["y"])])
    st.dataframe(table, hide_index=True, width="stretch", key=f"xm_results_{res.space}",
                 column_config={"open": st.column_config.LinkColumn("Slide page", display_text="open at tile"),
                                "score": st.column_config.NumberColumn(format="%.4g")})
    if opts["composition"] and len(df):
        runs = _ui.query(Store.cohort_runs, cohort, model).dropna(subset=["run_key"])
        comp = _ui.query(retrieval.result_composition, model, df, list(runs["run_key"]))
        st.caption("Predicted cell-type composition: mean over the results' tiles vs over the cohort's tiles.")
        st.dataframe(comp, hide_index=True, width="stretch", key="xm_composition",
                     column_config={c: st.column_config.NumberColumn(format="%.3f")
                                    for c in ("results", "cohort", "difference")})


def find_tiles(cohort: str, model: str, genes: list[str], has_joint: bool) -> None:
    """Gene, signature or measured profile → tiles."""
    from core.analysis.query_inputs import parse_profile_text, read_h5ad_profile
    from core.analysis.signatures import SIGNATURES, available

    kind = st.radio("Query", ["Gene", "Signature", "Profile"], horizontal=True, key="xm_kind")
    query = None
    if kind == "Gene":
        _ui.url_seed("xm_gene", "gene", genes)
        start = {} if "xm_gene" in st.session_state else {"index": genes.index("CD8A") if "CD8A" in genes else 0}
        gene = st.selectbox("Gene", genes, key="xm_gene", **start)
        _ui.url_sync({"gene": gene})
        query = retrieval.Query("gene", genes=[gene])
    elif kind == "Signature":
        from core.analysis.signature_scores import DEFAULT_METHOD, METHODS

        names = available(genes)
        _ui.url_seed("xm_lib", "signature", names)
        _ui.url_seed("xm_method", "method", list(METHODS))
        c1, c2, c3 = st.columns([2, 2, 1])
        library = c1.selectbox("Library signature", ["—"] + names, key="xm_lib",
                               format_func=lambda n: n if n == "—" else f"{n} · {SIGNATURES[n].description}")
        typed = c2.text_input("…or genes separated by commas", key="xm_sig")
        start = {} if "xm_method" in st.session_state else {"index": list(METHODS).index(DEFAULT_METHOD)}
        method = c3.selectbox("Signature score", list(METHODS), key="xm_method",
                              help="; ".join(f"{m}: {d}" for m, d in METHODS.items()), **start)
        spec = typed.strip() or (library if library != "—" else "")
        _ui.url_sync({"signature": library if library != "—" else None, "method": method if spec else None})
        if spec:
            query = retrieval.Query("signature", signature=spec)
    else:
        source = st.radio("Profile from", ["Pasted gene, value pairs", "CSV file", "AnnData (.h5ad) cells"],
                          horizontal=True, key="xm_profile_src")
        if source == "Pasted gene, value pairs":
            text = st.text_area("One 'GENE value' per line (log1p CP10k, e.g. a Visium spot or a marker panel)",
                                key="xm_profile_text", height=140)
            if text.strip():
                query = retrieval.Query("profile", profile=parse_profile_text(text), label="pasted profile")
        elif source == "CSV file":
            up = st.file_uploader("CSV/TSV with gene, value columns", type=["csv", "tsv", "txt"], key="xm_profile_csv")
            if up is not None:
                query = retrieval.Query("profile", profile=parse_profile_text(up.getvalue().decode("utf-8", "replace")),
                                        label=up.name)
        else:
            up = st.file_uploader(".h5ad (counts or log-normalised)", type=["h5ad"], key="xm_profile_h5ad")
            obs = st.text_input("Cells: obs column=value[,value…] (their mean is the query)", key="xm_profile_obs",
                                placeholder="cell_type=T cells")
            if up is not None and obs.strip():
                profile, label = read_h5ad_profile(_ui.saved_upload(up), obs)
                query = retrieval.Query("profile", profile=profile, label=label)
    spaces = ["predicted", "joint"] if kind != "Profile" else ["joint", "predicted"]
    opts = options(f"xm_find_{kind.lower()}", spaces, cohort, has_joint)
    opts["method"] = method if kind == "Signature" else None
    if query is None:
        st.caption("Choose or enter a query.")
        return
    res = _search(cohort, model, query, opts)
    if kind == "Signature" and st.toggle("Per-slide mean and 90th percentile", key="xm_per_slide",
                                         help="The table `python -m core.cli signatures score` prints."):
        from core.analysis.signature_scores import slide_scores

        table, _ = _ui.query(slide_scores, cohort, model, query.signature, opts["method"])
        st.dataframe(table, hide_index=True, width="stretch", key="xm_slide_scores")
    if res is not None:
        show(res, cohort, model, opts)


def _search(cohort: str, model: str, query: retrieval.Query, opts: dict):
    joint = None
    if opts["space"] == "joint" and query.kind in ("gene", "signature", "profile"):
        joint = getattr(_ui.model(model).module, "joint", None)
    kw = {k: opts[k] for k in ("space", "k", "lowest", "per_slide", "per_patient", "where", "method")}
    if joint is None:
        return _ui.query(retrieval.retrieve, cohort, model, query, **kw)
    with Store(_ui.store_path(), read_only=True) as store:   # the model's space is not hashable: no cache
        return retrieval.retrieve(store, cohort, model, query, joint=joint, **kw)


def similar(cohort: str, model: str, runs, has_joint: bool) -> None:
    """A tile of a slide or an uploaded patch → its top genes against the cohort and its look-alikes."""
    run_keys = list(runs["run_key"])
    source = st.radio("Query", ["A tile of a slide", "An uploaded image patch"], horizontal=True, key="xm_source")
    left, right = st.columns([1, 2])
    if source == "A tile of a slide":
        c1, c2 = st.columns([2, 1])
        slide_name = c1.selectbox("Slide", list(runs["slide_name"]), key="xm_slide")
        row = runs[runs["slide_name"] == slide_name].iloc[0]
        tile_idx = int(c2.number_input("Tile index", 0, int(row["n_tiles"]) - 1, 0, key="xm_tile"))
        tiles = _ui.query(Store.heatmap, model, row["run_key"], _ui.genes(model)[0])
        tile = tiles[tiles["tile_idx"] == tile_idx].iloc[0]
        left.image(_ui.tile_image(row["slide_path"], tile["x"], tile["y"], int(row["tile_size"]), 320),
                   caption=f"tile {tile_idx} at ({tile['x']}, {tile['y']})", width="stretch")
        profile = _ui.query(crossmodal.tile_top_genes, model, run_keys, row["run_key"], tile_idx)
        query = retrieval.Query("tile", slide=slide_name, tile=tile_idx)
    else:
        query, profile = patch_query(model, run_keys, left)
        if query is None:
            return
    right.plotly_chart(profile_bars(profile), width="stretch", key="xm_profile")
    right.caption("Top genes by z-score against the cohort's tiles: (predicted − cohort mean) / cohort SD, "
                  "log1p(CP10k). Red: above the cohort.")
    st.subheader("Similar tiles across the cohort")
    opts = options("xm_sim", ["image", "predicted", "joint"], cohort, has_joint)
    res = _ui.query(retrieval.retrieve, cohort, model, query,
                    **{k: opts[k] for k in ("space", "k", "lowest", "per_slide", "per_patient", "where")})
    show(res, cohort, model, opts)


def patch_query(model: str, run_keys: list[str], left):
    """Upload → µm/px (the file's metadata, else the model's, with a warning) → the model's tile."""
    from core.analysis.query_inputs import read_patch

    tile_um, model_mpp = _ui.model_tiling(model)
    upload = st.file_uploader("H&E patch (PNG, JPEG or TIFF)", type=["png", "jpg", "jpeg", "tif", "tiff"],
                              key="xm_upload")
    if upload is None:
        st.caption(f"Upload a patch of at least {tile_um / 2:.0f} µm; its centre {tile_um:.0f} µm is used.")
        return None, None
    _, meta_mpp, source = read_patch(upload.getvalue(), upload.name)
    default = float(meta_mpp or model_mpp)
    mpp = st.number_input("Patch µm per pixel", min_value=MPP_MIN, max_value=MPP_MAX, value=default, step=0.05,
                          format="%.3f", key=f"xm_patch_mpp_{upload.name}",
                          help=f"The model looks at {tile_um:.0f} µm tiles at {model_mpp:g} µm/px; the patch is "
                               "cropped and resized to match.")
    if meta_mpp is None:
        st.warning(md_escape(f"{upload.name} records no µm/px, so {model_mpp:g} (the model's) is assumed. A level-0 "
                             f"crop of a 0.25 or 0.5 µm/px scan is not at {model_mpp:g} µm/px: set its µm/px above."))
    else:
        st.caption(md_escape(f"µm/px {meta_mpp:.3g} from the file ({source})."))
    out = _ui.patch_prediction(model, upload.getvalue(), upload.name, float(mpp), tile_um)
    left.image(out["tile"], caption=f"{upload.name}: {out['note']}", width="stretch")
    patch = {"expression": out["expression"], "embedding": out["embedding"], "joint": out.get("joint")}
    profile = _ui.query(crossmodal.patch_top_genes, model, run_keys, out["expression"])
    return retrieval.Query("patch", patch=patch, label=upload.name), profile


st.header("Cross-modal")
with _ui.guard():
    cohort, model = _ui.sidebar()
    if cohort:
        _ui.require_model(model)
        runs = _ui.query(Store.cohort_runs, cohort, model).dropna(subset=["run_key"])
        if runs.empty:
            st.info("No predictions for this cohort and model yet.")
            st.stop()
        has_joint = bool(_ui.query(Store.has_joint, list(runs["run_key"])))
        if not has_joint:
            st.caption("This cohort's predictions have no joint image ↔ expression space (a model without one, or "
                       "runs made before it shipped): the joint space is not offered.")
        to_tiles, to_genes = st.tabs(["Gene / profile → tiles", "Tile → genes and similar tiles"])
        with to_tiles, _ui.guard():          # a bad query fails this tab with its message, not the page
            find_tiles(cohort, model, _ui.genes(model), has_joint)
        with to_genes, _ui.guard():
            similar(cohort, model, runs, has_joint)
