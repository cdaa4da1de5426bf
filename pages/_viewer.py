"""The deep-zoom viewer component (pages/components/viewer: OpenSeadragon, no build step) and the
tile endpoint it reads from (core.viewer.server), started once per app process."""
from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components

from core.viewer import vendor
from core.viewer.tiles import FORMAT, OVERLAP, TILE_SIZE

DZI = {"format": FORMAT, "overlap": OVERLAP, "tile_size": TILE_SIZE}

_DIR = Path(__file__).resolve().parent / "components" / "viewer"
_component = components.declare_component("tessera_viewer", path=str(_DIR))


@st.cache_resource(show_spinner=False)
def tile_server():
    """One endpoint per app process, bound to the app's address (README: Deploying for a team)."""
    from core.viewer.server import TileServer

    host = st.get_option("server.address") or ""
    try:
        port = int(os.environ.get("TESSERA_TILE_PORT") or int(st.get_option("server.port")) + 1)
    except ValueError:
        port = 0
    return TileServer(host, port)


@st.cache_resource(show_spinner=False, max_entries=1024)
def slide_token(slide_path: str) -> str:
    """The slide's opaque token on the endpoint (paths come from the store, never from the browser)."""
    return tile_server().source.register(slide_path)


def overlay_token(key: str, width: int, height: int, make_renderer) -> dict:
    """A tiled overlay layer on the endpoint (:mod:`core.viewer.overlays`), built by
    ``make_renderer()`` unless the endpoint still holds ``key``: the panel's ``overlay.tiled``."""
    from core.viewer.overlays import FORMAT as OVERLAY_FORMAT, TILE_SIZE as OVERLAY_TILE, OverlayLayer

    token = tile_server().overlays.ensure(key, lambda: OverlayLayer(int(width), int(height), make_renderer().render))
    return {"token": token, "format": OVERLAY_FORMAT, "tile_size": OVERLAY_TILE}


def available() -> bool:
    if vendor.present():
        return True
    st.error("The slide viewer's library (OpenSeadragon) is not installed on this server. Run `make setup` "
             "(or `python -m core.viewer.vendor`) once with access to the npm registry.")
    return False


def viewer(panels: list[dict], *, opacity: float, height: int = 560, columns: int | None = None,
           sync: bool = False, key: str) -> dict | None:
    """Draw 1–4 panels; returns the last click ``{panel, x, y, n}`` (level-0 px) or None.

    A panel: ``token``, ``width``, ``height`` (level-0 px), ``title``, ``caption``, ``legend``,
    ``overlay`` ({url, width_px, x_px, y_px}: the image covers
    level-0 ``[x_px, x_px + width_px]`` horizontally, its aspect kept; or {tiled: {token, format,
    tile_size}}: a slide-sized tiled layer of the endpoint, :func:`overlay_token`) and ``marker`` ({x, y, size}) for the selected tile."""
    return _component(panels=panels, opacity=float(opacity), height=int(height), columns=columns or len(panels),
                      sync=bool(sync), tile_port=tile_server().port, tile_url=os.environ.get("TESSERA_TILE_URL", ""),
                      key=key, default=None)
