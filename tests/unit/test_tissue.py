"""Tissue detection: synthetic thumbnails with known truth, and three real slides.

Ranges for the real slides were set by looking at the thumbnails and the rendered previews
(tissue outlined, everything else greyed), not by tuning the detector to the numbers.
"""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.wsi.tiling import render_preview
from core.wsi.tissue import TissueMask, detect_tissue, tile_tissue_fraction

MPP = 4.0  # µm per synthetic thumbnail px: a 800 × 600 thumbnail is a 3.2 × 2.4 mm field
H, W = 600, 800
# Marker ink as transmission (Beer–Lambert): it multiplies whatever lies under it.
BLUE_INK, GREEN_INK, BLACK_INK = (0.25, 0.40, 0.85), (0.30, 0.75, 0.45), (0.12, 0.12, 0.14)


def _jpeg(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _glass(rng, level=243.0, cast=(0.0, -1.0, 1.0)) -> np.ndarray:
    noise = rng.normal(0, 2.0, (H, W, 1)) + rng.normal(0, 1.0, (H, W, 3))
    return np.clip(level + np.asarray(cast) + noise, 0, 255)


def _stroke(points, width) -> np.ndarray:
    img = Image.new("L", (W, H), 0)
    ImageDraw.Draw(img).line(points, fill=255, width=width, joint="curve")
    return np.asarray(img) > 0


def _ink(img: np.ndarray, where: np.ndarray, ink) -> None:
    img[where] = img[where] * np.asarray(ink)


def synthetic(seed: int = 0, *, pens: bool = True, padding: bool = True):
    """Glass, an H&E-like ellipse + a small fragment, dust, pen strokes, black padding.

    Returns (jpeg-compressed RGB, dict of truth masks).
    """
    rng = np.random.default_rng(seed)
    img = _glass(rng)
    yy, xx = np.mgrid[0:H, 0:W]
    blob = ((xx - 380) / 260.0) ** 2 + ((yy - 300) / 200.0) ** 2 < 1
    fragment = (np.abs(xx - 90) < 15) & (np.abs(yy - 480) < 15)  # 30 × 30 px = 14,400 µm²: kept
    tissue = blob | fragment
    base = np.array([225.0, 150.0, 190.0]) + rng.normal(0, 8, (H, W, 1)) + rng.normal(0, 5, (H, W, 3))
    pale = rng.random((H, W)) < 0.15
    base[pale] = np.array([236.0, 205.0, 224.0]) + rng.normal(0, 3, (pale.sum(), 3))
    nuclei = rng.random((H, W)) < 0.06
    base[nuclei] = np.array([110.0, 70.0, 160.0]) + rng.normal(0, 10, (nuclei.sum(), 3))
    img[tissue] = base[tissue]
    truth = {"tissue": tissue, "fragment": fragment}
    dust = np.zeros((H, W), bool)
    for y, x in rng.integers([20, 660], [580, 760], size=(12, 2)):  # right margin: glass only
        dust[y:y + 2, x:x + 2] = True  # 2 × 2 px dark specks (64 µm²)
    img[dust] = 90.0
    speck = (np.abs(xx - 700) < 3) & (np.abs(yy - 60) < 3)  # a pink cell clump, 576 µm²
    img[speck] = (200.0, 110.0, 170.0)
    truth.update(dust=dust, speck=speck)
    if pens:
        truth["blue"] = _stroke([(60, 560), (380, 300), (720, 120)], 10)
        truth["green"] = _stroke([(150, 40), (420, 250), (640, 560)], 8)
        truth["black"] = _stroke([(40, 40), (60, 200)], 6)
        for name, ink in (("blue", BLUE_INK), ("green", GREEN_INK), ("black", BLACK_INK)):
            _ink(img, truth[name], ink)
    if padding:
        pad = (xx >= 770) | (yy >= 575)
        img[pad] = rng.integers(0, 6, (pad.sum(), 1))
        truth["padding"] = pad
    return _jpeg(np.clip(img + 0.5, 0, 255).astype(np.uint8)), truth


@pytest.fixture(scope="module")
def synth():
    rgb, truth = synthetic()
    return rgb, truth, detect_tissue(rgb, mpp=MPP)


def _iou(a, b) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def test_tissue_blob_found(synth):
    rgb, truth, tm = synth
    assert isinstance(tm, TissueMask) and tm.mask.dtype == bool and tm.mask.shape == rgb.shape[:2]
    expected = truth["tissue"] & ~(truth["blue"] | truth["green"])
    assert _iou(tm.mask, expected) > 0.93
    assert tm.fraction == pytest.approx(expected.mean(), rel=0.08)
    assert tm.mask[truth["fragment"]].mean() > 0.9  # 14,400 µm² > min_object_um2: kept
    assert 0.05 <= tm.threshold <= 0.15 and 0.08 <= tm.od_threshold <= 0.25
    assert tm.area_mm2 == pytest.approx(tm.n_tissue * MPP ** 2 / 1e6)


@pytest.mark.parametrize("colour", ["blue", "green", "black"])
def test_pen_strokes_flagged_and_excluded(synth, colour):
    _, truth, tm = synth
    stroke = truth[colour]
    assert tm.pen[stroke].mean() > 0.95, f"{colour} ink not flagged as pen"
    assert not (tm.mask & stroke).any(), f"{colour} ink pixels counted as tissue"


def test_pen_on_a_large_thumbnail():
    """Above 1 Mpx the pen search runs on every other pixel; strokes must still be cut out."""
    rgb, truth = synthetic(2)
    big = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)  # 1600 × 1200 = 1.9 Mpx at 2 µm/px
    tm = detect_tissue(big, mpp=MPP / 2)
    for colour in ("blue", "green", "black"):
        stroke = np.repeat(np.repeat(truth[colour], 2, axis=0), 2, axis=1)
        assert tm.pen[stroke].mean() > 0.95 and not (tm.mask & stroke).any(), colour
    assert not tm.pen[np.repeat(np.repeat(truth["padding"], 2, axis=0), 2, axis=1)].any()


