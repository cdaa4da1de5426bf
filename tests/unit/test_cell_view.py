"""The Slide page's cell layer (core.analysis.cell_view): cells are drawn where they are, in their
type's colour (or their value's), within the image cap; the composition sums to 1."""
from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.analysis import cell_view as cv


def cells_frame(xy, types, *, major=8.0, minor=6.0, values=None, tiles=None) -> pd.DataFrame:
    xy = np.asarray(xy, np.float32)
    n = len(xy)
    return pd.DataFrame({"tile_idx": np.asarray(tiles if tiles is not None else np.zeros(n), np.int32),
                         "x": xy[:, 0], "y": xy[:, 1], "major_um": np.full(n, major, np.float32),
                         "minor_um": np.full(n, minor, np.float32), "angle": np.zeros(n, np.float32),
                         "type": np.asarray(types, np.int16),
                         "value": np.asarray(values if values is not None else np.full(n, np.nan), np.float32)})


def decode(view: cv.CellView) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view.url.split(",", 1)[1]))).convert("RGBA"))


def test_dots_land_where_the_cells_are_in_their_types_colour():
    cells = cells_frame([(50, 40), (200, 150), (120, 30)], [0, 2, 1])
    index, palette = cv.cell_palette(cells, 3)
    img, scale = cv.rasterize(cells, index, 300, 200, mpp=0.5)
    assert scale == 1.0 and img.size == (300, 200)
    rgba = cv.to_rgba(img, palette)
    colors = cv.type_colors(3)
    for (x, y), t in zip([(50, 40), (200, 150), (120, 30)], [0, 2, 1]):
        assert tuple(rgba[y, x, :3]) == tuple(colors[t]) and rgba[y, x, 3] > 200
        # 8 µm major axis at 0.5 µm/px: 16 px across; 12 px beyond the centre is background
        assert rgba[y, x + 12, 3] == 0 and rgba[y + 12, x, 3] == 0
    assert len({tuple(c) for c in colors}) == 3                      # one colour per type
    drawn = rgba[..., 3] > 0
    assert 3 * 0.6 * np.pi * 8 * 6 < drawn.sum() < 3 * 1.4 * np.pi * 8 * 6   # ≈ three 16 × 12 px ellipses
    assert not drawn[:, :20].any() and not drawn[180:].any()


def test_outline_leaves_the_centre_clear_and_values_follow_the_colour_map():
    cells = cells_frame([(50, 50), (150, 50)], [0, 0], major=20, minor=20, values=[0.0, 1.0])
    index, palette = cv.cell_palette(cells, 1, by="value", vmin=0.0, vmax=1.0, cmap="viridis")
    rgba = cv.to_rgba(cv.rasterize(cells, index, 200, 100, mpp=0.5, outline=True)[0], palette)
    assert rgba[50, 50, 3] == 0 and rgba[48:53, 68:73, 3].any()       # a ring of radius 20 px
    assert not rgba[40:60, 40:60, 3].any()
    from core.analysis.overlay import colorize
    lo, hi = colorize(np.array([[0.0, 1.0]]), 0, 1, "viridis")[0, :, :3]
    ring0, ring1 = rgba[30:71, 28:73], rgba[30:71, 128:173]
    assert {tuple(c) for c in ring0[ring0[..., 3] > 0][:, :3]} == {tuple(lo)}
    assert {tuple(c) for c in ring1[ring1[..., 3] > 0][:, :3]} == {tuple(hi)}


def test_a_cell_without_a_value_is_not_drawn():
    cells = cells_frame([(20, 20), (60, 20)], [0, 0], values=[np.nan, 2.0])
    index, palette = cv.cell_palette(cells, 1, by="value", vmin=0.0, vmax=4.0)
    rgba = cv.to_rgba(cv.rasterize(cells, index, 100, 50, mpp=0.5)[0], palette)
    assert rgba[20, 20, 3] == 0 and rgba[20, 60, 3] > 0


def test_large_slides_are_capped_and_the_view_covers_the_slide():
    cells = cells_frame([(10_000, 5_000)], [1])
    view = cv.cell_view(cells, 2, 20_000, 10_000, mpp=0.25, max_px=2000)
    assert view.scale == pytest.approx(10.0) and view.n_cells == 1
    rgba = decode(view)
    assert rgba.shape[:2] == (1000, 2000)
    assert view.width_px == 20_000 and view.height_px == 10_000
    assert rgba[500, 1000, 3] > 0                                     # tiny there, still drawn (min radius)
    assert cv.image_scale(3000, 2000) == 1.0                          # small slides: their own resolution


def test_composition_sums_to_one_for_the_slide_and_a_tile():
    cells = cells_frame(np.zeros((6, 2)), [0, 0, 1, 2, 2, 2], tiles=[0, 0, 0, 1, 1, 1])
    comp = cv.composition(cells, ["tumour", "t_cell", "fibroblast"], tile_idx=1)
    assert comp["slide"].sum() == pytest.approx(1.0) and comp["tile"].sum() == pytest.approx(1.0)
    assert list(comp["slide n"]) == [2, 1, 3] and list(comp["tile n"]) == [0, 0, 3]
    assert list(comp["cell type"]) == ["tumour", "t cell", "fibroblast"]
    empty = cv.composition(cells.iloc[:0], ["a", "b"])
    assert empty["slide"].sum() == 0


