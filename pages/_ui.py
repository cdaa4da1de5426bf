"""Streamlit glue shared by pages: cached store queries, the sidebar pickers, error guard.

The store is opened read-only for each (cached) query, so the app never holds the DuckDB file
lock between reruns. Cache entries are keyed by the store file's mtime, so new predictions show up.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from functools import partial
from pathlib import Path

import streamlit as st

from core.config import load_settings
from core.errors import TesseraError

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
def _cached_call(path: str, mtime: float, target: str, args: tuple, kwargs: tuple):
    from core.store.db import Store

    module, name = target.split(":")
    with Store(path, read_only=True) as store:
        fn = getattr(store, name) if module == "store" else partial(getattr(importlib.import_module(module), name), store)
        return fn(*args, **dict(kwargs))


def query(target: str, *args, **kwargs):
    """Call ``module:function(store, *args)`` on a read-only store, cached until the store changes.

    ``target`` may also be ``store:<method>`` for a :class:`core.store.db.Store` method.
    """
    path = store_path()
    return _cached_call(str(path), _mtime(path), target, args, tuple(sorted(kwargs.items())))


@contextlib.contextmanager
def write_store():
    """A short-lived read-write connection for the few actions that change the store."""
    from core.store.db import Store

    with Store(store_path()) as store:
        yield store
    st.cache_data.clear()


@st.cache_data(show_spinner=False, max_entries=64)
def preview(slide_path: str, tile_um: float, mpp: float, mpp_override: float | None):
    from core.wsi.slide import TilingParams, preview as render

    return render(slide_path, TilingParams(tile_um=tile_um, mpp=mpp), mpp_override=mpp_override)


def mpp_fix_form(cohort: str, slide_name: str, slide_path: str, key: str) -> None:
    """Let the user state a slide's µm/px; the slide is re-probed and becomes predictable."""
    from core.cohort.importer import fix_slide_mpp

    with st.form(key=f"mppfix_{key}"):
        st.write(f"**{slide_name}** has no µm/px in its metadata. Typical values: 0.25 (40×), 0.5 (20×).")
        mpp = st.number_input("µm per pixel at level 0", min_value=0.05, max_value=20.0, value=0.5, step=0.001,
                              format="%.4f", key=f"mpp_{key}")
        if st.form_submit_button("Save µm/px"):
            with write_store() as store:
                row = fix_slide_mpp(store, cohort, slide_path, mpp)
            st.session_state["flash"] = f"Saved {mpp:g} µm/px for {slide_name}: the slide is now " \
                                        f"'{row['status']}'. {row.get('message') or ''}"
            st.rerun()


def flash() -> None:
    """Show (once) the message an action left before it reran the page."""
    message = st.session_state.pop("flash", None)
    if message:
        st.success(message)


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
    from core.engine.predict import StoreAccess

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
    from core.errors import OutdatedStoreError, StoreError
    from core.store.db import Store

    try:
        with Store(path, read_only=True):
            return False
    except OutdatedStoreError:
        return True
    except StoreError:      # busy for a moment: the page's own queries wait and report it
        return False


def upgrade_store_if_needed() -> None:
    """A store written by an older Tessera is upgraded in place on first use (one short write
    connection; minutes only for stores of millions of tiles), instead of every page failing."""
    path = store_path()
    if not _needs_upgrade(str(path), _mtime(path)):
        return
    from core.store.db import Store

    with st.spinner("Upgrading the store to this version's layout (once)…"):
        with Store(path, wait_s=10.0):
            pass
    st.cache_data.clear()


def sidebar() -> tuple[str | None, str | None]:
    """Cohort and model pickers: (cohort, model_key); model_key is None before any prediction."""
    if store_path().exists():
        upgrade_store_if_needed()
        ingest_pending()
    if not store_path().exists():
        st.sidebar.warning("No store yet.")
        st.info(f"No predictions store at `{store_path()}`. Run `make run` (builds the demo cohort), "
                "`python -m core.cli demo`, or import a cohort on the Import page.")
        return None, None
    cohorts = query("store:cohorts")
    if not cohorts:
        st.info("The store has no cohort yet: import one on the Import page, or run `python -m core.cli demo`.")
        return None, None
    cohort = st.sidebar.selectbox("Cohort", cohorts, key="cohort")
    models = query("store:models")
    if models.empty:
        st.sidebar.info("No predictions yet: run `python -m core.cli predict --cohort NAME`.")
        return cohort, None
    model = st.sidebar.selectbox("Model", list(models["model_key"]), key="model", index=len(models) - 1)
    return cohort, model


def require_model(model: str | None) -> None:
    if model is None:
        st.info("This page needs predictions: run `python -m core.cli predict --cohort NAME` first.")
        st.stop()


def model_tiling(model_key: str | None) -> tuple[float, float]:
    """(tile µm, µm/px) of the model, or the default tiling when there is no model yet."""
    if model_key is None:
        from core.wsi.slide import TilingParams

        return TilingParams().tile_um, TilingParams().mpp
    card = query("store:model_info", model_key)["card"]
    return float(card["tile_um"]), float(card["mpp"])


def genes(model_key: str) -> list[str]:
    return list(query("store:model_info", model_key)["genes"])


@contextlib.contextmanager
def guard():
    """Show domain errors as ``st.error`` with their message; never a traceback in the UI."""
    try:
        yield
    except TesseraError as exc:
        st.error(str(exc))
    except Exception as exc:  # last line of defence: log the trace, show a short message
        log.exception("page error")
        st.error(f"Something went wrong: {type(exc).__name__}: {exc}. The details are in the server log.")