def test_pen_counts_are_reported(synth):
    _, truth, tm = synth
    strokes = truth["blue"] | truth["green"] | truth["black"]
    assert tm.n_pen == int(tm.pen.sum()) and tm.n_pen >= strokes.sum()
    # the 2 px halo around each stroke, not more: pen does not eat the tissue around it
    assert tm.n_pen < 2.5 * strokes.sum()
    assert tm.mask[truth["tissue"] & ~tm.pen].mean() > 0.97


def test_black_padding_is_background(synth):
    _, truth, tm = synth
    pad = truth["padding"]
    assert tm.background[pad].all()
    assert not tm.mask[pad].any() and not tm.pen[pad].any()


def test_dust_and_cell_clumps_removed(synth):
    _, truth, tm = synth
    assert not tm.mask[truth["dust"]].any()
    assert not tm.mask[truth["speck"]].any()
    assert tm.n_objects_removed >= 1


def test_glass_is_background(synth):
    _, truth, tm = synth
    glass = ~truth["tissue"] & ~truth["padding"] & ~truth["dust"] & ~truth["speck"]
    glass &= ~tm.pen  # strokes and their 2 px halo
    assert tm.background[glass].mean() > 0.995
    assert tm.mask[glass].mean() < 0.005  # the mask edge, a pixel or two past the blob


@pytest.mark.parametrize("level, cast", [(243.0, (0, -1, 1)), (214.0, (3, 0, -3)), (252.0, (0, 0, 0))])
def test_blank_glass_gives_empty_mask(level, cast):
    """Bright, dim-and-tinted, and near-white glass: Otsu must not split noise into tissue."""
    rgb = _jpeg(np.clip(_glass(np.random.default_rng(3), level, cast) + 0.5, 0, 255).astype(np.uint8))
    tm = detect_tissue(rgb, mpp=MPP)
    assert tm.n_tissue == 0 and tm.fraction == 0.0 and tm.n_pen == 0
    assert tm.background.mean() > 0.999


def test_constant_and_black_images():
    white = np.full((200, 300, 3), 255, np.uint8)
    assert detect_tissue(white, mpp=None).n_tissue == 0
    black = np.zeros((200, 300, 3), np.uint8)  # all padding
    tm = detect_tissue(black, mpp=None)
    assert tm.n_tissue == 0 and tm.n_pen == 0 and tm.background.all()


def test_haematoxylin_and_counterstain_are_not_pen():
    """Blue-violet nuclei, pure haematoxylin and blue-grey IHC counterstain are not blue ink.

    Pure haematoxylin: transmission 10^(−OD·c) for the Ruifrok & Johnston (2001) OD vector
    (0.65, 0.70, 0.29) at c = 1 gives RGB ≈ (57, 51, 130).
    """
    rng = np.random.default_rng(5)
    img = _glass(rng)
    yy, xx = np.mgrid[0:H, 0:W]
    regions = {
        "nuclei": (((xx - 150) / 120.0) ** 2 + ((yy - 300) / 120.0) ** 2 < 1, (95.0, 70.0, 150.0)),
        "haematoxylin": (((xx - 400) / 120.0) ** 2 + ((yy - 300) / 120.0) ** 2 < 1,
                         255 * 10 ** (-np.array([0.65, 0.70, 0.29]))),
        "ihc": (((xx - 650) / 120.0) ** 2 + ((yy - 300) / 120.0) ** 2 < 1, (175.0, 180.0, 200.0)),
    }
    for where, colour in regions.values():
        img[where] = np.asarray(colour) + rng.normal(0, 8, (where.sum(), 3))
    rgb = _jpeg(np.clip(img, 0, 255).astype(np.uint8))
    for mpp in (MPP, 8.0, None):
        tm = detect_tissue(rgb, mpp=mpp)
        assert tm.n_pen == 0, mpp
        for name, (where, _) in regions.items():
            assert tm.mask[where].mean() > 0.97, (name, mpp)