def test_layer_names_and_tile_values():
    assert cv.cell_gene("cells:gene:ERBB2") == "ERBB2" and cv.cell_gene("cells:type") is None
    assert cv.is_cell_layer("cells:type") and cv.is_cell_layer("cells:gene:CD8A") and not cv.is_cell_layer("gene:CD8A")
    cells = cells_frame(np.zeros((3, 2)), [0, 1, 1], values=[1.0, 2.0, 4.0], tiles=[0, 0, 2])
    tiles = pd.DataFrame({"tile_idx": [0, 1, 2], "x": [0, 224, 448], "y": [0, 0, 0], "tissue": [1.0, 1.0, 1.0]})
    assert list(cv.tile_values(tiles, cells)["value"]) == [2.0, 0.0, 1.0]
    means = cv.tile_values(tiles, cells, by="value")["value"].to_numpy()
    assert means[0] == pytest.approx(1.5) and np.isnan(means[1]) and means[2] == pytest.approx(4.0)
    legend = cv.type_legend(["t_cell", "b_plasma"])["categories"]
    assert [c["label"] for c in legend] == ["t cell", "b plasma"] and legend[0]["color"] != legend[1]["color"]


def test_high_res_overlay_fills_the_central_cells():
    """A stride-½ run's overlay: one pixel per half tile, offset by a quarter tile."""
    from core.analysis import slideview

    size, step = 100, 50
    tiles = pd.DataFrame({"tile_idx": [0, 1, 2], "x": [0, 50, 100], "y": [0, 0, 0], "tissue": [1.0] * 3,
                          "value": [1.0, 2.0, 3.0]})
    view = slideview.overlay_view(tiles, size, 300, 200, vmin=0, vmax=3, step=step)
    assert (view.x_px, view.y_px) == (25.0, 25.0) and view.width_px == 300
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(view.url.split(",", 1)[1]))))
    assert rgba.shape[:2] == (4, 6) and (rgba[0, :3, 3] == 255).all() and rgba[0, 3, 3] == 0
    hit = slideview.tile_at(tiles, 80, 40, size, step)                # in tile 1's central cell
    assert int(hit["tile_idx"]) == 1
    smooth = slideview.overlay_view(tiles, size, 300, 200, vmin=0, vmax=3, step=step, smooth=True)
    srgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(smooth.url.split(",", 1)[1]))))
    assert srgba.shape[:2] == (16, 24) and srgba[..., 3].any() and not srgba[8:, :, 3].any()
    on_grid = slideview.default_grid_tiles(tiles, size)
    assert list(on_grid["tile_idx"]) == [0, 2]


def test_pyramid_tiles_match_the_whole_slide_image():
    """A tile of the tiled cell layer is the same pixels as that region of the whole-slide image
    drawn at the same scale (hand check: full zoom, tile (1, 0); and an overview level), and the
    endpoint serves it by token only."""
    import io
    import urllib.request

    from PIL import Image

    from core.viewer.overlays import OverlayLayer
    from core.viewer.server import TileServer

    rng = np.random.default_rng(3)
    n = 400
    cells = pd.DataFrame({"tile_idx": 0, "x": rng.uniform(0, 600, n), "y": rng.uniform(0, 300, n),
                          "major_um": rng.uniform(4, 9, n), "minor_um": rng.uniform(2, 4, n),
                          "angle": rng.uniform(0, 3, n), "type": rng.integers(0, 3, n).astype(np.int16),
                          "value": np.nan})
    pyr = cv.CellPyramid(cells, 3, 0.5)
    layer = OverlayLayer(600, 300, pyr.render)
    assert layer.max_level == 10 and layer.level_size(10) == (600, 300) and layer.level_size(9) == (300, 150)
    index, palette = cv.cell_palette(pyr.cells, 3)
    whole = cv.to_rgba(cv.rasterize(pyr.cells, index, 600, 300, mpp=0.5, scale=1.0)[0], palette)
    tile = np.asarray(Image.open(io.BytesIO(pyr.render(*layer.region(10, 1, 0)))).convert("RGBA"))
    assert tile.shape == (256, 256, 4)
    assert (tile == whole[:256, 256:512]).mean() > 0.995        # polygon edges may differ by a pixel
    half = cv.to_rgba(cv.rasterize(pyr.cells, index, 600, 300, mpp=0.5, scale=2.0)[0], palette)
    top = np.asarray(Image.open(io.BytesIO(pyr.render(*layer.region(9, 0, 0)))).convert("RGBA"))
    assert top.shape == (150, 256, 4) and (top == half[:, :256]).mean() > 0.995
    with pytest.raises(ValueError):
        layer.region(10, 3, 0)                                   # off the pyramid
    server = TileServer("127.0.0.1", 0)
    try:
        token = server.overlays.register("test-layer", layer)
        base = f"http://127.0.0.1:{server.port}/overlay/{token}_files"
        with urllib.request.urlopen(f"{base}/10/1_0.png") as r:
            assert r.headers["Content-Type"] == "image/png" and r.read()[:4] == b"\x89PNG"
        for bad in (f"{base}/10/9_9.png", f"http://127.0.0.1:{server.port}/overlay/{'0' * 32}_files/10/0_0.png",
                    f"http://127.0.0.1:{server.port}/overlay/../etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(bad)
            assert err.value.code == 404
    finally:
        server.stop()
