"""The engine under stress: kill -9 mid-slide then resume, a CLI job while the app holds the store,
the ONNX runtime against PyTorch, the spool's atomicity. Real slides, real DuckDB, real processes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine.modelhub import load_model
from core.engine.access import StoreAccess
from core.engine.predict import predict_slides
from core.engine.spool import Spool, spool_dir
from core.store.db import Store
from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
from tests.conftest import make_slide

REPO = Path(__file__).resolve().parents[2]
GENES = ["ERBB2", "ESR1", "CD8A", "MKI67"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, len(GENES), 2), torch.rand(2, len(GENES)))
    save_checkpoint(root / "models" / "tiny", head,
                    ModelCard("tiny", GENES, ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112))
    slides = [make_slide(root / f"s{i}.tiff", width=4800, height=3600, seed=i) for i in range(2)]
    return root, slides


def _env(root: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TESSERA_MODEL_DIRS": str(root / "models"),
            "TESSERA_CACHE_DIR": str(root / "cache"), "TESSERA_CHUNK_TILES": "8", **extra}


RUNNER = """
import logging
import sys
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from core.engine.modelhub import load_model
from core.config import load_settings
from core.engine.predict import predict_slides
store, runtime, wait, *slides = sys.argv[1:]
model = load_model("tiny", load_settings().model_dirs)
results = predict_slides(store, [(s, None) for s in slides], model, device="cpu", workers=0, batch_size=4,
                         runtime=runtime, ingest_wait_s=float(wait))