def test_min_object_is_physical():
    """A 20 × 20 px pink square: 1,600 µm² at 2 µm/px (dropped), 6,400 µm² at 4 µm/px (kept)."""
    img = np.full((200, 200, 3), 243, np.uint8)
    img[90:110, 90:110] = (215, 140, 185)
    assert detect_tissue(img, mpp=2.0).n_tissue == 0
    assert detect_tissue(img, mpp=4.0).n_tissue > 300
    # without µm/px the limit is a fraction of the thumbnail (1e-4 of 40,000 px = 4 px)
    assert detect_tissue(img, mpp=None).n_tissue > 300
    assert detect_tissue(img, mpp=None, min_object_frac=0.02).n_tissue == 0


def test_rgba_transparent_is_white_and_bad_input_rejected():
    rgb, _ = synthetic(1, pens=False, padding=False)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :100, 3] = 0  # unscanned: OpenSlide would composite this onto white
    tm = detect_tissue(rgba, mpp=MPP)
    assert tm.background[:, :95].all() and tm.n_tissue > 0
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_tissue(rgb.astype(np.float32), mpp=MPP)


def _fraction_reference(mask, scale, xy, size):
    """Independent check: overlap of each tile with each mask pixel, summed in a loop."""
    out = []
    for x, y in xy:
        x0, y0, x1, y1 = x / scale, y / scale, (x + size) / scale, (y + size) / scale
        area = 0.0
        for j in range(mask.shape[0]):
            oy = max(0.0, min(y1, j + 1) - max(y0, j))
            for i in range(mask.shape[1]):
                ox = max(0.0, min(x1, i + 1) - max(x0, i))
                area += ox * oy * mask[j, i]
        out.append(area / ((x1 - x0) * (y1 - y0)))
    return np.array(out)


def test_tile_fraction_exact_with_fractional_footprints():
    rng = np.random.default_rng(2)
    mask = rng.random((9, 11)) < 0.5
    scale, size = 2.5, 7  # footprints of 2.8 mask px starting at fractional positions
    xy = np.array([[0, 0], [3, 4], [11, 7], [19, 13], [24, 19], [-3, 2], [25, 20]])
    got = tile_tissue_fraction(mask, scale, xy, size)
    np.testing.assert_allclose(got, _fraction_reference(mask, scale, xy, size), atol=1e-6)


def test_tile_fraction_full_empty_and_outside():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    got = tile_tissue_fraction(mask, 4.0, np.array([[0, 0], [20, 0], [8, 8], [36, 36]]), 8)
    np.testing.assert_allclose(got, [1.0, 0.0, 1.0, 0.0], atol=1e-9)
    # a tile hanging off the right edge: the part outside the mask is background
    assert tile_tissue_fraction(np.ones((10, 10), bool), 1.0, np.array([[8, 0]]), 4)[0] == pytest.approx(0.5)


def test_render_preview_draws_tissue_pen_and_tiles(synth):
    rgb, truth, tm = synth
    out = render_preview(rgb, tm)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    from scipy import ndimage

    interior = ndimage.binary_erosion(tm.mask, iterations=2)
    assert (out[interior] == rgb[interior]).all()  # tissue shown as is
    rejected = ~tm.mask & ~tm.pen
    assert (out[rejected] != rgb[rejected]).any(axis=-1).mean() > 0.9  # greyed out
    pen_px = out[tm.pen].astype(int)
    assert (pen_px[:, 0] > pen_px[:, 1] + 60).mean() > 0.95  # pen shown red
    xy = np.array([[200, 200], [400, 280]]) * 2  # level 0, at 2 level-0 px per thumbnail px
    framed = render_preview(rgb, tm, grid=(xy, 80), scale=2.0)
    assert tuple(framed[220, 200]) == (40, 80, 220)  # left edge of the first tile (x = 200)
    assert tuple(framed[220, 239]) == (40, 80, 220) and tuple(framed[220, 241]) == tuple(out[220, 241])
    small = render_preview(rgb[::2, ::2], tm.mask, pen=tm.pen)  # masks resized to the image
    assert small.shape == rgb[::2, ::2].shape


# --- real slides (../shared/data/wsi) ----------------------------------------------------


def _openslide_thumb(path, max_px=1024):
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as osr:
        thumb = np.asarray(osr.get_thumbnail((max_px, max_px)).convert("RGB"))
        mpp = osr.properties.get("openslide.mpp-x")
        scale = osr.dimensions[0] / thumb.shape[1]
    return thumb, (float(mpp) * scale if mpp else None), scale


