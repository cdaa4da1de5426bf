"""A copy of the tiny demo world (tests/conftest.py ``demo_env``) with cells runs for some slides,
shared by the cell-biomarker, cell-export and page tests: built once per test process."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

N_CELL_SLIDES = 12          # the first slides (by patient) are predicted with cells; the rest keep tile runs
_BUILT: dict[str, Path] = {}


def build_cells_store(settings, folder: Path) -> Path:
    from core.config import load_settings
    from core.engine.access import StoreAccess
    from core.engine.modelhub import load_model
    from core.engine.plan import usable_slides
    from core.engine.predict import predict_slides

    key = str(settings.store_path)
    if key in _BUILT and _BUILT[key].exists():
        return _BUILT[key]
    folder.mkdir(parents=True, exist_ok=True)
    store_path = folder / "tessera.duckdb"
    shutil.copy2(settings.store_path, store_path)
    s = load_settings(demo_dir=settings.demo_dir, store_path=store_path, device="cpu", workers=0, batch_size=64)
    model = load_model(s.default_model, s.model_dirs)
    with StoreAccess(store_path).open(wait_s=5.0, or_read_only=True) as st:
        pairs = usable_slides(st, "demo")[:N_CELL_SLIDES]
    results = predict_slides(store_path, pairs, model, tiling=model.tiling(), device="cpu", workers=0, cells=True)
    assert all(r.status in ("computed", "cached") for r in results), [(r.status, getattr(r, "message", "")) for r in results]
    _BUILT[key] = store_path
    return store_path


@pytest.fixture(scope="session")
def cells_store(demo_env, tmp_path_factory) -> Path:
    """Path of a store: the tiny demo cohort with cells runs for its first N_CELL_SLIDES slides."""
    settings, _ = demo_env
    return build_cells_store(settings, tmp_path_factory.mktemp("cells"))
