"""Streamlit glue shared by pages: cached store queries, the sidebar pickers, error guard.

The store is opened read-only for each (cached) query, so the app never holds the DuckDB file
lock between reruns. Cache entries are keyed by the store file's mtime, so new predictions show up.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, TypeVar

import streamlit as st

from core.config import load_settings
from core.errors import OutdatedStoreError, StoreBusyError, TesseraError
from core.safety import inside_roots, md_escape, safe_filename
from core.store.db import Store
from core.vocab import MIN_TISSUE, MPP_MAX, MPP_MIN

T = TypeVar("T")

log = logging.getLogger("tessera.ui")


@st.cache_resource
def settings():
    return load_settings()


def store_path() -> Path:
    return settings().store_path


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_call(path: str, mtime: float, name: str, args: tuple, kwargs: tuple, _fn: Callable):
    # keyed by the function's qualified name (``_fn`` itself is not hashed: leading underscore)
    with Store(path, read_only=True) as store:
        return _fn(store, *args, **dict(kwargs))


def query(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(store, *args, **kwargs)`` on a read-only store, cached until the store file changes.

    ``fn`` is a function whose first parameter is the store (``core.analysis.cohort_stats.km_by``)
    or a :class:`Store` method (``Store.cohort_runs``), so an editor can follow the call.
    """
    path = store_path()
    name = f"{fn.__module__}.{fn.__qualname__}"
    return _cached_call(str(path), _mtime(path), name, args, tuple(sorted(kwargs.items())), fn)


@contextlib.contextmanager
def write_store():
    """A short-lived read-write connection for the few actions that change the store."""
    with Store(store_path()) as store:
        yield store
    st.cache_data.clear()


@st.cache_data(show_spinner=False, max_entries=64)
def preview(slide_path: str, tile_um: float, mpp: float, mpp_override: float | None):
    from core.wsi.tiling import TilingParams, preview as render

    return render(slide_path, TilingParams(tile_um=tile_um, mpp=mpp), mpp_override=mpp_override)


def mpp_fix_form(cohort: str, slide_name: str, slide_path: str, key: str) -> None:
    """Let the user state a slide's µm/px; the slide is re-probed and becomes predictable."""
    from core.cohort.importer import fix_slide_mpp

    with st.form(key=f"mppfix_{key}"):
        st.write(f"**{md_escape(slide_name)}** has no usable µm/px in its metadata. Typical values: 0.25 (40×), "
                 "0.5 (20×).")
        mpp = st.number_input("µm per pixel at level 0", min_value=MPP_MIN, max_value=MPP_MAX, value=0.5, step=0.001,
                              format="%.4f", key=f"mpp_{key}")
        if st.form_submit_button("Save µm/px"):
            with write_store() as store:
                probe = fix_slide_mpp(store, cohort, slide_path, mpp)
            st.session_state["flash"] = f"Saved {mpp:g} µm/px for {slide_name}: the slide is now " \
                                        f"'{probe.status}'. {probe.message}"
            st.rerun()


def flash() -> None:
    """Show (once) the message an action left before it reran the page."""
    message = st.session_state.pop("flash", None)
    if message:
        st.success(md_escape(message))


@st.cache_data(show_spinner=False, max_entries=64)
def thumbnail(slide_path: str, max_px: int = 1024):
    import numpy as np

    from core.wsi.slide import Slide

    with Slide(slide_path) as slide:
        return np.asarray(slide.thumbnail(max_px)), slide.dimensions


@st.cache_data(show_spinner=False, max_entries=2048)
def tile_image(slide_path: str, x: int, y: int, size: int, out_px: int = 192):
    from core.analysis.crossmodal import tile_image as read

    return read(slide_path, int(x), int(y), int(size), out_px)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def model(model_key: str):
    """The checkpoint behind ``model_key`` (``id@version``), for queries that run the model
    (an uploaded patch). The version on disk must be the one whose predictions are in the store."""
    from core.engine.modelhub import load_model

    model_id, _, version = model_key.partition("@")
    loaded = load_model(model_id, settings().model_dirs)
    if version and loaded.version != version:
        raise TesseraError(f"The checkpoint of {model_id} on disk is version {loaded.version}, but the store's "
                           f"predictions come from version {version}: predict the cohort again with it, or "
                           "put the matching checkpoint in a model folder.")
    return loaded


