"""Deep Zoom tiles of registered slides, read from the pyramid on demand.

A slide is *registered* by the app when a user who may see it opens it; registration returns an
opaque token (an HMAC of the slide's path under a per-process secret). Tile URLs carry only that
token: the endpoint never receives a path from the browser, and a token cannot be guessed or
derived for a slide that was not registered.

Tiles come from OpenSlide's ``DeepZoomGenerator`` (as in OpenSlide's own deep-zoom viewer
examples): 254 px tiles with a 1 px overlap, JPEG. Open generators and recent tiles are kept in
small LRU caches, so a pan that revisits tiles costs no decode.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

TILE_SIZE = 254
OVERLAP = 1
FORMAT = "jpeg"
QUALITY = 80
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SlideEntry:
    path: str
    width: int
    height: int
    mpp: float | None


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class TileSource:
    """Registered slides → Deep Zoom descriptors and tiles. Thread-safe."""

    def __init__(self, *, secret: bytes | None = None, max_slides: int = 16, max_tiles: int = 2048):
        self._secret = secret or os.urandom(32)
        self._entries: dict[str, SlideEntry] = {}
        self._gens = _LRU(max_slides)
        self._tiles = _LRU(max_tiles)
        self._lock = threading.Lock()
        self._image_locks: dict[str, threading.Lock] = {}

    # -- registration (app side) ----------------------------------------------------------------
    def token(self, path: str | Path) -> str:
        return hmac.new(self._secret, str(Path(path).resolve()).encode(), hashlib.sha256).hexdigest()[:32]

    def register(self, path: str | Path) -> str:
        """Opens the slide once (its size must be readable) and returns its token."""
        from core.wsi.slide import Slide

        path = str(Path(path).resolve())
        token = self.token(path)
        if token not in self._entries:
            with Slide(path) as s:
                w, h = s.dimensions
                mpp = s._mpp_or_none()
            with self._lock:
                self._entries[token] = SlideEntry(path, int(w), int(h), mpp)
            threading.Thread(target=self.prefetch, args=(token,), name="tessera-prefetch", daemon=True).start()
        return token

    def prefetch(self, token: str, max_px: int = 2048) -> int:
        """Decode the pyramid's overview levels (up to ``max_px`` wide) into the tile cache, so that a
        slide's first view draws from memory. Returns the number of tiles cached."""
        try:
            gen = self._generator(token)[0]
            n = 0
            for level, (w, h) in enumerate(gen.level_dimensions):
                if max(w, h) > max_px:
                    break
                cols, rows = gen.level_tiles[level]
                for col in range(cols):
                    for row in range(rows):
                        self.tile(token, level, col, row)
                        n += 1
            return n
        except Exception:   # a slide that cannot be read: the browser's requests will report it
            return 0

    def entry(self, token: str) -> SlideEntry | None:
        if not isinstance(token, str) or not _TOKEN.match(token):
            return None
        return self._entries.get(token)

    # -- serving (endpoint side) ----------------------------------------------------------------
    def _generator(self, token: str):
        entry = self.entry(token)
        if entry is None:
            raise KeyError(token)

        def make():
            import openslide
            from openslide.deepzoom import DeepZoomGenerator

            osr = openslide.open_slide(entry.path)
            return DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)

        with self._lock:
            gen = self._gens.get_or(token, make)
            lock = self._image_locks.get(token)
            if lock is None and type(gen._osr).__name__ == "ImageSlide":
                # a plain JPEG/PNG/TIFF read by PIL (openslide.ImageSlide): PIL images are not safe to
                # read from several threads, unlike OpenSlide handles
                lock = self._image_locks.setdefault(token, threading.Lock())
        return gen, lock

    def dzi(self, token: str) -> str:
        return self._generator(token)[0].get_dzi(FORMAT)

    def tile(self, token: str, level: int, col: int, row: int) -> bytes:
        """A JPEG tile; ``KeyError`` for an unknown token, ``ValueError`` for a tile off the pyramid."""
        key = (token, level, col, row)
        with self._lock:
            hit = self._tiles.get(key)
            if hit is not None:
                self._tiles.move_to_end(key)
                return hit
        gen, lock = self._generator(token)
        if not (0 <= level < gen.level_count):
            raise ValueError("level")
        cols, rows = gen.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError("address")
        # OpenSlide handles are safe to read from several threads (ctypes releases the GIL meanwhile)
        if lock is None:
            img = gen.get_tile(level, (col, row))
        else:
            with lock:
                img = gen.get_tile(level, (col, row))
        if img.mode != "RGB":
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=QUALITY)
        data = buf.getvalue()
        with self._lock:
            self._tiles[key] = data
            if len(self._tiles) > self._tiles.size:
                self._tiles.popitem(last=False)
        return data
