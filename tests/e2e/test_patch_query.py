"""Image → gene with an *uploaded* patch: crop/resize to the model's tile, the real model, the
store's similar-tiles search. A stored tile uploaded as a patch must find itself."""
import numpy as np
import pytest

from core.analysis.crossmodal import patch_profile, patch_tile, predict_patch, similar_to_embedding, tile_image
from core.errors import TesseraError
from core.engine.modelhub import load_model
from core.store.db import Store


def test_patch_tile_crops_the_centre_and_resizes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    tile, note = patch_tile(image, 0.5, 112.0, 224)          # 112 µm = 224 px at 0.5 µm/px
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    assert (tile == image[188:412, 288:512]).all()            # centre crop, no resize needed
    assert note.startswith("centre 112 µm of 400 × 300 µm")
    small, note = patch_tile(image[:150, :150], 0.5, 112.0, 224)   # 75 µm: magnified, and said so
    assert small.shape == (224, 224, 3) and "magnified" in note
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    assert patch_tile(rgba, 0.5, 112.0, 224)[0].shape == (224, 224, 3)


@pytest.mark.parametrize("image, mpp, match", [
    (np.zeros((300, 300), np.uint8), 0.5, "RGB"),
    (np.zeros((60, 60, 3), np.uint8), 0.5, "at least 56 µm"),
    (np.zeros((300, 300, 3), np.uint8), 0.0, "µm per pixel"),
])
def test_bad_patches_are_clear_errors(image, mpp, match):
    with pytest.raises(TesseraError, match=match):
        patch_tile(image, mpp, 112.0, 224)


def test_a_stored_tile_uploaded_as_a_patch_finds_itself(demo_env):
    settings, _ = demo_env
    model = load_model("demo-synthetic", settings.model_dirs)
    px = int(model.card["input_px"])
    with Store(settings.store_path, read_only=True) as store:
        runs = store.model_runs(model.key)
        run_keys = list(runs["run_key"])
        run = store.find_run(run_keys[3])
        heat = store.heatmap(model.key, run["run_key"], model.genes[0])
        row = heat.iloc[len(heat) // 2]
        # the tile exactly as the engine read it, at the model's µm/px
        patch = tile_image(run["slide_path"], int(row["x"]), int(row["y"]), int(run["tile_size"]), px)
        tile, _ = patch_tile(patch, float(model.card["mpp"]), float(model.card["tile_um"]), px)
        out = predict_patch(model, tile)
        stored = store.tile_embedding(run["run_key"], int(row["tile_idx"]))
        assert np.abs(out["embedding"] - stored).max() < 1e-3        # same model, same pixels
        assert out["composition"].sum() == pytest.approx(1.0, abs=1e-4)
        hits = similar_to_embedding(store, model.key, run_keys, out["embedding"], k=5)
        assert (hits.iloc[0]["run_key"], hits.iloc[0]["tile_idx"]) == (run["run_key"], row["tile_idx"])
        assert hits.iloc[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
        assert hits["similarity"].is_monotonic_decreasing
        profile = patch_profile(store, model.key, run_keys, out["expression"], top=10)
        assert len(profile) == 10 and profile["predicted"].is_monotonic_decreasing
        assert profile["slide_mean"].notna().all()
        stored_expr = store.tile_profile(model.key, run["run_key"], int(row["tile_idx"]))
        np.testing.assert_allclose(out["expression"][model.genes].to_numpy(),
                                   stored_expr[model.genes].to_numpy(dtype=float), atol=1e-3)


def test_patch_query_through_the_vector_index(demo_env, monkeypatch):
    """The same query served by an IVF index (thresholds lowered to the tiny world's size)."""
    import shutil

    from core.store import tile_index

    settings, _ = demo_env
    model = load_model("demo-synthetic", settings.model_dirs)
    px = int(model.card["input_px"])
    monkeypatch.setattr(tile_index, "INDEX_MIN", 50)
    try:
        done = tile_index.refresh(settings.store_path, model.key, min_vectors=50, kind="ivf", nlist=8)
        assert done[model.key].startswith("built")
        with Store(settings.store_path, read_only=True) as store:
            run_keys = list(store.model_runs(model.key)["run_key"])
            run = store.find_run(run_keys[5])
            row = store.heatmap(model.key, run["run_key"], model.genes[0]).iloc[0]
            patch = tile_image(run["slide_path"], int(row["x"]), int(row["y"]), int(run["tile_size"]), px)
            out = predict_patch(model, patch_tile(patch, float(model.card["mpp"]), float(model.card["tile_um"]), px)[0])
            hits = similar_to_embedding(store, model.key, run_keys, out["embedding"], k=5)
            assert hits.attrs["method"] == "index" and len(hits) == 5
            assert (hits.iloc[0]["run_key"], hits.iloc[0]["tile_idx"]) == (run["run_key"], row["tile_idx"])
    finally:
        shutil.rmtree(tile_index.index_root(settings.store_path), ignore_errors=True)
