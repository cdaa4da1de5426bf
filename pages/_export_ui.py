"""The export widget the Slide and Cohort pages share: a format picker and a download button whose
bytes come from :func:`core.export.api.export_bytes`, i.e. the same writer as
``python -m core.cli export`` (written to a temporary file, read back).

The checks run at once (:func:`core.export.api.plan_download`, cheap and cached), so a bad slide or
layer shows its message next to the picker; the file itself is made only when the button is
clicked (Streamlit's deferred download), so an unclicked .h5ad costs nothing on a rerun."""
from __future__ import annotations


import streamlit as st

from core.export.api import export_bytes, plan_download
from core.store.db import Store
from pages import _ui


LABELS = {"h5ad": "AnnData (.h5ad, scanpy)", "geojson": "QuPath objects (.geojson)", "csv": "Tile table (.csv)",
          "parquet": "Tile table (.parquet)", "png": "Map figure (.png)", "svg": "Map figure (.svg)"}


# Above this many tiles a download would be built in the server's memory: the CLI writes it instead.
MAX_TILES = 300_000


def export_panel(cohort: str, model_key: str, slides: list[str], layers: list[str], key: str,
                 figure: dict | None = None) -> None:
    """Export ``slides`` (names; empty = every predicted slide of the cohort) with ``layers``
    (``gene:ERBB2``, ``ERBB2``, ``sig:cytolytic``…; empty = the whole panel). Figures are offered
    for one slide and show the first layer, drawn as on screen: ``figure`` = vmin, vmax, cmap,
    opacity of the viewer."""
    figures = len(slides) == 1 and bool(layers)
    formats = [f for f in LABELS if figures or f not in ("png", "svg")]
    fmt = st.selectbox("Export as", formats, key=f"{key}_export_fmt", format_func=LABELS.get,
                       help="Tables and GeoJSON hold the chosen layers (every gene when none is chosen); the "
                            ".h5ad holds every gene, with signatures as tile annotations (obs).")
    options = {"slides": list(slides) or None, "layers": (list(layers[:1]) if fmt in ("png", "svg") else list(layers))
               or None}
    if fmt in ("png", "svg") and figure:
        options.update({k: figure[k] for k in ("vmin", "vmax", "cmap", "opacity") if figure.get(k) is not None})
    runs = _ui.query(Store.cohort_runs, cohort, model_key)
    chosen = runs if not slides else runs[runs["slide_name"].isin(slides)]
    n_tiles = int(chosen["n_tiles"].fillna(0).sum())
    if n_tiles > MAX_TILES:
        st.info(f"{n_tiles:,} tiles is too large a download to build on the server; write the file with "
                f"`python -m core.cli export --cohort {cohort} --format {fmt} --out PATH` (the same writer).")
        return
    with _ui.guard():
        name, mime = _ui.query(plan_download, cohort, model_key, fmt, **options)
        store_path = str(_ui.store_path())

        def make() -> bytes:   # runs on click, in Streamlit's download thread
            with Store(store_path, read_only=True, wait_s=10.0) as store:
                return export_bytes(store, cohort, model_key, fmt, **options)[0]

        st.download_button(f"Download {name}", data=make, file_name=name, mime=mime, key=f"{key}_export_dl",
                           on_click="ignore")
