import numpy as np
import pytest

from core.errors import MissingMppError, SlideOpenError
from core.wsi.fingerprint import file_fingerprint
from core.wsi.slide import Slide, mpp_from_properties
from core.wsi.tiling import TilingParams, tile_grid
from tests.conftest import make_slide


def test_mpp_chain_order():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "aperio.MPP": "0.5"}) == (0.25, "openslide.mpp-x")
    assert mpp_from_properties({"aperio.MPP": "0.499"}) == (0.499, "aperio.MPP")
    mpp, src = mpp_from_properties({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"})
    assert mpp == pytest.approx(0.5) and src == "tiff.XResolution"
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}) == (None, "unknown")


def test_slide_reads_pyramid(slide_file):
    with Slide(slide_file) as s:
        assert s.dimensions == (1600, 1200)
        assert s.level_count >= 3
        assert s.mpp == pytest.approx(0.5)
        assert "1600x1200" in repr(s)
        tile = s.read_region((600, 400), 224, 112)  # 112 µm at 1 µm/px from level 1
        assert tile.shape == (112, 112, 3) and tile.dtype == np.uint8


def test_missing_mpp_raises_actionable(tmp_path):
    from core.synth.tiff import write_pyramidal_tiff
    import tifffile

    path = tmp_path / "nompp.tiff"
    rgb = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb")
    with Slide(path) as s:
        with pytest.raises(MissingMppError, match="override"):
            _ = s.mpp
    with Slide(path, mpp_override=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"


def test_not_a_slide(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(SlideOpenError, match="not a format OpenSlide reads|cannot read"):
        Slide(bad).dimensions


def test_tile_grid_covers_tissue_only(slide_file):
    with Slide(slide_file) as s:
        grid = tile_grid(s, TilingParams(tile_um=112, mpp=1.0, min_tissue=0.5))
    assert grid.size_level0 == 224
    assert len(grid) > 4
    centres = grid.xy + 112
    # tissue blob is an ellipse centred at (800, 600) with radii 480 x 360
    inside = ((centres[:, 0] - 800) / 480) ** 2 + ((centres[:, 1] - 600) / 360) ** 2
    assert (inside < 1.3).all()
    assert (grid.xy % 224 == 0).all()


def test_fingerprint_moves_with_content(tmp_path, slide_file):
    moved = tmp_path / "moved.tiff"
    moved.write_bytes(slide_file.read_bytes())
    assert file_fingerprint(moved) == file_fingerprint(slide_file)
    other = make_slide(tmp_path / "other.tiff", seed=1)
    assert file_fingerprint(other) != file_fingerprint(slide_file)


def test_tiling_key_changes_with_params():
    assert TilingParams().key() == TilingParams().key()
    assert TilingParams(tile_um=112).key() != TilingParams(tile_um=224).key()
