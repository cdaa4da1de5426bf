"""Shared fixtures: small real slides (pyramidal TIFF), and a tiny demo world built once.

The tiny world goes through the same code as ``make run``: world → train → import → predict.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_WORLD = dict(n_patients=60, slide_size_px=(1024, 768), n_sections=4, section_size_px=(3000, 3000))


@pytest.fixture(autouse=True)
def _keep_main_module():
    """AppTest runs page scripts as ``__main__`` and leaves the last one in ``sys.modules``; a process
    pool that spawns its workers (as the code does once threads exist) would re-run that script in
    every worker. Put pytest's own ``__main__`` back after each test."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if sys.modules.get("__main__") is not main and main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED} (it sits beside the project in CI)")
    return SHARED


def make_slide(path: Path, *, width: int = 1600, height: int = 1200, mpp: float = 0.5, seed: int = 0) -> Path:
    """A pyramidal TIFF: white glass with a pink-purple tissue blob in the middle."""
    from core.synth.tiff import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((xx - width / 2) / (width * 0.3)) ** 2 + ((yy - height / 2) / (height * 0.3)) ** 2 < 1
    rgb = np.full((height, width, 3), 242, np.uint8)
    tissue = np.stack([200 + rng.integers(-30, 30, blob.sum()), 120 + rng.integers(-30, 30, blob.sum()),
                       180 + rng.integers(-30, 30, blob.sum())], axis=1)
    rgb[blob] = np.clip(tissue, 0, 255).astype(np.uint8)
    write_pyramidal_tiff(path, rgb, mpp=mpp)
    return path


@pytest.fixture
def slide_file(tmp_path) -> Path:
    return make_slide(tmp_path / "TCGA-AA-0001-01Z-00-DX1.tiff")


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory):
    """A tiny demo cohort built end to end; yields the Settings pointing at it."""
    from core.config import load_settings
    from core.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    settings = load_settings(demo_dir=root, seed=7, batch_size=64, workers=0, device="cpu")
    summary = build_demo(settings, world_kwargs=TINY_WORLD, epochs=30, cell_slides=0)   # cells: tests/cells_world.py
    return settings, summary