def test_real_cmu_small_region(shared_data):
    """Aperio H&E skin, 2220 × 2967 px at 0.499 µm/px; 766 × 1024 thumbnail at 1.45 µm/px.

    By eye the tissue strip covers ~40 % of the field; a detached cell clump (top right,
    ~20 µm) and the teal margin dye specks at the tissue edge are not tiled.
    """
    thumb, mpp, scale = _openslide_thumb(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    tm = detect_tissue(thumb, mpp=mpp)
    assert mpp == pytest.approx(1.446, abs=0.01)
    assert 0.35 < tm.fraction < 0.45
    assert 0.05 <= tm.threshold <= 0.12
    assert not tm.mask[200:220, 710:730].any()  # the detached clump
    assert tm.mask[600:900, 300:500].mean() > 0.98  # the dermis in the middle
    assert tm.background[:300, :150].mean() > 0.99 and tm.background[500:, :150].mean() > 0.99
    # tiles of 112 µm: those over the strip have tissue, those on the left glass none
    size = int(round(112 / 0.499))
    xs, ys = np.meshgrid(np.arange(0, 2220 - size, size), np.arange(0, 2967 - size, size))
    xy = np.stack([xs.ravel(), ys.ravel()], 1)
    frac = tile_tissue_fraction(tm.mask, scale, xy, size)
    assert frac[(xy[:, 0] + size < 400) & (xy[:, 1] > 1500)].max() < 0.05  # glass, lower left
    assert 0.3 < (frac >= 0.3).mean() < 0.5


@pytest.mark.parametrize("colour, ink", [("blue", BLUE_INK), ("green", GREEN_INK)])
def test_real_tissue_with_ink_drawn_on(shared_data, colour, ink):
    """Real H&E colours under ink: a stroke multiplied onto the CMU thumbnail (Beer–Lambert)
    is flagged, and the tissue lost is the stroke, its halo, and nothing much more.

    Ink over near-black nuclei stays dark purple (e.g. RGB 27, 11, 47) and cannot be told
    from a nucleus: ~0.1 % of the stroke is still tissue (measured 6 px blue, 15 px green).
    """
    thumb, mpp, _ = _openslide_thumb(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    clean = detect_tissue(thumb, mpp=mpp)
    img = thumb.astype(np.float64)
    h, w = thumb.shape[:2]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([(40, 150), (380, 560), (740, 980)], fill=255, width=9)
    stroke = np.asarray(canvas) > 0
    img[stroke] *= np.asarray(ink)
    inked = detect_tissue(_jpeg(np.clip(img + 0.5, 0, 255).astype(np.uint8), 90), mpp=mpp)
    assert inked.pen[stroke].mean() > 0.99
    assert (inked.mask & stroke).sum() < 0.005 * stroke.sum()
    lost = clean.mask & ~inked.mask
    assert lost.sum() < 2.0 * (clean.mask & stroke).sum()  # stroke + 2 px halo on each side
    assert inked.n_pen < 2.0 * stroke.sum()


def test_real_tcga_frozen_section(shared_data):
    """TCGA HNSC frozen section without µm/px (sizes as fractions of the thumbnail).

    By eye ~60 % of the thumbnail is tissue; the unscanned corners are pure white and the
    scanned glass a pale grey, both background; the triangular tear in the middle is glass.
    """
    thumb, mpp, _ = _openslide_thumb(shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs")
    assert mpp is None
    tm = detect_tissue(thumb, mpp=None)
    assert 0.57 < tm.fraction < 0.68
    assert tm.background[:60, :60].all()  # unscanned white corner
    assert tm.background[120:180, 100:160].all()  # scanned grey glass, top left
    assert not tm.mask[470:495, 640:665].any()  # the triangular tear
    assert tm.mask[250:400, 150:450].mean() > 0.97
    assert tm.n_pen == 0


def test_real_kidney_mostly_background(shared_data):
    """Plain single-page IHC TIFF that OpenSlide refuses: read with PIL, no µm/px.

    By eye one small blue-grey fragment (~120 × 60 px of 1493 × 901) on clean glass, plus a
    grey hair and faint smudges that are not tissue.
    """
    from scipy import ndimage

    rgb = np.asarray(Image.open(shared_data / "wsi" / "kidney-48-5.tif").convert("RGB"))
    tm = detect_tissue(rgb, mpp=None)
    assert 0.001 < tm.fraction < 0.006
    assert ndimage.label(tm.mask)[1] == 1
    ys, xs = np.nonzero(tm.mask)
    assert 260 < xs.mean() < 420 and 480 < ys.mean() < 600
    assert tm.n_pen == 0  # blue-grey counterstain is not blue ink
    assert tm.background.mean() > 0.99
