"""Tiled overlay pyramids: layers drawn on demand, tile by tile, at every zoom level (today the
cell layer of slides too large for one overlay image).

The app registers a *renderer* for a slide-sized layer: ``render(x0, y0, w0, h0, scale)`` returns
the PNG of the level-0 region ``[x0, x0 + w0) × [y0, y0 + h0)`` drawn at ``scale`` level-0 px per
image px. Registration returns an opaque token (an HMAC of the layer's key under a per-process
secret, as for slides in :mod:`core.viewer.tiles`); the endpoint serves

- ``GET …/overlay/<token>_files/<level>/<col>_<row>.png``

with Deep Zoom's geometry (level ``L = ceil(log2(max(w, h)))`` is level 0 of the slide; each
level below halves it; :data:`TILE_SIZE` px tiles without overlap). Layers and recent tiles are
kept in LRU caches; what drawing needs (e.g. a run's cells) lives in the renderer, so the endpoint
never reads the store and the browser never names anything but a token.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable

from core.viewer.tiles import _LRU

TILE_SIZE = 256
FORMAT = "png"
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class OverlayLayer:
    width: int                  # level-0 px of the slide
    height: int
    render: Callable[[float, float, float, float, float], bytes]

    @property
    def max_level(self) -> int:
        return max(0, int(math.ceil(math.log2(max(self.width, self.height, 1)))))

    def level_size(self, level: int) -> tuple[int, int]:
        s = 2 ** (self.max_level - level)
        return max(1, int(math.ceil(self.width / s))), max(1, int(math.ceil(self.height / s)))

    def region(self, level: int, col: int, row: int) -> tuple[float, float, float, float, float]:
        """(x0, y0, w0, h0, scale) in level-0 px of one tile; ``ValueError`` off the pyramid."""
        if not (0 <= level <= self.max_level):
            raise ValueError("level")
        w, h = self.level_size(level)
        if not (0 <= col * TILE_SIZE < w and 0 <= row * TILE_SIZE < h):
            raise ValueError("address")
        s = float(2 ** (self.max_level - level))
        tw, th = min(TILE_SIZE, w - col * TILE_SIZE), min(TILE_SIZE, h - row * TILE_SIZE)
        return col * TILE_SIZE * s, row * TILE_SIZE * s, tw * s, th * s, s


class OverlaySource:
    """Registered overlay layers → tiles. Thread-safe."""

    def __init__(self, *, secret: bytes | None = None, max_layers: int = 8, max_tiles: int = 2048):
        self._secret = secret or os.urandom(32)
        self._layers = _LRU(max_layers)
        self._tiles = _LRU(max_tiles)
        self._lock = threading.Lock()

    def token_for(self, key: str) -> str:
        return hmac.new(self._secret, str(key).encode(), hashlib.sha256).hexdigest()[:32]

    def ensure(self, key: str, make: Callable[[], OverlayLayer]) -> str:
        """The token of the layer named ``key``, registering ``make()`` unless it is still held."""
        token = self.token_for(key)
        with self._lock:
            if token in self._layers:
                self._layers.move_to_end(token)
                return token
        return self.register(key, make())

    def register(self, key: str, layer: OverlayLayer) -> str:
        """``key`` names what the layer draws (the same key → the same token and cached tiles)."""
        token = self.token_for(key)
        with self._lock:
            if token not in self._layers:
                self._layers[token] = layer
                if len(self._layers) > self._layers.size:
                    self._layers.popitem(last=False)
            else:
                self._layers.move_to_end(token)
        return token

    def layer(self, token: str) -> OverlayLayer:
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise KeyError(token)
        with self._lock:
            return self._layers[token]

    def tile(self, token: str, level: int, col: int, row: int) -> bytes:
        """A PNG tile; ``KeyError`` for an unknown (or evicted) token, ``ValueError`` off the pyramid."""
        key = (token, level, col, row)
        with self._lock:
            hit = self._tiles.get(key)
            if hit is not None:
                self._tiles.move_to_end(key)
                return hit
        layer = self.layer(token)
        data = layer.render(*layer.region(level, col, row))
        with self._lock:
            self._tiles[key] = data
            if len(self._tiles) > self._tiles.size:
                self._tiles.popitem(last=False)
        return data
