"""``--engine ray`` on a local Ray instance: slides spread over two actors, results in the store,
identical to the local engine's."""
import numpy as np
import pytest

pytest.importorskip("ray")


def test_ray_engine_matches_local(tmp_path, monkeypatch):
    import torch

    from core.cohort.importer import import_cohort
    from core.engine.modelhub import load_model
    from core.engine.predict import predict_cohort
    from core.engine.distributed import predict_cohort_ray
    from core.store.db import Store
    from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, save_checkpoint
    from tests.conftest import make_slide

    genes = ["ERBB2", "CD8A"]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "tiny", ReferenceInformedHead(HeadConfig(1280, 2, 2), torch.rand(2, 2)),
                    ModelCard("tiny", genes, ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112))
    monkeypatch.setenv("TESSERA_MODEL_DIRS", str(tmp_path / "models"))
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path / "cache"))
    slides = tmp_path / "slides"
    slides.mkdir()
    patients = [f"TCGA-AA-{1000 + i}" for i in range(4)]
    for i, p in enumerate(patients):
        make_slide(slides / f"{p}-01Z-00-DX1.tiff", seed=i)
    clinical = tmp_path / "cdr.csv"
    clinical.write_text("bcr_patient_barcode,OS,OS.time\n" + "".join(f"{p},{i % 2},{100 + i}\n" for i, p in enumerate(patients)))
    model = load_model("tiny", [tmp_path / "models"])
    values = {}
    for engine in ("ray", "local"):
        store_path = tmp_path / f"{engine}.duckdb"
        with Store(store_path) as store:
            import_cohort(store, "c", slides, clinical, fmt="tcga-cdr", tiling=model.tiling())
        if engine == "ray":
            results = predict_cohort_ray(store_path, "c", model, device="cpu", num_cpus=2, group_size=1)
        else:
            results = predict_cohort(store_path, "c", model, device="cpu", workers=0)
        assert [r.status for r in results] == ["computed"] * 4
        with Store(store_path, read_only=True) as store:
            runs = store.cohort_runs("c", model.key)
            assert runs["run_key"].notna().all()
            values[engine] = np.concatenate([store.heatmap(model.key, k, "CD8A")["value"].to_numpy()
                                             for k in sorted(runs["run_key"])])
            devices = set(store.con.execute("SELECT device FROM runs").df()["device"])
        assert devices == {"cpu/onnx"}
    np.testing.assert_allclose(values["ray"], values["local"], atol=1e-5)
