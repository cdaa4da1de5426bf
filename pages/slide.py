"""Slide: a deep-zoom viewer of the H&E (read from the pyramid on demand) with predicted genes,
signatures, nucleus densities or spatial domains as an aligned overlay; 2–4 slides (or 2–4 layers)
side by side on one colour scale with synced zoom; click a tile for its full-resolution H&E and
profile; the tissue mask and tile grid preview. The URL carries the view."""
import streamlit as st

from core.analysis import cell_view, slideview
from core.analysis.overlay import COLORMAPS
from core.safety import md_escape
from core.store.db import Store
from core.vocab import READABLE_STATUSES, SlideStatus
from pages import _ui, _viewer

VIEWS = ("Slide", "Compare slides", "Compare layers")
RANGES = {"slide": "This slide", "shown": "Slides shown together", "cohort": "Whole cohort", "custom": "Custom"}
CUSTOM_SIG = "sig:*"
RESOLUTIONS = {1.0: "default grid", 0.5: "½ tile", 0.25: "¼ tile"}


def layer_options(model: str, has_nuclei: bool, has_domains: bool, has_cells: bool = False
                  ) -> tuple[list[str], dict[str, str]]:
    from core.analysis.maps import nuclei_layers
    from core.analysis.signatures import library

    genes = _ui.genes(model)
    upper = {g.upper() for g in genes}
    sigs = [n for n, gs in library().items() if any(g.upper() in upper for g in gs)]
    options = [f"gene:{g}" for g in genes] + [f"sig:{n}" for n in sigs] + [CUSTOM_SIG]
    options += nuclei_layers() if has_nuclei else []
    options += [slideview.DOMAIN_LAYER] if has_domains else []
    options += [cell_view.CELL_LAYER_TYPE, cell_view.CELL_LAYER_GENE] if has_cells else []
    labels = {CUSTOM_SIG: "Signature · your own genes…", slideview.DOMAIN_LAYER: "Spatial domains (cohort)",
              cell_view.CELL_LAYER_TYPE: "Cells · by type", cell_view.CELL_LAYER_GENE: "Cells · a gene…"}
    labels.update({f"sig:{n}": f"Signature · {n}" for n in sigs})
    labels.update({o: f"Nuclei · {o.split(':')[1]} per mm²" for o in nuclei_layers()})
    return options, labels


def pick_layer(options, labels, key: str, default: str, model: str | None = None) -> str:
    """One layer (a select box; a signature also gets its scoring method, a cell layer by gene its
    gene: ``cells:gene:<SYMBOL>``)."""
    if st.session_state.get(key) not in options:       # first run, or a layer this slide lacks (its cells)
        st.session_state[key] = default if default in options else options[0]
    c1, c2 = st.columns([3, 2])
    choice = c1.selectbox("Layer", options, key=key, format_func=lambda o: labels.get(o, o.split(":", 1)[-1]))
    if choice == CUSTOM_SIG:
        text = c2.text_input("Genes", "CD8A, CD3E, GZMB", key=f"{key}_genes",
                             help="Gene symbols of the model's panel, separated by commas.")
        choice = "sig:" + ",".join(t.strip() for t in text.replace(";", ",").split(",") if t.strip())
    if choice == cell_view.CELL_LAYER_GENE:
        genes = _ui.genes(model)
        gkey = f"{key}_cell_gene"
        if st.session_state.get(gkey) not in genes:
            st.session_state[gkey] = "ERBB2" if "ERBB2" in genes else genes[0]
        gene = c2.selectbox("Gene", genes, key=gkey, help="Each cell coloured by its value of this gene "
                            "(from its type's reference profile and its tile's prediction).")
        choice = f"{cell_view.CELL_LAYER_GENE}:{gene}"
    if choice.startswith("sig:"):
        _ui.url_seed(f"{key}_method", "method", ["score_genes", "mean_z"])
        method = c2.selectbox("Scoring", ["score_genes", "mean_z"], key=f"{key}_method",
                              help="score_genes: mean of the set minus the mean of expression-matched control "
                                   "genes (scanpy). mean_z: mean of the genes, each z-scored over the tiles of "
                                   "every slide this model predicted.")
        choice = f"{choice}@{method}"
    _ui.url_sync({"method": method if choice.startswith("sig:") else None})
    return choice


