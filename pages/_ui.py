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
    from core.store import Store

    module, name = target.split(":")
    with Store(path, read_only=True) as store:
        fn = getattr(store, name) if module == "store" else partial(getattr(importlib.import_module(module), name), store)
        return fn(*args, **dict(kwargs))


def query(target: str, *args, **kwargs):
    """Call ``module:function(store, *args)`` on a read-only store, cached until the store changes.

    ``target`` may also be ``store:<method>`` for a :class:`core.store.Store` method.
    """
    path = store_path()
    return _cached_call(str(path), _mtime(path), target, args, tuple(sorted(kwargs.items())))


@st.cache_data(show_spinner=False, max_entries=64)
def thumbnail(slide_path: str, max_px: int = 1024):
    import numpy as np

    from core.slides import Slide

    with Slide(slide_path) as slide:
        return np.asarray(slide.thumbnail(max_px)), slide.dimensions


@st.cache_data(show_spinner=False, max_entries=2048)
def tile_image(slide_path: str, x: int, y: int, size: int, out_px: int = 192):
    from core.crossmodal import tile_image as read

    return read(slide_path, int(x), int(y), int(size), out_px)


def sidebar() -> tuple[str | None, str | None]:
    """Cohort and model pickers; returns (cohort, model_key) or (None, None) without a store."""
    if not store_path().exists():
        st.sidebar.warning("No store yet.")
        st.info(f"No predictions store at `{store_path()}`. Run `make run` (builds the demo cohort) "
                "or `python -m core.cli demo`.")
        return None, None
    cohorts = query("store:cohorts")
    models = query("store:models")
    if not cohorts or models.empty:
        st.info("The store has no cohort or no predictions yet. Run `python -m core.cli demo`.")
        return None, None
    cohort = st.sidebar.selectbox("Cohort", cohorts, key="cohort")
    model = st.sidebar.selectbox("Model", list(models["model_key"]), key="model",
                                 index=len(models) - 1)
    return cohort, model


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
