"""Cells and high-resolution runs: the math by hand, then real slides through the engine and store."""
from pathlib import Path

import numpy as np
import pytest

from core.analysis.cells import cell_profiles, cell_values, chunk_cells, refine_tile, type_likelihood, type_posterior
from core.engine.modelhub import load_model
from core.engine.predict import predict_slides
from core.store.db import Store
from core.training.cell_eval import match
from core.wsi.cells import CELL_FIELDS, ellipse_polygon
from core.wsi.tiling import TilingParams, default_grid
from tests.conftest import make_slide
from tests.unit.test_predict_store import model_dir  # noqa: F401 - the tiny model fixture


def test_nnls_recovers_a_known_mixture():
    """Hand-made: a tile that is exactly 0.7 × P_0 + 0.3 × P_2 gives back w = (0.7, 0, 0.3) and ρ = 1."""
    p_lin = np.array([[100.0, 0, 9900], [5000, 5000, 0], [0, 9000, 1000]])
    tile = np.log1p(0.7 * p_lin[0] + 0.3 * p_lin[2])
    w, rho = refine_tile(tile, p_lin, counts=np.array([3, 0, 1]))
    assert w == pytest.approx([0.7, 0.0, 0.3], abs=1e-9)
    assert rho == pytest.approx(np.ones(3), abs=1e-5)
    prof = cell_profiles(np.array([0, 2]), p_lin, rho)
    assert np.expm1(prof[0]) == pytest.approx(p_lin[0] / p_lin[0].sum() * 1e4, rel=1e-4)


def test_posterior_follows_class_and_composition():
    """A neoplastic nucleus in a tile of 10 % malignant cells is still most likely malignant
    (likelihood 1 vs 0.05); an 'other' nucleus takes the tile's most common type."""
    types = ["malignant_epithelial", "t_cell", "fibroblast"]
    m = type_likelihood(types)
    probs = np.zeros((2, 5))
    probs[0, 0] = 1.0      # neoplastic
    probs[1, 4] = 1.0      # other
    post = type_posterior(probs, np.array([0.1, 0.2, 0.7]), m)
    assert post[0].argmax() == 0 and post[1].argmax() == 2
    assert post.sum(axis=1) == pytest.approx([1, 1])


def test_stored_factors_give_the_profiles_back():
    """cell_values from (type, w, z, tile prediction) equals the profile computed directly."""
    rng = np.random.default_rng(0)
    p_log = np.log1p(rng.gamma(1.0, 50.0, (3, 6)))
    rec = np.zeros((4, len(CELL_FIELDS)), np.float32)
    rec[:, CELL_FIELDS.index("p_neoplastic")] = 1
    types = ["malignant_epithelial", "t_cell", "fibroblast"]
    expr = np.log1p(rng.gamma(1.0, 100.0, (1, 6)))
    out = chunk_cells([rec], np.array([[0.6, 0.3, 0.1]]), expr, p_log, types)
    _, rho = refine_tile(expr[0], np.expm1(p_log), np.bincount(out["cell_type"], minlength=3))
    direct = cell_profiles(out["cell_type"].astype(int), np.expm1(p_log), rho)
    via = cell_values(np.arange(6), out["cell_type"], out["tile"], out["w"], out["z"], expr, p_log)
    assert via == pytest.approx(direct, rel=1e-5)


def test_match_is_greedy_one_to_one():
    d = np.array([[0.0, 0], [1, 0], [10, 10]])
    t = np.array([[0.5, 0], [9, 10]])
    di, ti = match(d, t, 2.0)
    assert sorted(zip(di.tolist(), ti.tolist())) == [(0, 0), (2, 1)]   # (1, 0) ties lose to the first


def test_ellipse_polygon_axes():
    poly = ellipse_polygon([10], [20], [8], [4], [0.0], vertices=4)[0]
    assert poly == pytest.approx(np.array([[14, 20], [10, 22], [6, 20], [10, 18]]), abs=1e-9)


def test_stride_grid_contains_the_default_grid():
    assert TilingParams().key() == TilingParams(stride=1.0).key() != TilingParams(stride=0.5).key()
    with pytest.raises(ValueError, match="stride"):
        TilingParams(stride=0.3)
    xy = np.array([[0, 0], [56, 0], [112, 112], [168, 56]])
    assert default_grid(xy, 112).tolist() == [True, False, True, False]


