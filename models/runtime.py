"""Inference runtimes for a :class:`models.scist.TesseraModel`: eager PyTorch or ONNX Runtime.

On a CPU, ONNX Runtime runs EfficientNet-Lite0 several times faster than eager PyTorch (measured
here: ~45 vs ~7 tiles/s at 224 px with 2 threads under load). A model is exported once per
(model version, weights digest, input size) into a cache folder (:func:`onnx_cache_path`: the
digest is a hash of the in-memory weights, so replaced weights never reuse an old export even
under an unchanged version), and every fresh session is *verified* against the
PyTorch model on a fixed batch before first use: if any output differs by more than
``TOLERANCE`` the engine falls back to PyTorch (and says so). A passed verification is recorded
beside the file (``*.verified.json``, keyed by a hash of the file's contents and the torch and
onnxruntime versions), so later jobs with the same file and libraries skip it. Both runtimes take uint8 tiles [B, H, W, 3] and
return float32 numpy arrays ``expression``, ``embedding``, ``composition``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
OUTPUTS = ("expression", "embedding", "composition")
OPTIONAL = ("joint",)   # outputs of models that have them (models.joint: the joint-space embedding)


def outputs_of(model: nn.Module) -> tuple[str, ...]:
    """The outputs a model returns: :data:`OUTPUTS`, plus ``joint`` when it ships a joint space."""
    inner = getattr(model, "model", model)
    return OUTPUTS + (("joint",) if getattr(inner, "joint", None) is not None else ())
TOLERANCE = 1e-3  # max |ONNX − PyTorch| on any output, in log-expression units (observed: ~1e-5)


class _Outputs(nn.Module):
    """The model with a tuple output (ONNX graphs return positional outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tiles: torch.Tensor):
        out = self.model(tiles)
        return tuple(out[name] for name in outputs_of(self.model))


class TorchRuntime:
    """Eager PyTorch on any device; AMP and channels-last on CUDA.

    ``amp``: ``auto`` (bf16 where the GPU supports it, else fp16), ``bf16``, ``fp16`` or ``off``
    (fp32). Ignored on the CPU, which always runs fp32.
    """

    name = "torch"
    AMP = ("auto", "bf16", "fp16", "off")

    def __init__(self, model: nn.Module, device: torch.device, *, amp: str = "auto"):
        if amp not in self.AMP:
            raise ValueError(f"amp must be one of {self.AMP}, not {amp!r}")
        self.device = device
        self.model = model.to(device).eval()
        self.outputs = outputs_of(model)
        self.amp_dtype = None
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            if amp == "auto":
                amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    def __call__(self, tiles: torch.Tensor) -> dict[str, np.ndarray]:
        import contextlib

        amp = contextlib.nullcontext()
        if self.amp_dtype is not None:
            amp = torch.autocast("cuda", dtype=self.amp_dtype)
        with torch.inference_mode(), amp:
            out = self.model(tiles.to(self.device, non_blocking=True))
            return {name: out[name].float().cpu().numpy() for name in self.outputs}


class OnnxRuntime:
    """ONNX Runtime on the CPU (``intra_op`` threads; the graph includes normalisation)."""

    name = "onnx"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, tiles: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        array = tiles.numpy() if isinstance(tiles, torch.Tensor) else tiles
        return dict(zip(self.outputs, self.session.run(None, {"tiles": np.ascontiguousarray(array)})))


ONNX_MAX_BYTES = 2 ** 31 - 2 ** 26  # one protobuf file holds < 2 GiB (ViT-L fp32, 1.2 GB, fits; ViT-H does not)


