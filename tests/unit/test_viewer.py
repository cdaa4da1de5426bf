"""The viewer's server side: Deep Zoom tiles of registered slides over HTTP, the tokens that stand
in for paths, the OpenSeadragon download check, and the overlay that sits on the tile grid."""
from __future__ import annotations

import io
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.analysis import slideview
from core.analysis.overlay import colorize, tile_grid
from core.viewer import vendor
from core.viewer.server import TileServer
from core.viewer.tiles import TileSource


@pytest.fixture
def server():
    srv = TileServer("127.0.0.1", 0)
    yield srv
    srv.stop()


def _get(srv, path: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_tiles_equal_openslide_deepzoom(server, slide_file):
    """A tile from the endpoint decodes to OpenSlide's own DeepZoomGenerator tile (JPEG q80: within
    a few grey levels on average); the descriptor is OpenSlide's."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    token = server.source.register(slide_file)
    code, body, headers = _get(server, f"/dzi/{token}.dzi")
    assert code == 200 and b'Width="1600"' in body and b'Height="1200"' in body
    gen = DeepZoomGenerator(openslide.open_slide(str(slide_file)), tile_size=254, overlap=1, limit_bounds=False)
    level = gen.level_count - 1
    code, body, headers = _get(server, f"/dzi/{token}_files/{level}/2_1.jpeg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float64)
    want = np.asarray(gen.get_tile(level, (2, 1)).convert("RGB"), np.float64)
    assert got.shape == want.shape
    # the fixture's tissue is per-pixel noise, which JPEG smooths: compare 16 × 16 block means
    blocks = lambda a: a.reshape(16, 16, 16, 16, 3).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(blocks(got) - blocks(want)).max() < 3.0
    # a reverse proxy may mount the endpoint under a prefix
    assert _get(server, f"/tiles/dzi/{token}_files/{level}/0_0.jpeg")[0] == 200


def test_unknown_tokens_paths_and_addresses_are_404(server, slide_file):
    token = server.source.register(slide_file)
    level = TileSource().token(slide_file)  # another process's secret: a different token
    assert level != token
    for path in [f"/dzi/{level}.dzi", "/dzi/" + "0" * 32 + ".dzi", f"/dzi/{token}_files/99/0_0.jpeg",
                 f"/dzi/{token}_files/0/5_5.jpeg", f"/dzi/{token}_files/12/999_0.jpeg",
                 "/etc/passwd", f"/dzi/{token}/../../etc/passwd", f"/dzi/{slide_file}", "/dzi/ABC.dzi"]:
        code, body, _ = _get(server, path)
        assert code == 404, path
        assert str(slide_file).encode() not in body
    assert _get(server, "/health")[:2] == (200, b"ok")


def test_prefetch_fills_the_overview_levels(slide_file):
    src = TileSource()
    token = src.token(slide_file)
    src.register(slide_file)
    n = src.prefetch(token, max_px=400)
    assert n > 0
    assert len(src._tiles) >= n


def test_vendor_refuses_a_tampered_tarball_and_unpacks_only_the_script(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [("package/build/openseadragon/openseadragon.min.js", b"var OpenSeadragon;"),
                           ("package/build/openseadragon/images/home_rest.png", b"png"),
                           ("package/build/openseadragon/../../../evil.js", b"x"),
                           ("package/src/viewer.js", b"src")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with pytest.raises(RuntimeError, match="integrity"):
        vendor.unpack(data, tmp_path / "v")
    import base64
    import hashlib

    monkeypatch.setattr(vendor, "INTEGRITY", "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode())
    vendor.unpack(data, tmp_path / "v")
    files = sorted(p.relative_to(tmp_path / "v").as_posix() for p in (tmp_path / "v").rglob("*") if p.is_file())
    assert files == ["LICENSE.txt", "VERSION", "images/home_rest.png", "openseadragon.min.js"]
    assert not (tmp_path / "evil.js").exists()


def test_overlay_pixels_sit_on_their_tiles():
    """Each overlay pixel is one grid cell: the tile at level-0 (x, y) colours cell (y // size, x // size)."""
    tiles = pd.DataFrame({"tile_idx": [0, 1, 2], "x": [0, 200, 400], "y": [0, 100, 300],
                          "tissue": [1.0, 0.3, 0.9], "value": [0.0, 1.0, 2.0]})
    view = slideview.overlay_view(tiles, 100, 450, 380, vmin=0, vmax=2, cmap="viridis")
    assert (view.width_px, view.height_px) == (500, 400)
    import base64

    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(view.url.split(",", 1)[1]))))
    assert img.shape == (4, 5, 4)
    assert img[0, 0, 3] == img[1, 2, 3] == img[3, 4, 3] == 255
    assert img[0, 1, 3] == 0 and img[2, 2, 3] == 0
    lut = colorize(np.array([[0.0, 1.0, 2.0]]), 0, 2, "viridis")[0]
    assert (img[0, 0] == lut[0]).all() and (img[1, 2] == lut[1]).all() and (img[3, 4] == lut[2]).all()
    # tissue-only display hides the tile with 30 % tissue
    hidden = slideview.overlay_view(tiles, 100, 450, 380, vmin=0, vmax=2, tissue_min=0.5)
    assert hidden.n_tiles == 2
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(hidden.url.split(",", 1)[1]))))
    assert img[1, 2, 3] == 0 and img[0, 0, 3] == 255


def test_tile_at_summary_and_ranges():
    tiles = pd.DataFrame({"tile_idx": [0, 1, 2, 3], "x": [0, 100, 0, 100], "y": [0, 0, 100, 100],
                          "value": [1.0, 2.0, 3.0, 4.0]})
    assert slideview.tile_at(tiles, 150, 50, 100)["tile_idx"] == 1
    assert slideview.tile_at(tiles, 250, 50, 100) is None
    s = slideview.layer_summary(tiles, 100)
    # by hand: mean 2.5, q90 (linear interpolation) 3.7; z = -1.5, -0.5, 0.5, 1.5; rook pairs
    # (0,1) 0.75, (2,3) 0.75, (0,2) -0.75, (1,3) -0.75 → Σ z_i z_j = 0 → Moran's I = 0
    assert s["mean"] == pytest.approx(2.5) and s["q90"] == pytest.approx(3.7)
    assert s["morans_i"] == pytest.approx(0.0, abs=1e-12)
    assert slideview.shared_range([np.array([1.0, 2.0]), np.array([5.0])]) == (1.0, 5.0)
    lo, hi = slideview.shared_range([np.arange(101.0)], "robust")
    assert (lo, hi) == (2.0, 98.0)
    leg = slideview.legend(0, 1, "viridis", n=3)
    assert leg["min"] == "0" and len(leg["stops"]) == 3 and leg["stops"][0] == "#440154"
    assert tile_grid(np.zeros((0, 2)), np.zeros(0), 10, 30, 20).shape == (2, 3)