@st.cache_data(show_spinner="Running the model on the patch…", max_entries=16)
def patch_prediction(model_key: str, data: bytes, name: str, mpp: float, tile_um: float) -> dict:
    """An uploaded patch → the model's tile, a note on the crop, and the model's outputs; cached so
    that widget reruns do not run the model again."""
    from core.analysis.crossmodal import patch_tile, predict_patch

    loaded = model(model_key)
    tile, note = patch_tile(read_image(data, name), mpp, tile_um, int(loaded.card["input_px"]))
    return {"tile": tile, "note": note, **predict_patch(loaded, tile)}


def read_image(data: bytes, name: str):
    """An uploaded image as an RGB(A) uint8 array, or a clear error."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > 64_000_000:
                raise TesseraError(f"{name} is {img.width} × {img.height} px: upload a patch, not a whole slide "
                                   "(a whole slide belongs on the Import page).")
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise TesseraError(f"Could not read {name} as an image ({exc}). Upload a PNG, JPEG or TIFF patch.") from exc


def ingest_pending() -> int:
    """Bring finished runs of background/CLI jobs from the spool into the store (when the lock is
    free for a moment; otherwise they wait for the next page load). Returns how many."""
    from core.engine.access import StoreAccess

    access = StoreAccess(store_path())
    if not access.spool.complete_runs():
        return 0
    try:
        n = access.ingest(wait_s=0.5)
    except TesseraError as exc:
        log.warning("ingest skipped: %s", exc)
        return 0
    if n:
        st.cache_data.clear()
    return n


@st.cache_data(show_spinner=False, max_entries=4)
def _needs_upgrade(path: str, mtime: float) -> bool:
    try:
        with Store(path, read_only=True):
            return False
    except OutdatedStoreError:
        return True
    except StoreBusyError:      # busy for a moment: the page's own queries wait and report it
        return False


def upgrade_store_if_needed() -> None:
    """A store written by an older Tessera is upgraded in place on first use (one short write
    connection; minutes only for stores of millions of tiles), instead of every page failing."""
    path = store_path()
    if not _needs_upgrade(str(path), _mtime(path)):
        return
    with st.spinner("Upgrading the store to this version's layout (once)…"):
        with Store(path, wait_s=10.0):
            pass
    st.cache_data.clear()


def model_label(model_key: str) -> str:
    """How every picker names a model: ``demo-synthetic · v fda30f42`` (id and version)."""
    model_id, _, version = model_key.partition("@")
    return f"{model_id} · v {version[:8]}" if version else model_id


def sidebar() -> tuple[str | None, str | None]:
    """The cohort and model pickers: (cohort, model_key); model_key is None before any prediction.

    Both choices survive page switches. The default model is the most recent one with predictions
    for the chosen cohort; models without any for it say so in the picker."""
    _through_router()
    exposure_check()
    role()   # with login on, every page stops here until the user has signed in
    if store_path().exists():
        upgrade_store_if_needed()
        ingest_pending()
    if not store_path().exists():
        st.sidebar.warning("No store yet.")
        st.info(f"No predictions store at `{store_path()}`. Run `make run` (builds the demo cohort), "
                "`python -m core.cli demo`, or import a cohort on the Import page.")
        return None, None
    cohorts = query(Store.cohorts)
    if not cohorts:
        st.info("The store has no cohort yet: import one on the Import page, or run `python -m core.cli demo`.")
        return None, None
    _keep("cohort", cohorts)
    url_seed("cohort", "cohort", cohorts)
    cohort = st.sidebar.selectbox("Cohort", cohorts, key="cohort", on_change=_cohort_changed)
    url_sync({"cohort": cohort})
    coverage = query(Store.model_coverage, cohort)
    if coverage.empty:
        st.sidebar.info("No predictions yet: start them on the Predictions page.")
        return cohort, None
    keys = list(coverage["model_key"])
    predicted = dict(zip(coverage["model_key"], coverage["predicted"]))
    with_runs = [k for k in keys if predicted[k] > 0]
    _keep("model", keys)
    url_seed("model", "model", keys)
    default = {} if "model" in st.session_state else {"index": keys.index(with_runs[-1] if with_runs else keys[-1])}
    model = st.sidebar.selectbox(
        "Model", keys, key="model", **default,
        format_func=lambda k: model_label(k) + ("" if predicted[k] else f" (no predictions for {cohort})"))
    url_sync({"model": model})
    return cohort, model


def _through_router() -> None:
    """A fresh server's first session opened on a page's link (``/slide?…``) runs that page on its
    own, without ``app.py`` (Streamlit's legacy ``pages/`` folder mode stays on until a script calls
    ``st.navigation``): switch the legacy mode off and rerun, so ``app.py`` routes the same URL."""
    from streamlit.runtime.pages_manager import PagesManager

    first = not st.session_state.get("_routed")
    st.session_state["_routed"] = True
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if first:   # only a session's first run: a later run may carry a click that a rerun would drop
            st.rerun()


def _keep(key: str, options: list) -> None:
    """Carry a sidebar widget's value over a page switch (Streamlit drops the state of a widget
    that the next page draws anew; writing it back keeps it); a value no longer offered is dropped."""
    if key in st.session_state:
        if st.session_state[key] in options:
            st.session_state[key] = st.session_state[key]
        else:
            del st.session_state[key]


def _cohort_changed() -> None:
    # another cohort: let the model default again to one that has predictions for it
    st.session_state.pop("model", None)


def require_model(model: str | None) -> None:
    if model is None:
        st.info("This page needs predictions: start them on the Predictions page.")
        st.page_link("pages/predictions.py", label="Go to Predictions", icon=":material/play_circle:")
        st.caption("Or from a shell: `python -m core.cli predict --cohort NAME`.")
        st.stop()


def not_predicted(cohort: str) -> None:
    """What to do about a slide without predictions from the chosen model."""
    st.info("Not predicted yet with this model: start a prediction job for the cohort on the Predictions page.")
    st.page_link("pages/predictions.py", label="Go to Predictions", icon=":material/play_circle:")
    st.caption(f"Or from a shell: `python -m core.cli predict --cohort {cohort}`.")


def model_tiling(model_key: str | None) -> tuple[float, float]:
    """(tile µm, µm/px) of the model, or the default tiling when there is no model yet."""
    if model_key is None:
        from core.wsi.tiling import TilingParams

        return TilingParams().tile_um, TilingParams().mpp
    return query(Store.model_info, model_key).tiling


def genes(model_key: str) -> list[str]:
    return list(query(Store.model_info, model_key).genes)


@contextlib.contextmanager
def guard():
    """Show domain errors as ``st.error`` with their message; never a traceback in the UI."""
    try:
        yield
    except TesseraError as exc:   # messages may quote what a user typed: shown as text, not Markdown
        st.error(md_escape(exc))
    except Exception as exc:  # last line of defence: log the trace, show a short message
        log.exception("page error")
        st.error(md_escape(f"Something went wrong: {type(exc).__name__}: {exc}. The details are in the server log."))


VARIABLE_KINDS = {"Predicted gene": "predicted", "Signature": "signature", "Spatial domain (fraction of tiles)": "domain",
                  "Cell biomarker": "cell", "Clinical column": "clinical", "Measured gene": "measured"}
CELL_MEASURES = {"Mean of a gene in a cell type": "cell", "Cell-type fraction": "cellfrac",
                 "Density of a type near another": "celldens"}


def variable_picker(cohort: str, model: str | None, key: str, *, label: str = "Variable",
                    default_gene: str = "CD8A", kinds: tuple[str, ...] = tuple(VARIABLE_KINDS)) -> str | None:
    """A variable of any source as its CLI name (``CD8A``, ``signature:…``, ``clinical:…``, ``measured:…``).

    Sources with nothing to offer (no model, no measured matrix) are not listed. The link's
    ``?<key>=<CLI name>`` chooses it, and the choice is written back there."""
    spec = _variable_picker(cohort, model, key, label=label, default_gene=default_gene, kinds=kinds)
    url_sync({key: spec})
    return spec


def _seed_variable(key: str, offered: dict, panel: list, measured: list, clinical: dict, titles: dict,
                   cell_types: list | None = None) -> None:
    """The picker's widgets from the link's ``?<key>=``, on the session's first run of the page."""
    from core.analysis.signatures import library

    seeded = st.session_state.setdefault("_url_seeded", set())
    if ("variable", key) in seeded:
        return
    seeded.add(("variable", key))
    raw = st.query_params.get(key)
    if not raw:
        return
    source, sep, what = str(raw).partition(":")
    source, what = (source, what) if sep else ("predicted", source)
    if source in ("cell", "cellfrac", "celldens"):
        _seed_cell_variable(key, offered, str(raw), panel, cell_types or [])
        return
    kind = {v: k for k, v in offered.items()}.get(source)
    widget, ok = {"predicted": (f"{key}_gene", what in panel), "measured": (f"{key}_meas", what in measured),
                  "clinical": (f"{key}_clin", what in clinical),
                  "signature": (f"{key}_sig", what in library()),
                  "domain": (f"{key}_dom", what in titles)}.get(source, (None, False))
    if kind is None or not ok:
        notice(f"The link's {key}={raw} is not available here; showing the default instead.")
        return
    st.session_state[f"{key}_kind"] = kind
    st.session_state[widget] = what