def export_onnx(model: nn.Module, input_px: int, path: Path) -> Path:
    """Export ``model`` (uint8 [B, px, px, 3] in) with a dynamic batch axis; atomic write (a failed
    export leaves no file). Models too large for a single ONNX file raise ``ValueError``."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > ONNX_MAX_BYTES:
        raise ValueError(f"the model's weights ({size / 2**30:.1f} GiB) exceed what one ONNX file holds (2 GiB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    example = torch.zeros(2, input_px, input_px, 3, dtype=torch.uint8)
    names = outputs_of(model)
    axes = {name: {0: "batch"} for name in ("tiles", *names)}
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(_Outputs(model.cpu().eval()), (example,), str(tmp), input_names=["tiles"],
                              output_names=list(names), dynamic_axes=axes, opset_version=17, dynamo=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if set(a) != set(b):
        return float("inf")                      # a runtime lost (or invented) an output
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def verification_batch(input_px: int, n: int = 6) -> torch.Tensor:
    """A fixed, tissue-like batch (pink/purple noise) for comparing runtimes."""
    gen = np.random.default_rng(0)
    base = np.array([200, 120, 170], dtype=np.float32)
    tiles = base + gen.normal(0, 35, size=(n, input_px, input_px, 3))
    return torch.from_numpy(np.clip(tiles, 0, 255).astype(np.uint8))


def _verification_key(path: Path) -> dict:
    """What a verification holds for: this exported file and these runtime versions."""
    import onnxruntime

    import hashlib

    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return {"file": path.name, "blake2b": digest, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "tolerance": TOLERANCE}


def _verified(path: Path) -> float | None:
    """The recorded max difference of an earlier verification of this very file, or None."""
    import json

    record = path.with_suffix(".verified.json")
    try:
        data = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return float(data["max_difference"]) if data.get("key") == _verification_key(path) else None


def _remember_verified(path: Path, diff: float) -> None:
    import json

    record = path.with_suffix(".verified.json")
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": _verification_key(path), "max_difference": diff}))
    tmp.replace(record)


def weights_digest(model: nn.Module) -> str:
    """A hash (16 hex digits) of every parameter and buffer of ``model``: names, dtypes, shapes, bytes."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def onnx_cache_path(model: nn.Module, cache_dir: Path, *, version: str, input_px: int) -> Path:
    """Where the export of ``model`` lives: keyed by ``version`` (the engine passes
    ``model_id-version``, the version being a hash of the weights file), a digest of the weights
    actually in ``model`` and the input size."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version or "model")
    return Path(cache_dir) / f"{safe}-{weights_digest(model)}-{input_px}.onnx"


def create_runtime(model: nn.Module, *, device: torch.device, input_px: int, kind: str = "auto",
                   cache_dir: Path | None = None, version: str = "", threads: int | None = None):
    """The fastest verified runtime: ONNX Runtime on CPU when available and matching, else PyTorch.

    ``kind``: ``auto`` | ``torch`` | ``onnx`` (``onnx`` raises when unavailable or not matching).
    """
    if kind == "torch" or device.type != "cpu":
        if kind == "onnx":
            raise ValueError("the ONNX runtime is CPU-only here; use --runtime torch on CUDA")
        return TorchRuntime(model, device)
    threads = threads or torch.get_num_threads()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if kind == "onnx":
            raise
        log.warning("onnxruntime is not installed: using eager PyTorch (slower on CPU)")
        return TorchRuntime(model, device)
    if cache_dir is None:
        raise ValueError("an ONNX cache folder is needed (the engine passes settings.cache_dir / 'onnx')")
    path = onnx_cache_path(model, cache_dir, version=version, input_px=input_px)
    try:
        if not path.is_file():
            export_onnx(model, input_px, path)
        runtime = OnnxRuntime(path, threads)
        diff = _verified(path) if version else None
        if diff is None:
            batch = verification_batch(input_px)
            diff = max_difference(runtime(batch), TorchRuntime(model, device)(batch))
            if version and diff <= TOLERANCE:
                _remember_verified(path, diff)
    except Exception as exc:  # an export the runtime cannot run: never silently wrong, fall back
        if kind == "onnx":
            raise
        log.warning("ONNX export/runtime failed (%s): using eager PyTorch", exc)
        return TorchRuntime(model, device)
    if diff > TOLERANCE:
        if kind == "onnx":
            raise ValueError(f"ONNX outputs differ from PyTorch by {diff:.2e} (> {TOLERANCE})")
        log.warning("ONNX outputs differ from PyTorch by %.2e: using eager PyTorch", diff)
        return TorchRuntime(model, device)
    log.info("runtime: ONNX Runtime (%d threads), verified against PyTorch (max diff %.1e)", threads, diff)
    runtime.verified_difference = diff
    return runtime
