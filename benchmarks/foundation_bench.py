"""P7: the foundation-model path on CPU: ViT-L/16 (UNI's shape, random weights) beside
EfficientNet-Lite0 (the shipped ``breast-her2st``), measured side by side in one run.

``python -m benchmarks.foundation_bench [--batch 8] [--json FILE]``

The ViT-L/16 checkpoint is written as UNI ships (a folder with ``pytorch_model.bin`` in timm keys)
and loaded through the registry by path, exactly as ``--encoder vit_large_patch16
--encoder-weights FOLDER`` does; a fusion head over its 196 tokens (the breast model's panel and
reference types, random weights) makes it a whole model like the shipped one. For each model:

R1  raw forward, ONNX Runtime (exported, verified against PyTorch by ``create_runtime``)
R2  raw forward, eager PyTorch
plus the one-off costs of the foundation path: SHA-256 of the weights (every model load verifies
it, cached per process), the state-dict load, the ONNX export + verification.

Tiles are uint8 224 × 224 (112 µm at 0.5 µm/px), batch ``--batch``, one warm-up batch then
``--repeats`` timed batches (a few batches only: ViT-L runs ~1 tile/s on 2 cores). The machine's
load average is printed with the figures: on a shared machine they move with it. GPU throughput
is not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "foundation_bench.json"


def _rate(fn, n_items: int, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * n_items / (time.perf_counter() - t)


def _vit_large_folder(root: Path) -> Path:
    """UNI-layout folder with random ViT-L/16 weights (N(0, 0.02); LayerScale at timm's 1e-5)."""
    import torch

    from models.vit import ViTConfig, VisionTransformer

    with torch.device("meta"):
        layout = {k: tuple(v.shape) for k, v in VisionTransformer(ViTConfig()).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.full(s, 1e-5) if k.endswith(".gamma") else torch.empty(s).normal_(0, 0.02, generator=gen))
             for k, s in layout.items()}
    folder = root / "uni-random"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224",
                                                    "model_args": {"num_heads": 16, "init_values": 1e-5}}))
    return folder


def _measure(name: str, model, *, px: int, batch: int, repeats: int, cache: Path) -> dict:
    import torch

    from models.runtime import OnnxRuntime, TorchRuntime, create_runtime

    x = torch.randint(0, 255, (batch, px, px, 3), dtype=torch.uint8)
    cpu = torch.device("cpu")
    t = time.perf_counter()
    onnx = create_runtime(model, device=cpu, input_px=px, kind="auto", cache_dir=cache, version=name)
    export_s = time.perf_counter() - t
    row = {"model": name, "export_verify_s": round(export_s, 1), "runtime": onnx.name}
    if isinstance(onnx, OnnxRuntime):
        row["onnx_tiles_per_s"] = _rate(lambda: onnx(x), batch, repeats)
        row["onnx_max_diff"] = getattr(onnx, "verified_difference", None)
        row["onnx_mb"] = round(sum(p.stat().st_size for p in cache.glob(f"{name}-*.onnx")) / 1e6)
    eager = TorchRuntime(model, cpu)
    row["eager_tiles_per_s"] = _rate(lambda: eager(x), batch, repeats)
    return row


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tessera-fm-bench-"))
    try:
        _run(args, root, threads, started)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # 1.2 GB of weights + 1.2 GB of ONNX


def _run(args, root: Path, threads: int, started: float) -> None:
    import torch

    from core.config import REPO_ROOT
    from core.engine.modelhub import load_model
    from models.encoder_weights import file_sha256
    from models.encoders import create_encoder
    from models.fusion import FusionConfig, FusionHead
    from models.scist import TesseraModel

    px = 224

    lite = load_model("breast-her2st", [REPO_ROOT / "models" / "weights"], encoder_search=())
    t = time.perf_counter()
    folder = _vit_large_folder(root)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    sha = file_sha256(folder / "pytorch_model.bin")
    sha_s = time.perf_counter() - t
    t = time.perf_counter()
    spec = create_encoder("vit_large_patch16", weights_path=folder)
    load_s = time.perf_counter() - t
    head_cfg = lite.module.head.config
    torch.manual_seed(0)
    head = FusionHead(FusionConfig(in_dim=spec.dim, n_tokens=(px // 16) ** 2, n_genes=head_cfg.n_genes,
                                   n_types=head_cfg.n_types), lite.module.head.profiles.clone())
    vit = TesseraModel(spec, head).eval()

    rows = [_measure("efficientnet_lite0", lite.module, px=px, batch=args.batch, repeats=args.repeats * 4,
                     cache=root / "onnx"),
            _measure("vit_large_patch16", vit, px=px, batch=args.batch, repeats=args.repeats, cache=root / "onnx")]
    load_avg = os.getloadavg()
    print(f"P7 · foundation path on CPU · {px} px tiles · {threads} threads · batch {args.batch} · "
          f"load average {load_avg[0]:.1f}")
    print(f"{'model':<22}{'ONNX tiles/s':>14}{'eager tiles/s':>15}{'export+verify s':>17}{'ONNX max |Δ|':>14}")
    for r in rows:
        onnx = f"{r['onnx_tiles_per_s']:.2f}" if "onnx_tiles_per_s" in r else f"({r['runtime']})"
        diff = f"{r['onnx_max_diff']:.1e}" if r.get("onnx_max_diff") is not None else "-"
        print(f"{r['model']:<22}{onnx:>14}{r['eager_tiles_per_s']:>15.2f}{r['export_verify_s']:>17.1f}{diff:>14}")
    lite_rate = max(rows[0].get("onnx_tiles_per_s", 0), rows[0]["eager_tiles_per_s"])
    vit_rate = max(rows[1].get("onnx_tiles_per_s", 0), rows[1]["eager_tiles_per_s"])
    print(f"ViT-L/16 best / Lite0 best = {vit_rate / lite_rate:.3f} ({lite_rate / vit_rate:.0f}× slower); "
          f"one-off: weights SHA-256 {sha_s:.1f} s, state-dict load {load_s:.1f} s (1.2 GB, memory-mapped)")
    print("GPU: not measured here")
    payload = {"benchmark": "foundation_bench", "px": px, "batch": args.batch, "threads": threads,
               "load_average": [round(v, 2) for v in load_avg], "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "rows": rows,
               "vit_over_lite": vit_rate / lite_rate, "weights_write_s": round(write_s, 1),
               "weights_sha256_s": round(sha_s, 1), "weights_load_s": round(load_s, 1), "weights_sha256": sha,
               "gpu": "not measured", "wall_s": round(time.perf_counter() - started, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1))
    print(f"written {args.json} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