print(" ".join(r.status for r in results))
"""


def _run(root, store, slides, runtime="torch", wait="30", **kw):
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(store), runtime, wait, *map(str, slides)],
                            env=_env(root), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _tiles_per_run(store_path):
    with Store(store_path, read_only=True) as store:
        return store.con.execute("""
            SELECT r.run_key, r.n_tiles, count(t.tile_idx) AS rows, count(DISTINCT t.tile_idx) AS distinct_rows
            FROM runs r LEFT JOIN tiles t USING (run_id) GROUP BY ALL""").df()


def test_kill_9_mid_slide_then_resume(world, tmp_path):
    root, slides = world
    store = tmp_path / "store.duckdb"
    spool = Spool(spool_dir(store))
    proc = _run(root, store, slides)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(spool.root.glob("*/chunk*.parquet")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = spool.pending_runs()
    assert partial, "a killed job leaves its finished chunks in the spool"
    # nothing partial is visible: every run in the store (if any) is complete
    if store.exists():
        runs = _tiles_per_run(store)
        assert set(runs["run_key"]).isdisjoint(partial)
        assert (runs["rows"] == runs["n_tiles"]).all()
    kept = {r: sorted((spool.root / r).glob("chunk8-*.parquet")) for r in partial}
    assert sum(map(len, kept.values())) > 0

    rerun = _run(root, store, slides)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming" in err and set(out.split()) <= {"computed", "cached"}
    assert not spool.complete_runs() and not spool.pending_runs()
    runs = _tiles_per_run(store)
    assert len(runs) == 2
    assert (runs["rows"] == runs["n_tiles"]).all() and (runs["distinct_rows"] == runs["n_tiles"]).all()

    # the resumed run holds the same numbers as an uninterrupted one
    clean = tmp_path / "clean.duckdb"
    done = _run(root, clean, slides)
    assert done.wait(timeout=300) == 0
    model = load_model("tiny", [root / "models"])
    with Store(store, read_only=True) as a, Store(clean, read_only=True) as b:
        for run_key in runs["run_key"]:
            x = a.heatmap(model.key, run_key, "CD8A")["value"].to_numpy()
            y = b.heatmap(model.key, run_key, "CD8A")["value"].to_numpy()
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_cli_job_while_the_app_reads(world, tmp_path):
    """The app holds a read connection for the whole job: the job neither fails nor loses results;
    its finished runs wait in the spool and the app-side ingest brings them in."""
    root, slides = world
    store = tmp_path / "store.duckdb"
    Store(store).close()
    reader = Store(store, read_only=True)  # what a page does while it renders
    try:
        proc = _run(root, store, slides[:1], wait="1")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.split() == ["computed"]
        assert reader.con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
        assert len(Spool(spool_dir(store)).complete_runs()) == 1
    finally:
        reader.close()
    assert StoreAccess(store).ingest() == 1  # what the app does on its next page load
    runs = _tiles_per_run(store)
    assert len(runs) == 1 and (runs["rows"] == runs["n_tiles"]).all()


def test_onnx_runtime_matches_torch(world, tmp_path, monkeypatch):
    root, slides = world
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("tiny", [root / "models"])
    results = {}
    for runtime in ("onnx", "torch"):
        store = tmp_path / f"{runtime}.duckdb"
        [r] = predict_slides(store, [(slides[0], None)], model, device="cpu", workers=0, runtime=runtime)
        with Store(store, read_only=True) as s:
            results[runtime] = s.heatmap(model.key, r.run_key, "ERBB2")["value"].to_numpy()
            assert s.find_run(r.run_key)["device"] == f"cpu/{runtime}"
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    np.testing.assert_allclose(results["onnx"], results["torch"], atol=1e-3)


def test_onnx_verification_is_recorded_and_invalidated(world, tmp_path, monkeypatch):
    """A passed verification is reused for the same exported file and library versions only; a
    record that does not match (here: a file replaced by a wrong model) means verifying again."""
    import json

    import torch

    from models import runtime as rt

    root, _ = world
    model = load_model("tiny", [root / "models"])
    cache = tmp_path / "onnx"
    calls = []
    real = rt.max_difference
    monkeypatch.setattr(rt, "max_difference", lambda a, b: calls.append(1) or real(a, b))
    kw = dict(device=torch.device("cpu"), input_px=112, kind="auto", cache_dir=cache, version="tiny-v")
    first = rt.create_runtime(model.module, **kw)
    assert first.name == "onnx" and len(calls) == 1
    record = json.loads(next(cache.glob("*.verified.json")).read_text())
    assert record["max_difference"] <= rt.TOLERANCE and record["key"]["onnxruntime"]
    assert rt.create_runtime(model.module, **kw).name == "onnx" and len(calls) == 1     # reused
    # another model's graph under the same name: the record no longer matches, the check runs and fails
    other = load_model("tiny", [root / "models"]).module
    with torch.no_grad():
        for p in other.head.parameters():
            p.add_(0.5)
    onnx_file = next(cache.glob("*.onnx"))
    rt.export_onnx(other, 112, onnx_file)
    assert rt.create_runtime(model.module, **kw).name == "torch" and len(calls) == 2


def test_spool_ignores_half_written_chunks(tmp_path):
    spool = Spool(tmp_path / "spool")
    out = {"expression": np.ones((3, 2)), "embedding": np.ones((3, 4)), "composition": np.ones((3, 2)) / 2}
    spool.write_chunk("r1", 0, np.arange(3), np.zeros((3, 2)), np.ones(3), out)
    (tmp_path / "spool" / "r1" / ".chunk8-00001.parquet.123.tmp").write_bytes(b"partial")
    assert spool.done_chunks("r1") == {0}
    assert not list((tmp_path / "spool" / "r1").glob("*.tmp"))
    with pytest.raises(RuntimeError, match="missing"):
        spool.finish("r1", {"run_key": "r1"}, n_chunks=2)
    assert spool.complete_runs() == [] and spool.pending_runs() == ["r1"]


def test_nuclei_counted_in_the_loader_workers(world, tmp_path, monkeypatch):
    """--nuclei: one loader worker process segments each tile's nuclei while the model runs; the
    counts reach the store, equal a direct count of the same tile, and make a separate cached run."""
    from core.wsi.nuclei_classes import CLASSES, nucleus_counts
    from core.wsi.slide import Slide

    root, slides = world
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model("tiny", [root / "models"])
    store = tmp_path / "n.duckdb"
    [plain] = predict_slides(store, [(slides[0], None)], model, device="cpu", workers=1, runtime="torch")
    [counted] = predict_slides(store, [(slides[0], None)], model, device="cpu", workers=1, runtime="torch",
                               nuclei=True)
    assert counted.status == "computed" and counted.run_key != plain.run_key
    [again] = predict_slides(store, [(slides[0], None)], model, device="cpu", workers=1, runtime="torch", nuclei=True)
    assert again.status == "cached" and again.run_key == counted.run_key
    with Store(store, read_only=True) as s:
        assert s.tile_nuclei(plain.run_key) is None
        assert s.has_nuclei(counted.run_key) and not s.has_nuclei(plain.run_key)
        nuc = s.tile_nuclei(counted.run_key)
        run = s.find_run(counted.run_key)
    assert len(nuc) == counted.n_tiles and [c for c in nuc.columns if c.startswith("n")] == \
        [f"n{i}" for i in range(len(CLASSES))]
    assert nuc.filter(regex=r"^n\d+$").to_numpy().sum() > 0
    tiling = model.tiling()
    with Slide(slides[0]) as slide:
        for _, row in nuc.sample(5, random_state=0).iterrows():
            tile = slide.read_region((int(row["x"]), int(row["y"])), int(run["tile_size"]), tiling.out_px)
            direct = nucleus_counts(tile, mpp=tiling.tile_um / tiling.out_px)
            assert list(direct) == [int(row[f"n{i}"]) for i in range(len(CLASSES))]
    # the Slide page's nucleus-density layer, and a clear message for a run without counts
    from core.errors import TesseraError
    from core.analysis.maps import layer_tiles

    with Store(store, read_only=True) as s:
        dens = layer_tiles(s, model.key, counted.run_key, "nuclei:all", tiling.tile_um)
        cls = layer_tiles(s, model.key, counted.run_key, f"nuclei:{CLASSES[1]}", tiling.tile_um)
        with pytest.raises(TesseraError, match="--nuclei"):
            layer_tiles(s, model.key, plain.run_key, "nuclei:all", tiling.tile_um)
    area = (tiling.tile_um / 1000) ** 2
    np.testing.assert_allclose(dens["value"], nuc[[f"n{i}" for i in range(len(CLASSES))]].sum(axis=1) / area)
    np.testing.assert_allclose(cls["value"], nuc["n1"] / area)