def _seed_cell_variable(key: str, offered: dict, raw: str, panel: list, cell_types: list) -> None:
    from core.analysis.variables import parse_variable

    kind = {v: k for k, v in offered.items()}.get("cell")
    try:
        variable = parse_variable(raw, panel=panel, cell_types=cell_types) if kind and cell_types else None
    except TesseraError:
        variable = None
    if variable is None:
        notice(f"The link's {key}={raw} is not available here; showing the default instead.")
        return
    st.session_state[f"{key}_kind"] = kind
    st.session_state[f"{key}_cellkind"] = {v: k for k, v in CELL_MEASURES.items()}[variable.source]
    st.session_state[f"{key}_celltype"] = variable.name
    if variable.source == "cell":
        st.session_state[f"{key}_cellgene"] = variable.genes[0]
    if variable.source == "celldens":
        st.session_state[f"{key}_cellnear"] = variable.near
        st.session_state[f"{key}_celld"] = float(variable.distance_um)


def _cell_picker(key: str, label: str, panel: list, cell_types: list, default_gene: str, box) -> str:
    """A cell biomarker (:mod:`core.analysis.cell_biomarkers`) as its variable name."""
    measure = CELL_MEASURES[box.selectbox(f"{label}: cell measure", list(CELL_MEASURES), key=f"{key}_cellkind",
                                          help="Per slide from its cells (predict with cells); per patient the mean "
                                               "over the patient's slides.")]
    c1, c2, c3 = st.columns(3)
    start = {} if f"{key}_celltype" in st.session_state else {
        "index": cell_types.index("malignant_epithelial") if "malignant_epithelial" in cell_types else 0}
    kind = c1.selectbox("Cell type", cell_types, key=f"{key}_celltype", **start)
    if measure == "cell":
        start = {} if f"{key}_cellgene" in st.session_state else {
            "index": panel.index(default_gene) if default_gene in panel else 0}
        gene = c2.selectbox("Gene", panel, key=f"{key}_cellgene", **start,
                            help="Mean of the cells' predicted values (log1p CP10k) over this type's cells.")
        return f"cell:{kind}:{gene}"
    if measure == "cellfrac":
        return f"cellfrac:{kind}"
    start = {} if f"{key}_cellnear" in st.session_state else {
        "index": cell_types.index("malignant_epithelial") if "malignant_epithelial" in cell_types else 0}
    near = c2.selectbox("Near cells of", cell_types, key=f"{key}_cellnear", **start)
    d = c3.number_input("Within (µm)", min_value=1.0, max_value=1000.0, value=50.0, step=5.0, key=f"{key}_celld",
                        help="Cells of the first type within this distance of any cell of the second, per mm² of "
                             "that neighbourhood (the union of the discs around the second type's cells).")
    return f"celldens:{kind}@{near}:{float(d):g}"