def layer_of(model, cohort, row, layer, tile_um):
    return _ui.query(slideview.layer_frame, cohort, model, row["run_key"], layer, tile_um)


@st.cache_data(show_spinner=False, max_entries=256)
def overlay(tiles, tile_size, width, height, vmin, vmax, cmap, tissue_min, n_categories, step=None, smooth=False):
    return slideview.overlay_view(tiles, tile_size, width, height, vmin=vmin, vmax=vmax, cmap=cmap,
                                  tissue_min=tissue_min, categories=n_categories, step=step, smooth=smooth)


@st.cache_data(show_spinner=False, max_entries=64)
def cell_overlay(cells, n_types, width, height, mpp, by, vmin, vmax, cmap, outline):
    return cell_view.cell_view(cells, n_types, width, height, mpp, by=by, vmin=vmin, vmax=vmax, cmap=cmap,
                               outline=outline)


def panel(row, tiles, labels, layer_name, vrange, display, marker=None, *, step: int | None = None,
          smooth: bool = False) -> dict:
    """One viewer panel. ``step``: a high-resolution run's grid step (its tiles colour their
    central step × step cells); its summary strip is computed on its default-grid tiles."""
    tile_size = int(row["tile_size"])
    w, h = int(row["width"]), int(row["height"])
    view = overlay(tiles, tile_size, w, h, vrange[0], vrange[1], display["cmap"], display["tissue_min"],
                   len(labels) if labels else None, step, smooth)
    legend = slideview.category_legend(labels) if labels else slideview.legend(vrange[0], vrange[1], display["cmap"])
    if labels:
        caption = f"{len(tiles)} tiles"
    elif step:
        on_grid = slideview.default_grid_tiles(tiles, tile_size)
        caption = (f"{len(tiles)} overlapping tiles, one value every {step} px · summary on the default grid: "
                   + slideview.summary_caption(slideview.layer_summary(on_grid, tile_size)))
    else:
        caption = slideview.summary_caption(slideview.layer_summary(tiles, tile_size))
    return {"token": _viewer.slide_token(row["slide_path"]), "width": w, "height": h, "dzi": _viewer.DZI,
            "title": f"{row['slide_name']} · {layer_name}", "caption": caption, "legend": legend,
            "overlay": {"url": view.url, "width_px": view.width_px, "x_px": view.x_px, "y_px": view.y_px},
            "marker": marker}


def color_range(frames: list, scope: str, robust: bool, cohort_values=None, custom=(0.0, 1.0)) -> list[tuple]:
    mode = "robust" if robust else "minmax"
    if scope == "custom":
        return [tuple(custom)] * len(frames)
    if scope == "cohort" and cohort_values is not None:
        return [slideview.shared_range([cohort_values], mode)] * len(frames)
    if scope == "shown":
        return [slideview.shared_range([f["value"].to_numpy() for f in frames], mode)] * len(frames)
    return [slideview.shared_range([f["value"].to_numpy()], mode) for f in frames]