def test_cells_and_high_res_runs_through_engine_and_store(tmp_path, model_dir):  # noqa: F811
    from core.analysis.cell_layers import run_cells

    model = load_model("tiny", [model_dir])
    slide = make_slide(tmp_path / "a.tiff")
    with Store(tmp_path / "store.duckdb") as store:
        [plain] = predict_slides(store, [(slide, None)], model, device="cpu", workers=0)
        [cells] = predict_slides(store, [(slide, None)], model, device="cpu", workers=0, cells=True)
        [hi] = predict_slides(store, [(slide, None)], model, device="cpu", workers=0,
                              tiling=model.tiling(stride=0.5))
        assert len({plain.run_key, cells.run_key, hi.run_key}) == 3 and cells.status == "computed"
        assert hi.n_tiles >= 3 * plain.n_tiles      # about stride⁻² as many (more at tissue borders)
        assert store.has_cells(cells.run_key) and not store.has_cells(plain.run_key)
        assert len(run_cells(store, model.key, cells.run_key, ["ERBB2"])) == 0   # a flat synthetic slide and set(got.frame["cell_type"].cat.categories) == set(model.cell_types)
        run = store.find_run(cells.run_key)
        # the high-res run stays out of the runs that stand for the slide, and its summary is the default grid's
        assert hi.run_key not in set(store.model_runs(model.key)["run_key"])
        s_hi = store.slide_summary(model.key, ["ERBB2"], [hi.run_key])["mean"].iloc[0]
        s_plain = store.slide_summary(model.key, ["ERBB2"], [plain.run_key])["mean"].iloc[0]
        assert s_hi == pytest.approx(s_plain, rel=1e-4)
        assert list(store.high_res_runs(model.key, run["slide_fp"], run["mpp"])["stride"]) == [0.5]
        with pytest.raises(Exception, match="default grid"):
            predict_slides(store, [(slide, None)], model, device="cpu", workers=0, cells=True,
                           tiling=model.tiling(stride=0.5))


CMU = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


@pytest.mark.skipif(not CMU.is_file(), reason="../shared/data/wsi/CMU-1-Small-Region.svs is absent")
def test_cells_on_the_real_svs(tmp_path, model_dir):  # noqa: F811
    """The real Aperio slide through the normal predict path with cells: nuclei found on tissue,
    each with a type over the model's types, a confidence and finite gene values."""
    from core.analysis.cell_layers import run_cells

    model = load_model("tiny", [model_dir])
    with Store(tmp_path / "store.duckdb") as store:
        [res] = predict_slides(store, [(CMU, None)], model, device="cpu", workers=0, cells=True)
        got = run_cells(store, model.key, res.run_key, ["ERBB2", "CD8A"])
        run = store.find_run(res.run_key)
        assert len(got) > 20 * res.n_tiles                     # H&E at 0.5 µm/px: dozens of nuclei per tile
        assert set(got.frame["cell_type"].cat.categories) == set(model.cell_types)
        assert got.frame["x"].between(0, run["width"]).all() and got.frame["y"].between(0, run["height"]).all()
        assert np.isfinite(got.frame[["gene:ERBB2", "gene:CD8A"]].to_numpy()).all()
        assert got.frame["confidence"].between(0, 1).all() and got.frame["major_um"].between(2, 100).all()


def test_demo_ships_a_typer_and_cells_runs(demo_env, tmp_path):
    """The demo build's cells step (core.demo.ensure_typer + predict_demo_cells) on a copy of the
    tiny world: the learned typer is fitted once beside the model and used by the cells runs
    (their key names it); a stride-½ run is made and kept out of the cohort's runs."""
    import shutil

    from core.config import load_settings
    from core.demo import DEMO_COHORT, DEMO_MODEL, ensure_typer, predict_demo_cells
    from core.engine.plan import run_key_for

    settings, _ = demo_env
    models = tmp_path / "models"
    shutil.copytree(Path(settings.demo_dir) / "models" / DEMO_MODEL, models / DEMO_MODEL)
    store_path = tmp_path / "store.duckdb"
    shutil.copy2(settings.store_path, store_path)
    s = load_settings(demo_dir=settings.demo_dir, store_path=store_path, device="cpu", workers=0, batch_size=64)
    model = load_model(DEMO_MODEL, [models])
    assert model.cells_variant == "posterior"
    path = ensure_typer(model, Path(settings.demo_dir), seed=0)
    assert path.parent == models / DEMO_MODEL and model.cells_variant.startswith("typer-")
    mtime = path.stat().st_mtime_ns
    assert ensure_typer(model, Path(settings.demo_dir), seed=0) == path and path.stat().st_mtime_ns == mtime
    results = predict_demo_cells(s, model, n_cells=2, n_hires=1)
    assert [r.status for r in results] == ["computed"] * 3
    with Store(store_path, read_only=True) as store:
        runs = store.cohort_runs(DEMO_COHORT, model.key)
        with_cells = [k for k in runs["run_key"].dropna() if store.has_cells(k)]
        assert len(with_cells) == 2
        row = runs[runs["run_key"] == with_cells[0]].iloc[0]
        typed = run_key_for(row["fingerprint"], model.key, model.tiling(), float(row["mpp"]), nuclei=True,
                            cells=model.cells_variant)
        assert typed == row["run_key"]            # made with the typer: its digest is in the key
        hr = store.high_res_runs(model.key, row["fingerprint"], float(row["mpp"]))
        assert list(hr["stride"].astype(float)) == [0.5] and not set(hr["run_key"]) & set(runs["run_key"].dropna())
    again = predict_demo_cells(s, model, n_cells=2, n_hires=1)
    assert [r.status for r in again] == ["cached"] * 3