def _variable_picker(cohort: str, model: str | None, key: str, *, label: str, default_gene: str,
                     kinds: tuple[str, ...]) -> str | None:
    from core.analysis.cohort_stats import usable_clinical
    from core.analysis.signatures import library

    from core.analysis.domains import domain_titles

    offered = {}
    panel = genes(model) if model else []
    titles = dict(query(domain_titles, cohort, model)) if model else {}
    from core.analysis.cell_biomarkers import cohort_cell_types

    cell_types = list(query(cohort_cell_types, cohort, model)) if model else []
    measured = query(Store.measured_genes, cohort)
    clinical = query(usable_clinical, cohort)
    for name in kinds:
        source = VARIABLE_KINDS[name]
        if source in ("predicted", "signature") and not panel:
            continue
        if source == "measured" and not measured:
            continue
        if source == "domain" and not titles:
            continue
        if source == "cell" and not cell_types:
            continue
        offered[name] = source
    if not offered:
        st.info("Nothing to analyse yet: predict the cohort's slides, or import measured expression.")
        return None
    _seed_variable(key, offered, panel, measured, clinical, titles, cell_types)
    c1, c2 = st.columns([1, 2])
    kind = offered[c1.selectbox(f"{label}: source", list(offered), key=f"{key}_kind")]
    if kind == "predicted":
        start = {} if f"{key}_gene" in st.session_state else {
            "index": panel.index(default_gene) if default_gene in panel else 0}
        gene = c2.selectbox(label, panel, key=f"{key}_gene", **start)
        return gene
    if kind == "signature":
        names = [n for n, g in library().items() if len(set(g) & set(panel)) >= 1] + ["custom…"]
        choice = c2.selectbox(label, names, key=f"{key}_sig",
                              help="Score: mean over the signature's genes of the per-gene patient values "
                                   "z-scored over the cohort.")
        if choice == "custom…":
            from core.analysis.maps import parse_signature

            text = st.text_input("Genes (comma-separated)", key=f"{key}_sig_genes", value="CD8A, GZMB, PRF1")
            return "signature:" + ",".join(parse_signature(text, panel))
        return f"signature:{choice}"
    if kind == "domain":
        label_of = c2.selectbox(label, list(titles), key=f"{key}_dom", format_func=lambda d: titles[d],
                                help="The fraction of the patient's tiles in this spatial domain (the cohort's "
                                     "domains: Slide page → Spatial domains).")
        return f"domain:{label_of}"
    if kind == "cell":
        return _cell_picker(key, label, panel, cell_types, default_gene, c2)
    if kind == "clinical":
        cols = list(clinical)
        column = c2.selectbox(label, cols, key=f"{key}_clin",
                              format_func=lambda c: f"{c} ({clinical[c]})")
        return f"clinical:{column}" if column else None
    start = {} if f"{key}_meas" in st.session_state else {
        "index": measured.index(default_gene) if default_gene in measured else 0}
    gene = c2.selectbox(label, measured, key=f"{key}_meas", **start)
    return f"measured:{gene}"


