"""The engine and the store together: real slides, the real encoder, a real DuckDB file."""
import shutil

import numpy as np
import pytest
import torch

from core.engine.modelhub import list_models, load_model
from core.engine.predict import predict_slides
from core.store.db import Store
from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
from tests.conftest import make_slide

GENES = ["ERBB2", "ESR1", "CD8A", "MKI67", "HLA-DRA"]  # a dash in a name must survive as a column
TYPES = ["tumour", "t_cell", "stroma"]


def predict_slide(path, model, store, **options):
    """One slide through the cohort engine (``predict_slides`` with a single (path, no override) pair)."""
    [result] = predict_slides(store, [(path, None)], model, **options)
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, len(GENES), len(TYPES)), torch.rand(len(TYPES), len(GENES)))
    card = ModelCard(model_id="tiny", genes=GENES, cell_types=TYPES, encoder="efficientnet_lite0",
                     tile_um=112.0, mpp=1.0, input_px=112)
    save_checkpoint(root / "tiny", head, card)
    return root


def test_model_card_and_version(model_dir):
    models = list_models([model_dir])
    assert set(models) == {"tiny"}
    model = load_model("tiny", [model_dir])
    assert len(model.version) == 12 and model.key == f"tiny@{model.version}"
    assert model.tiling().out_px == 112


def test_predict_then_cache_then_move_then_change(tmp_path, model_dir):
    model = load_model("tiny", [model_dir])
    slide = make_slide(tmp_path / "a.tiff")
    with Store(tmp_path / "store.duckdb") as store:
        first = predict_slide(slide, model, store, device="cpu", workers=0)
        assert first.status == "computed" and first.n_tiles > 0
        again = predict_slide(slide, model, store, device="cpu", workers=0)
        assert again.status == "cached" and again.run_key == first.run_key

        moved = tmp_path / "elsewhere" / "renamed.tiff"
        moved.parent.mkdir()
        shutil.move(slide, moved)
        assert predict_slide(moved, model, store, device="cpu", workers=0).status == "cached"

        changed = make_slide(tmp_path / "b.tiff", seed=3)
        shutil.move(changed, moved)
        third = predict_slide(moved, model, store, device="cpu", workers=0)
        assert third.status == "computed" and third.run_key != first.run_key

        heat = store.heatmap(model.key, first.run_key, "HLA-DRA")
        assert len(heat) == first.n_tiles and np.isfinite(heat["value"]).all()
        top = store.top_tiles(model.key, "ERBB2", [first.run_key, third.run_key], k=5)
        assert len(top) == 5 and top["value"].is_monotonic_decreasing
        index, emb, comp = store.tile_vectors([first.run_key])
        assert emb.shape == (first.n_tiles, 64)
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
        assert np.allclose(comp.sum(axis=1), 1, atol=1e-4)
        summary = store.slide_summary(model.key, ["ERBB2"], [first.run_key])
        assert summary["mean"].iloc[0] == pytest.approx(
            store.heatmap(model.key, first.run_key, "ERBB2")["value"].mean(), rel=1e-5)


def test_same_numbers_with_loader_workers(tmp_path, model_dir):
    model = load_model("tiny", [model_dir])
    slide = make_slide(tmp_path / "w.tiff")
    with Store(tmp_path / "s0.duckdb") as s0, Store(tmp_path / "s1.duckdb") as s1:
        r0 = predict_slide(slide, model, s0, device="cpu", workers=0, batch_size=7)
        r1 = predict_slide(slide, model, s1, device="cpu", workers=1, batch_size=64)
        a = s0.heatmap(model.key, r0.run_key, "CD8A")["value"].to_numpy()
        b = s1.heatmap(model.key, r1.run_key, "CD8A")["value"].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_failed_write_leaves_no_partial_run(tmp_path, model_dir, monkeypatch):
    model = load_model("tiny", [model_dir])
    slide = make_slide(tmp_path / "p.tiff")
    with Store(tmp_path / "store.duckdb") as store:
        real_write = Store.write_run

        def broken(self, run, xy, tissue, expression, *rest, **kwargs):
            return real_write(self, run, xy, tissue, expression[:, :-1], *rest, **kwargs)

        monkeypatch.setattr(Store, "write_run", broken)
        with pytest.raises(Exception):
            predict_slide(slide, model, store, device="cpu", workers=0)
        monkeypatch.undo()
        assert store.con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        assert store.con.execute("SELECT count(*) FROM tiles").fetchone()[0] == 0
        # the computed tiles were not lost: they wait in the spool, and the next call ingests
        # them (no model work) — complete, each tile once
        again = predict_slide(slide, model, store, device="cpu", workers=0)
        assert again.status == "cached"
        n = store.con.execute("SELECT count(*), count(DISTINCT tile_idx) FROM tiles").fetchone()
        assert n == (again.n_tiles, again.n_tiles)


def test_read_only_store_missing_is_actionable(tmp_path):
    from core.errors import StoreError

    with pytest.raises(StoreError, match="make demo"):
        Store(tmp_path / "nothing.duckdb", read_only=True)