def display_controls(scopes: list[str], tissue: bool = True) -> dict:
    c1, c2, c3, c4 = st.columns([2, 2, 2, 2])
    _ui.url_seed("cmap", "cmap", list(COLORMAPS))
    cmap = c1.selectbox("Colour map", list(COLORMAPS), key="cmap")
    opacity = c2.slider("Opacity", 0.0, 1.0, 0.55, 0.05, key="opacity")
    _ui.url_seed("scale", "scale", scopes)
    if "scale" in st.session_state and st.session_state["scale"] not in scopes:
        del st.session_state["scale"]
    scope = c3.selectbox("Colour scale", scopes, key="scale", format_func=RANGES.get)
    tissue_min = c4.slider("Hide tiles with tissue below", 0.0, 1.0, 0.0, 0.05, key="tissue_min",
                           help="Tissue-only display: tiles whose tissue fraction is lower are not coloured.") \
        if tissue else 0.0
    robust = st.toggle("Robust range (2nd–98th percentile)", value=False, key="robust")
    custom = (0.0, 1.0)
    if scope == "custom":
        a, b = st.columns(2)
        custom = (a.number_input("From", value=0.0, key="vmin"), b.number_input("To", value=3.0, key="vmax"))
        if not custom[1] > custom[0]:
            st.warning("The colour range must go up: ‘To’ is set above ‘From’.")
            custom = (custom[0], custom[0] + 1e-6)
    return {"cmap": cmap, "opacity": opacity, "scope": scope, "robust": robust, "custom": custom,
            "tissue_min": tissue_min or None}


def tile_details(model: str, row, tiles_by_layer: dict, x: int, y: int, categories: dict | None = None,
                 step: int | None = None):
    """The clicked tile: H&E at full resolution, each shown layer's value there (a domain's name for
    the domain layer: ``categories`` = layer name → labels), and its top predicted genes. Returns
    the tile (or None). ``step``: a high-resolution layer's grid step (the tile whose centre cell
    was clicked; its profile is read from ``row``'s run)."""
    from core.analysis import crossmodal
    from core.analysis.plots import profile_bars

    tile_size = int(row["tile_size"])
    first = next(iter(tiles_by_layer.values()))
    hit = slideview.tile_at(first, x, y, tile_size, step)
    if hit is None:
        st.caption(md_escape(f"({x}, {y}) on {row['slide_name']} is background: no tile was predicted there."))
        return None
    st.subheader(md_escape(f"Tile {int(hit['tile_idx'])} of {row['slide_name']} at ({int(hit['x'])}, {int(hit['y'])}) px"))
    left, mid, right = st.columns([2, 2, 3])
    out_px = min(tile_size, 1024)
    left.image(_ui.tile_image(row["slide_path"], int(hit["x"]), int(hit["y"]), tile_size, out_px),
               caption=f"H&E at full resolution ({tile_size} px at level 0)", width="stretch")
    values = []
    for name, frame in tiles_by_layer.items():
        match = frame[frame["tile_idx"] == hit["tile_idx"]]
        value = float(match["value"].iloc[0]) if len(match) else float("nan")
        labels = (categories or {}).get(name)
        if labels:
            values.append({"layer": name, "value": labels[int(value)] if value == value else "—", "slide mean": ""})
        else:
            values.append({"layer": name, "value": f"{value:.3g}", "slide mean": f"{frame['value'].mean():.3g}"})
    mid.dataframe(values, hide_index=True, width="stretch")
    profile = _ui.query(crossmodal.tile_profile, model, row["run_key"], int(hit["tile_idx"]), top=12)
    right.plotly_chart(profile_bars(profile), width="stretch", key="tile_profile")
    right.caption("Top predicted genes of the tile, log1p(CP10k); red = above the slide's mean.")
    return hit