def downloads(label: str, base: str, files: dict[str, Callable[[], bytes]], key: str) -> None:
    """One row of download buttons (``{"csv": fn, "png": fn, …}``); each file is made only on click."""
    from core.analysis.report import FIGURE_FORMATS, TABLE_FORMATS

    mimes = {**TABLE_FORMATS, **FIGURE_FORMATS, "json": "application/json"}
    cols = st.columns(len(files) + 1)
    cols[0].caption(label)
    for col, (fmt, make) in zip(cols[1:], files.items()):
        col.download_button(fmt.upper(), data=make, file_name=f"{base}.{fmt}", mime=mimes.get(fmt),
                            key=f"{key}_{fmt}", on_click="ignore")


def predicted_model(cohort: str, model: str | None) -> str | None:
    """``model`` when it has predictions for ``cohort``, else None (analyses then offer clinical and
    measured variables only, e.g. for a clinical-only cohort)."""
    if model is None:
        return None
    coverage = query(Store.model_coverage, cohort)
    row = coverage[coverage["model_key"] == model]
    return model if not row.empty and int(row["predicted"].iloc[0]) > 0 else None


# -- the browser is untrusted: server paths, uploads, roles ------------------------------------
def server_path(text: str, *, kind: str = "path"):
    """A path typed in the UI, allowed only inside the data roots (see core.safety.inside_roots)."""
    return inside_roots(text, settings().data_roots_or_default(), kind=kind)


def _session_id() -> str:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return safe_filename(ctx.session_id if ctx else "local", default="local")


def upload_dir() -> Path:
    """This browser session's upload folder (under data/uploads, git-ignored); folders of sessions
    idle for a day are removed when a new one is made."""
    import shutil
    import time

    base = settings().data_dir / "uploads"
    folder = base / _session_id()
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for old in base.iterdir():
            if old.is_dir() and old != folder and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    return folder


