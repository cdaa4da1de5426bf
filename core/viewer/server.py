"""The tile endpoint: a small threaded HTTP server beside the Streamlit app, in the app's process.

Routes (any leading path prefix is accepted, so a reverse proxy may mount it under ``/tiles``):

- ``GET …/dzi/<token>.dzi``: the slide's Deep Zoom descriptor (XML);
- ``GET …/dzi/<token>_files/<level>/<col>_<row>.jpeg``: one tile;
- ``GET …/overlay/<token>_files/<level>/<col>_<row>.png``: one tile of a tiled overlay layer
  (:mod:`core.viewer.overlays`, e.g. the cell layer of a large slide);
- ``GET …/health``: ``ok``.

Everything else is 404; so is an unknown token. Only GET/HEAD. The browser never sends a path:
tokens come from :class:`core.viewer.tiles.TileSource`, issued to sessions that opened the slide.

Binding: the same address as the app (``server.address``), port ``TESSERA_TILE_PORT`` (default:
the app's port + 1; a free port when that one is taken). The viewer loads tiles from
``TESSERA_TILE_URL`` when set (behind a reverse proxy, e.g. ``https://host/tiles``), else from the
page's host at that port. See README, "Deploying for a team".
"""
from __future__ import annotations

import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from core.viewer.overlays import OverlaySource
from core.viewer.tiles import TileSource

log = logging.getLogger(__name__)
_ROUTE = re.compile(r"^(?:/[A-Za-z0-9._-]+)*/dzi/([0-9a-f]{32})(?:\.dzi|_files/(\d{1,2})/(\d{1,6})_(\d{1,6})\.jpeg)$")
_OVERLAY = re.compile(r"^(?:/[A-Za-z0-9._-]+)*/overlay/([0-9a-f]{32})_files/(\d{1,2})/(\d{1,6})_(\d{1,6})\.png$")


def _handler(source: TileSource, overlays: OverlaySource):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tessera-tiles"
        sys_version = ""
        timeout = 30   # a client that stalls mid-request frees its thread

        def log_message(self, fmt, *args):  # the app's log, at debug level
            log.debug("tiles: " + fmt, *args)

        def _send(self, code: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            # tiles are drawn on a canvas: allow cross-origin reads (the token is the capability)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path.endswith("/health"):
                return self._send(200, b"ok", "text/plain")
            o = _OVERLAY.match(path)
            if o:
                return self._overlay(*o.groups())
            m = _ROUTE.match(path)
            if not m:
                return self._send(404, b"not found", "text/plain")
            token, level, col, row = m.groups()
            try:
                if level is None:
                    return self._send(200, source.dzi(token).encode(), "application/xml", cache=True)
                data = source.tile(token, int(level), int(col), int(row))
                return self._send(200, data, "image/jpeg", cache=True)
            except (KeyError, ValueError):
                return self._send(404, b"not found", "text/plain")
            except Exception:  # a slide that became unreadable: logged here, a plain 500 to the browser
                log.exception("tile %s failed", path)
                return self._send(500, b"tile error", "text/plain")

        def _overlay(self, token, level, col, row):
            try:
                return self._send(200, overlays.tile(token, int(level), int(col), int(row)), "image/png", cache=True)
            except (KeyError, ValueError):
                return self._send(404, b"not found", "text/plain")
            except Exception:
                log.exception("overlay tile %s failed", self.path)
                return self._send(500, b"tile error", "text/plain")

        do_HEAD = do_GET

    return Handler


class TileServer:
    """A running endpoint: ``.source`` (register slides there), ``.overlays`` (tiled overlay
    layers), ``.port``, ``.stop()``."""

    def __init__(self, host: str, port: int, source: TileSource | None = None):
        self.source = source or TileSource()
        self.overlays = OverlaySource()
        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(self.source, self.overlays))
        except OSError:
            if port == 0:
                raise
            log.warning("tile port %s is taken; using a free port", port)
            self.httpd = ThreadingHTTPServer((host, 0), _handler(self.source, self.overlays))
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="tessera-tiles", daemon=True)
        self.thread.start()
        log.info("tile endpoint on %s:%s", host or "*", self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