def seed_click(key: str, row) -> None:
    """A link's ``?at=x,y`` (level-0 px, e.g. from a Cross-modal result) opens the slide with that
    tile selected, once per page visit; a value off the slide is ignored with a notice."""
    seeded = st.session_state.setdefault("_at_seeded", set())
    raw = st.query_params.get("at")
    if not raw or (key, raw) in seeded:
        return
    seeded.add((key, raw))
    try:
        x, y = (int(v) for v in str(raw).split(","))
    except ValueError:
        x = y = -1
    if not (0 <= x < int(row["width"]) and 0 <= y < int(row["height"])):
        _ui.notice(f"The link's at={raw} is not a point of this slide; showing the whole slide.")
        return
    size = int(row["tile_size"])
    st.session_state[key] = {"panel": 0, "x": x + size // 2, "y": y + size // 2, "n": 0}


def marker_for(click, index, row, tiles=None, step: int | None = None) -> dict | None:
    if not click or click.get("panel") != index:
        return None
    size = int(row["tile_size"])
    if step and tiles is not None:         # overlapping tiles: the one whose centre cell was clicked
        hit = slideview.tile_at(tiles, click["x"], click["y"], size, step)
        return None if hit is None else {"x": int(hit["x"]), "y": int(hit["y"]), "size": size}
    return {"x": (click["x"] // size) * size, "y": (click["y"] // size) * size, "size": size}


def custom_signature_seed(key: str):
    """A link's ``layer=sig:G1,G2`` (typed genes, not a library set) → the custom-genes widgets."""
    def seeds(raw: str) -> dict | None:
        gene = cell_view.cell_gene(raw)
        if gene and len(gene) <= 100:         # ``cells:gene:ERBB2``: checked against the panel when drawn
            return {key: cell_view.CELL_LAYER_GENE, f"{key}_cell_gene": gene}
        genes = raw[4:] if raw.startswith("sig:") else ""
        if not genes or len(genes) > 2000:
            return None
        return {key: CUSTOM_SIG, f"{key}_genes": ", ".join(g for g in genes.split(",") if g)}
    return seeds


def resolution_control(model, row, layer: str) -> tuple[object, int | None, bool]:
    """The Resolution control (default grid | ½ tile | ¼ tile) when the slide has high-resolution
    runs and the layer is a gene or a signature: (the row of the chosen run, its grid step or None,
    smooth)."""
    from core.wsi.tiling import grid_step

    if not layer.startswith(("gene:", "sig:")) or not isinstance(row.get("fingerprint"), str):
        return row, None, False
    runs = _ui.query(Store.high_res_runs, model, row["fingerprint"], float(row["mpp"]))
    strides = [float(x) for x in runs["stride"] if float(x) in RESOLUTIONS] if len(runs) else []
    if not strides:
        return row, None, False
    choices = [RESOLUTIONS[1.0]] + [RESOLUTIONS[x] for x in sorted(set(strides), reverse=True)]
    c1, c2 = st.columns([3, 2])
    if st.session_state.get("resolution") not in choices:
        st.session_state["resolution"] = choices[0]
    label = c1.segmented_control("Resolution", choices, key="resolution",
                                 help="A high-resolution run (predict --stride ½ or ¼) has overlapping tiles "
                                      "every ½ or ¼ tile: each tile's value is drawn in the central cell of "
                                      "its tile, one cell per step.") or choices[0]
    stride = next(x for x, name in RESOLUTIONS.items() if name == label)
    if stride == 1.0:
        return row, None, False
    smooth = c2.toggle("Smooth", value=True, key="hr_smooth",
                       help="A Gaussian smoothing of one cell, drawn four times finer.")
    hr = runs[runs["stride"].astype(float) == stride].iloc[0]
    chosen = row.copy()
    chosen["run_key"], chosen["n_tiles"] = hr["run_key"], hr["n_tiles"]
    return chosen, grid_step(int(hr["tile_size"]), stride), bool(smooth)


def single(cohort, model, slides, row, options, labels, tile_um) -> None:
    _ui.url_seed("layer_a", "layer", options, fallback=custom_signature_seed("layer_a"))
    layer = pick_layer(options, labels, "layer_a", "gene:ERBB2", model)
    if cell_view.is_cell_layer(layer):
        return cells_single(cohort, model, row, layer, labels)
    display = display_controls(["slide", "cohort", "custom"])
    shown, step, smooth = resolution_control(model, row, layer)
    tiles, cats, note = layer_of(model, cohort, shown, layer, tile_um)
    if note:
        st.caption(note)
    cohort_vals = None
    if display["scope"] == "cohort" and not cats:
        keys = [k for k in slides["run_key"] if isinstance(k, str)]
        cohort_vals = _ui.query(slideview.cohort_values, cohort, model, keys, layer, tile_um)
    vrange = color_range([tiles], display["scope"], display["robust"], cohort_vals, display["custom"])[0]
    ckey = f"click_single_{row['slide_name']}"
    seed_click(ckey, row)
    click = st.session_state.get(ckey)
    name = labels.get(layer.split("@")[0], layer.split(":", 1)[-1])
    panels = [panel(shown, tiles, cats, name, vrange, display, marker_for(click, 0, shown, tiles, step),
                    step=step, smooth=smooth)]
    click = _viewer.viewer(panels, opacity=display["opacity"], key=ckey)
    _ui.url_sync({"slide": row["slide_name"], "layer": layer.split("@")[0] if layer.startswith("sig:") else layer,
                  "view": None, "slides": None, "layers": None, "cmap": display["cmap"], "scale": display["scope"]})
    if click:
        tile_details(model, shown, {name: tiles}, int(click["x"]), int(click["y"]), {name: cats}, step)
    else:
        st.caption("Scroll or pinch to zoom down to full resolution; drag to pan; click a tile for its H&E and profile.")
    export(cohort, model, [row["slide_name"]], [layer], figure_of(display, vrange))


def cells_single(cohort, model, row, layer: str, labels: dict) -> None:
    """The cell layer: every cell of the slide's cells run drawn as its nucleus ellipse (filled or
    outlined), by type or by a gene's per-cell value; the slide's (and a clicked tile's) cell-type
    composition below."""
    gene = cell_view.cell_gene(layer)
    display = display_controls(["slide", "custom"], tissue=False) if gene else {
        "cmap": "viridis", "scope": "slide", "robust": False, "custom": (0.0, 1.0), "tissue_min": None,
        "opacity": st.slider("Opacity", 0.0, 1.0, 0.8, 0.05, key="cell_opacity")}
    outline = st.toggle("Outlines only", value=False, key="cell_outline",
                        help="Draw each nucleus as its outline ellipse, so the H&E shows through.")
    cells, types = _ui.query(cell_view.load_cells, model, row["run_key"], gene)
    by = "value" if gene else "type"
    vrange = color_range([cells], display["scope"], display["robust"], None, display["custom"])[0] if gene else (0.0, 1.0)
    w, h, mpp = int(row["width"]), int(row["height"]), float(row["mpp"])
    if cell_view.image_scale(w, h, cell_view.MAX_PX) > 1:
        # too large for one image at the slide's resolution: the endpoint draws it tile by tile
        key = f"cells|{row['run_key']}|{gene}|{by}|{vrange[0]!r}|{vrange[1]!r}|{display['cmap']}|{outline}"
        overlay = {"tiled": _viewer.overlay_token(key, w, h, lambda: cell_view.CellPyramid(
            cells, len(types), mpp, by=by, vmin=vrange[0], vmax=vrange[1], cmap=display["cmap"], outline=outline)),
            "x_px": 0, "y_px": 0}
    else:
        view = cell_overlay(cells, len(types), w, h, mpp, by, vrange[0], vrange[1], display["cmap"], outline)
        overlay = {"url": view.url, "width_px": view.width_px, "x_px": 0, "y_px": 0}
    legend = slideview.legend(vrange[0], vrange[1], display["cmap"]) if gene else cell_view.type_legend(types)
    name = f"Cells · {gene}" if gene else "Cells · by type"
    ckey = f"click_cells_{row['slide_name']}"
    click = st.session_state.get(ckey)
    tiles = _ui.query(Store.run_expression, model, row["run_key"], [])[0]
    per_tile = cell_view.tile_values(tiles, cells, by=by)
    panels = [{"token": _viewer.slide_token(row["slide_path"]), "width": w, "height": h, "dzi": _viewer.DZI,
               "title": f"{row['slide_name']} · {name}", "legend": legend,
               "caption": cell_view.summary_caption(cells, types, mpp, w, h),
               "overlay": overlay, "marker": marker_for(click, 0, row)}]
    click = _viewer.viewer(panels, opacity=display["opacity"], key=ckey)
    _ui.url_sync({"slide": row["slide_name"], "layer": layer, "view": None, "slides": None, "layers": None,
                  "cmap": display["cmap"] if gene else None, "scale": None, "method": None})
    hit = None
    if click:
        value_name = f"{gene}, mean of the tile's cells" if gene else "cells in the tile"
        hit = tile_details(model, row, {value_name: per_tile}, int(click["x"]), int(click["y"]))
    else:
        st.caption("Zoom in to see each cell; click a tile for its H&E, profile and cell-type composition.")
    comp = cell_view.composition(cells, types, None if hit is None else int(hit["tile_idx"]))
    st.markdown("**Cell-type composition**" + ("" if hit is None else f" · slide and tile {int(hit['tile_idx'])}"))
    fraction = st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0)
    st.dataframe(comp, hide_index=True, width="stretch", key="cell_comp",
                 column_config={"slide": fraction, "tile": fraction})


def compare_slides(cohort, model, slides, row, options, labels, tile_um) -> None:
    predicted = [n for n, k in zip(slides["slide_name"], slides["run_key"]) if isinstance(k, str)]
    if len(predicted) < 2:
        st.info("Comparing needs at least two predicted slides in this cohort.")
        return
    _ui.url_seed("cmp_slides", "slides", predicted, multi=True)
    if "cmp_slides" not in st.session_state:
        st.session_state["cmp_slides"] = [row["slide_name"]] + [n for n in predicted if n != row["slide_name"]][:1]
    chosen = st.multiselect("Slides (2–4)", predicted, key="cmp_slides", max_selections=4)
    options = [o for o in options if not cell_view.is_cell_layer(o)]
    _ui.url_seed("layer_c", "layer", options)
    layer = pick_layer(options, labels, "layer_c", "gene:ERBB2")
    display = display_controls(["shown", "cohort", "custom"])
    sync = st.toggle("Sync zoom and pan", value=True, key="sync")
    if len(chosen) < 2:
        st.info("Choose two to four slides.")
        return
    rows = [slides[slides["slide_name"] == n].iloc[0] for n in chosen]
    frames = [layer_of(model, cohort, r, layer, tile_um) for r in rows]
    cats = frames[0][1]
    if frames[0][2]:
        st.caption(frames[0][2])
    cohort_vals = None
    if display["scope"] == "cohort" and not cats:
        cohort_vals = _ui.query(slideview.cohort_values, cohort, model, [k for k in slides["run_key"] if isinstance(k, str)],
                                layer, tile_um)
    ranges = color_range([f[0] for f in frames], display["scope"], display["robust"], cohort_vals, display["custom"])
    name = labels.get(layer.split("@")[0], layer.split(":", 1)[-1])
    ckey = "click_cmp_" + "|".join(chosen)
    click = st.session_state.get(ckey)
    panels = [panel(r, f[0], f[1], name, rg, display, marker_for(click, i, r))
              for i, (r, f, rg) in enumerate(zip(rows, frames, ranges))]
    click = _viewer.viewer(panels, opacity=display["opacity"], columns=2 if len(panels) == 4 else len(panels),
                           height=420, sync=sync, key=ckey)
    _ui.url_sync({"view": "compare-slides", "slides": chosen, "layer": layer.split("@")[0] if layer.startswith("sig:") else layer,
                  "slide": None, "layers": None, "cmap": display["cmap"], "scale": display["scope"]})
    if click and 0 <= click.get("panel", -1) < len(rows):
        i = click["panel"]
        tile_details(model, rows[i], {name: frames[i][0]}, int(click["x"]), int(click["y"]), {name: frames[i][1]})
    export(cohort, model, chosen, [layer], figure_of(display, ranges[0]))


def compare_layers(cohort, model, row, options, labels, tile_um) -> None:
    pickable = [o for o in options if o != CUSTOM_SIG and not cell_view.is_cell_layer(o)]
    _ui.url_seed("cmp_layers", "layers", pickable, multi=True)
    if "cmp_layers" not in st.session_state:
        st.session_state["cmp_layers"] = [o for o in ("gene:ERBB2", "gene:CD8A") if o in pickable] or pickable[:2]
    chosen = st.multiselect("Layers (2–4)", pickable, key="cmp_layers", max_selections=4,
                            format_func=lambda o: labels.get(o, o.split(":", 1)[-1]))
    method = "score_genes"
    if any(o.startswith("sig:") for o in chosen):
        method = st.selectbox("Scoring of the signatures", ["score_genes", "mean_z"], key="cmp_method")
    display = display_controls(["slide", "custom"])
    if len(chosen) < 2:
        st.info("Choose two to four layers.")
        return
    frames = {labels.get(o, o.split(":", 1)[-1]) + (f" ({method})" if o.startswith("sig:") else ""):
              layer_of(model, cohort, row, f"{o}@{method}" if o.startswith("sig:") else o, tile_um) for o in chosen}
    ranges = color_range([f[0] for f in frames.values()], display["scope"], display["robust"], None, display["custom"])
    ckey = f"click_layers_{row['slide_name']}"
    click = st.session_state.get(ckey)
    panels = [panel(row, f[0], f[1], name, rg, display, marker_for(click, i, row))
              for i, ((name, f), rg) in enumerate(zip(frames.items(), ranges))]
    click = _viewer.viewer(panels, opacity=display["opacity"], columns=2 if len(panels) == 4 else len(panels),
                           height=420, sync=True, key=ckey)
    _ui.url_sync({"view": "compare-layers", "slide": row["slide_name"], "layers": chosen, "layer": None,
                  "slides": None, "cmap": display["cmap"], "scale": display["scope"]})
    if click:
        tile_details(model, row, {n: f[0] for n, f in frames.items()}, int(click["x"]), int(click["y"]),
                     {n: f[1] for n, f in frames.items()})
    export(cohort, model, [row["slide_name"]], chosen)


def export(cohort, model, slide_names, layers, figure: dict | None = None) -> None:
    from pages._export_ui import export_panel

    with st.expander("Export (AnnData, QuPath GeoJSON, CSV, Parquet, PNG/SVG)"):
        export_panel(cohort, model, slide_names, [lay for lay in layers if lay != slideview.DOMAIN_LAYER],
                     key="slide_export", figure=figure)


def figure_of(display: dict, vrange: tuple) -> dict:
    """The viewer's drawing settings, for a PNG/SVG export that looks like the screen."""
    return {"vmin": float(vrange[0]), "vmax": float(vrange[1]), "cmap": display["cmap"], "opacity": display["opacity"]}


def tissue_preview(model: str, row) -> None:
    tile_um, mpp = _ui.model_tiling(model)
    override = float(row["mpp"]) if row["mpp_source"] == "override" else None
    image, info = _ui.preview(row["slide_path"], tile_um, mpp, override)
    st.image(image, caption=f"Tissue (green outline), pen ink (red), {info['n_tiles']} tiles of {tile_um:g} µm "
                            f"({info['tile_px']} px at level 0); tissue covers {info['tissue_fraction']:.0%}.",
             width="stretch")


def has_domains(cohort, model) -> bool:
    from core.analysis import domains

    return bool(_ui.query(domains.has_fit, cohort, model))


def domain_panel(cohort: str, model: str, fitted: bool) -> None:
    """The cohort's spatial domains: what each is (share, markers, composition), or a fit."""
    from core.analysis import domains

    with st.expander("Spatial domains of the cohort" + ("" if fitted else " (not fitted yet)"), expanded=False):
        if fitted:
            fit = _ui.query(domains.load_fit, cohort, model, sample=False)
            st.caption(f"{len(fit.labels)} domains, {fit.method} on a sample of the tiles of {len(fit.run_keys)} "
                       f"slides (fitted {fit.fitted_at}); every tile is assigned to the nearest domain centre, so a "
                       "domain means the same on every slide. Per-patient fractions are biomarkers "
                       "(`domain:D1` … on the Survival and Associations pages).")
            cols = [c for c in ("title", "share", "n_tiles") if c in fit.domains.columns]
            st.dataframe(fit.domains[cols], hide_index=True, width="stretch", key="dom_table")
            st.caption("Mean cell-type composition per domain (the model's estimate):")
            st.dataframe(fit.composition.style.format("{:.2f}").background_gradient(axis=None, cmap="Blues"),
                         width="stretch", key="dom_comp")
            st.dataframe(fit.markers, hide_index=True, width="stretch", key="dom_markers")
        else:
            st.caption("Cluster the predicted expression of tiles from every slide of the cohort (Leiden on "
                       "expression plus its neighbourhood, BANKSY-style); then show them as a layer here. Also "
                       f"`python -m core.cli domains fit --cohort {cohort}`.")
        if st.button("Fit domains" if not fitted else "Refit domains", key="dom_fit",
                     disabled=_ui.role() != "operator", help="Operators only, when login is on."):
            with st.spinner("Fitting domains on a sample of the cohort's tiles…"):
                fit = _ui.query(domains.fit_domains, cohort, model, save=False)   # read-only: no lock held
                with _ui.write_store() as store:
                    domains.save_fit(store, fit)
            st.session_state["flash"] = f"{len(fit.labels)} spatial domains fitted for {cohort}."
            st.rerun()


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
        names = list(slides["slide_name"])
        _ui.url_seed("slide", "slide", names)
        c1, c2 = st.columns([3, 2])
        slide_name = c1.selectbox("Slide", names, key="slide",
                                  format_func=lambda n: n if n in predicted else f"{n} (not predicted)")
        _ui.url_seed("view", "view", ["slide", "compare-slides", "compare-layers"])
        if st.session_state.get("view") in ("slide", "compare-slides", "compare-layers"):
            st.session_state["view"] = VIEWS[["slide", "compare-slides", "compare-layers"].index(st.session_state["view"])]
        default_view = {} if "view" in st.session_state else {"default": VIEWS[0]}
        view = c2.segmented_control("View", VIEWS, key="view", **default_view) or VIEWS[0]
        row = slides[slides["slide_name"] == slide_name].iloc[0]
        if row["status"] == SlideStatus.NEEDS_MPP:
            st.warning(row["message"])
            _ui.mpp_fix_form(cohort, row["slide_name"], row["slide_path"], key="slide")
            st.stop()
        heat_tab, mask_tab = st.tabs(["Viewer", "Tissue mask and tile grid"])
        with heat_tab, _ui.guard():
            if model is None or row["run_key"] is None or row["run_key"] != row["run_key"]:
                _ui.not_predicted(cohort)
            elif _viewer.available():
                tile_um, _ = _ui.model_tiling(model)
                nuclei = _ui.query(Store.has_nuclei, row["run_key"])
                fitted = has_domains(cohort, model)
                cells = view == VIEWS[0] and bool(_ui.query(Store.has_cells, row["run_key"]))
                options, labels = layer_options(model, nuclei, fitted, cells)
                if view == "Compare slides":
                    compare_slides(cohort, model, slides, row, options, labels, tile_um)
                elif view == "Compare layers":
                    compare_layers(cohort, model, row, options, labels, tile_um)
                else:
                    single(cohort, model, slides, row, options, labels, tile_um)
                domain_panel(cohort, model, fitted)
        with mask_tab, _ui.guard():
            tissue_preview(model, row)