def saved_upload(upload) -> Path:
    """An uploaded file written to the session's folder under a safe name, within the size cap."""
    cap = settings().upload_mb * 1024 * 1024
    if upload.size > cap:
        raise TesseraError(f"{md_escape(upload.name)} is {upload.size / 1e6:.0f} MB; uploads are capped at "
                           f"{settings().upload_mb} MB. Put large files in a data folder on the server instead.")
    path = upload_dir() / safe_filename(upload.name)
    path.write_bytes(upload.getvalue())
    return path


def auth_configured() -> bool:
    """Login is on when ``[auth]`` is set in ``.streamlit/secrets.toml`` (Streamlit's OIDC)."""
    try:
        return "auth" in st.secrets
    except Exception:          # no secrets file at all
        return False


def role() -> str:
    """``operator`` (import, predict, manage cohorts) or ``viewer`` (browse and analyse).

    Without login (a loopback server for one user) everyone is an operator. With login, users
    whose e-mail is in ``operators`` (tessera.toml / TESSERA_OPERATORS) are operators; every other
    signed-in user is a viewer; nobody gets past the login button without signing in."""
    if not auth_configured():
        return "operator"
    if not st.user.is_logged_in:
        st.info("Sign in to use Tessera.")
        st.button("Sign in", on_click=st.login, key="login", type="primary")
        st.stop()
    email = str(st.user.get("email", "")).lower()
    return "operator" if email in settings().operators else "viewer"


def require_operator(action: str) -> None:
    if role() != "operator":
        st.info(f"{action} is for operators. You are signed in as a viewer: browse and analyse, or ask an "
                "operator to add your e-mail to the operators list.")
        st.stop()


LOOPBACK = {"127.0.0.1", "localhost", "::1", ""}


def exposure_check() -> None:
    """Refuse to serve an open (non-loopback) address without login, unless the operator says they
    know (``TESSERA_ALLOW_OPEN=1``: e.g. a reverse proxy that authenticates)."""
    import os

    address = str(st.get_option("server.address") or "")
    if address in LOOPBACK or auth_configured() or os.environ.get("TESSERA_ALLOW_OPEN") == "1":
        return
    st.error(f"This server listens on {md_escape(address)} without login. Configure [auth] in "
             ".streamlit/secrets.toml (see the README, Deploying for a team), bind to 127.0.0.1, or set "
             "TESSERA_ALLOW_OPEN=1 if a proxy in front of it authenticates users.")
    st.stop()


# -- shareable state: the URL's query string carries what the page shows --------------------------
def url_seed(key: str, param: str, options: list | None = None, *, multi: bool = False,
             parse: Callable[[str], object] | None = None,
             fallback: Callable[[str], dict | None] | None = None) -> None:
    """Before the widget ``key`` is drawn: on this session's first run of the page, take its value
    from the link's ``?param=``. A value the page does not offer (a stale or hand-edited link) is
    dropped with a notice and the widget keeps its default. ``multi``: comma-separated list."""
    seeded = st.session_state.setdefault("_url_seeded", set())
    page = getattr(st.context, "url", "") if hasattr(st, "context") else ""
    mark = (str(page).split("?", 1)[0], key)
    if mark in seeded:
        return
    seeded.add(mark)
    raw = st.query_params.get(param)
    if raw is None or raw == "":
        return
    try:
        values = [v for v in str(raw).split(",") if v] if multi else [str(raw)]
        values = [parse(v) if parse else v for v in values]
    except (TypeError, ValueError):
        values = None
    bad = values is None or (options is not None and any(v not in options for v in values))
    if bad and fallback is not None:
        seeds = fallback(str(raw))     # e.g. a custom signature: its own widgets, checked when used
        if seeds:
            st.session_state.update(seeds)
            return
    if bad or (multi and not values):
        notice(f"The link's {param}={raw} is not available here; showing the default instead.")
        return
    st.session_state[key] = values if multi else values[0]


def url_sync(params: dict[str, object]) -> None:
    """After the widgets: write the current view into the query string (lists comma-joined, None
    removes the parameter), so a copied link reopens the same view."""
    for name, value in params.items():
        if value is None or value == [] or value == "":
            if name in st.query_params:
                del st.query_params[name]
            continue
        text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        if st.query_params.get(name) != text:
            st.query_params[name] = text


def notice(message: str) -> None:
    st.info(md_escape(message), icon=":material/link_off:")
