"""A self-contained Vision Transformer that loads timm-layout weights (UNI and other ViT
foundation models) without timm.

The architecture is timm's ``VisionTransformer`` with a class token, pre-norm blocks and optional
LayerScale: ``patch_embed.proj`` (conv, stride = patch), ``cls_token``, ``pos_embed`` (learned,
CLS position included), ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}``, final ``norm``; LayerNorm ε = 1e-6, exact GELU. UNI is
``vit_large_patch16_224`` with ``init_values=1e-5`` (so LayerScale), shipped as a
``pytorch_model.bin`` state dict in that layout.

The size (width, depth, MLP width, patch, position grid, biases, LayerScale) is read from the
state dict, so ViT-S/B/L/H-shaped checkpoints load; the number of heads cannot be read from
weights and comes from a ``config.json`` beside them (timm / Hugging Face formats) when present,
else from the registered name (``vit_huge_patch14``: 16), else ``width // 64`` (right for
ViT-S/B/L; ViT-H and -g use 16).
Loading is strict: a key missing, unexpected or of the wrong shape is a :class:`ViTWeightsError`
naming it. Register tokens, SwiGLU MLPs (UNI2-h), global-average-pool models (``fc_norm``) and
classifier heads are not this architecture and are refused.

When the input's patch grid differs from the weights' grid, the position embedding is resampled
bicubically with antialiasing, as timm's ``resample_abs_pos_embed`` (``dynamic_img_size``) does;
during an ONNX export it is computed once and stored in the graph as a constant (the exported
input size is fixed), so the graph holds no resize op.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import EncoderError

log = logging.getLogger(__name__)
WEIGHT_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "weights.pt", "weights.pth", "checkpoint.pth")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
# timm's ViT families: name → (width, heads); used only when a config.json names the architecture
# and the weights have that family's width (DINOv2-style giants are 1536 wide with 24 heads)
_FAMILY_HEADS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12), "vit_large": (1024, 16),
                 "vit_huge": (1280, 16), "vit_giant": (1408, 16), "vit_gigantic": (1664, 16)}


class ViTWeightsError(EncoderError):
    """Weights that are not a timm-layout ViT of the expected shape, or cannot be found or read."""


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    patch: int = 16
    grid: int = 14               # the position grid the weights were trained at (side, in patches)
    qkv_bias: bool = True
    patch_bias: bool = True
    layerscale: bool = True
    cls_pos: bool = True         # pos_embed holds the class token's position too (timm's default)
    eps: float = 1e-6

    @property
    def native_px(self) -> int:
        return self.grid * self.patch

    def summary(self) -> str:
        return (f"ViT dim {self.dim}, depth {self.depth}, heads {self.heads}, MLP {self.mlp_dim}, "
                f"patch {self.patch}, grid {self.grid}×{self.grid}")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias)
        self.ls1 = LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim)
        self.ls2 = LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch, bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, C, H/p, W/p]; a remainder of H or W below one patch is dropped


def resample_pos_embed(grid_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings [1, g·g, C] → [1, h·w, C]: bicubic with antialiasing in float32
    (timm's ``resample_abs_pos_embed``)."""
    g = int(math.isqrt(grid_embed.shape[1]))
    x = grid_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1).to(grid_embed.dtype)


class VisionTransformer(nn.Module):
    """Normalised float images [B, 3, H, W] → ``forward``: the CLS token after the final norm
    [B, C] (UNI's embedding); ``tokens``: the patch tokens after the final norm [B, N, C], CLS
    dropped, N = (H // patch) · (W // patch) — the interface of the project's other encoders."""

    def __init__(self, config: ViTConfig, *, init_values: float = 1e-5):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        n_pos = config.grid ** 2 + (1 if config.cls_pos else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, config.dim))
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim, eps=config.eps)
        if self.cls_token.device.type != "meta":
            self._init_random(init_values)

    def _init_random(self, init_values: float) -> None:
        """timm-like random weights (tests and benchmarks; real use loads a checkpoint)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, init_values)

    def _positions(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS position [1, 1, C] or zeros, patch positions [1, h·w, C]) for an h × w patch grid."""
        cfg = self.config
        if cfg.cls_pos:
            cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        else:
            cls_pos, grid_pos = torch.zeros_like(self.pos_embed[:, :1]), self.pos_embed
        if (h, w) == (cfg.grid, cfg.grid):
            return cls_pos, grid_pos
        state = torch._C._get_tracing_state() if hasattr(torch._C, "_get_tracing_state") else None
        if state is None:
            return cls_pos, resample_pos_embed(grid_pos, (h, w))
        # tracing (ONNX export at a fixed input size): resample outside the trace, so the graph
        # gets the result as a constant instead of an antialiased resize ONNX cannot express
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                resampled = resample_pos_embed(grid_pos.detach(), (h, w)).clone()
        finally:
            torch._C._set_tracing_state(state)
        return cls_pos, resampled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, 1 + N, C], the CLS token first."""
        x = self.patch_embed(x)
        h, w = int(x.shape[-2]), int(x.shape[-1])  # plain ints: the ONNX graph has a fixed input size
        x = x.flatten(2).transpose(1, 2)
        cls_pos, grid_pos = self._positions(h, w)
        cls = (self.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x + grid_pos], dim=1)
        return self.norm(self.blocks(x))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


# -- reading weights -------------------------------------------------------------------------------

def resolve_weights_file(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or in a folder ``pytorch_model.bin`` (or
    ``model.pt`` …, else its only ``.bin/.pt/.pth`` file)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            raise ViTWeightsError(f"{path}: .safetensors weights are not read here (the safetensors package is not "
                                  "installed); save the state dict with torch.save as pytorch_model.bin")
        return path
    if not path.exists():
        raise ViTWeightsError(f"encoder weights {path} not found: give the folder holding pytorch_model.bin "
                              "(+ config.json), or the weights file itself")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0]
    other = " (a model.safetensors is there: save it with torch.save as pytorch_model.bin)" \
        if (path / "model.safetensors").is_file() else ""
    raise ViTWeightsError(f"{path}: no weights file ({', '.join(WEIGHT_FILES[:2])}, or a single "
                          f"{'/'.join(WEIGHT_SUFFIXES)} file; found {len(found)}){other}")


def read_config_json(weights_file: Path) -> dict:
    """``config.json`` beside the weights (timm/Hugging Face layout), or ``{}``."""
    path = Path(weights_file).parent / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ViTWeightsError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def config_heads(config: dict, dim: int) -> int | None:
    """The head count a config.json gives, directly or by its timm architecture's family (when the
    weights are ``dim`` wide, the family's width)."""
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    for value in (config.get("num_heads"), args.get("num_heads"), config.get("num_attention_heads")):
        if isinstance(value, int) and value > 0:
            return value
    arch = str(config.get("architecture") or config.get("model_name") or "")
    match = re.match(r"(vit_[a-z]+)_patch", arch)
    width, heads = _FAMILY_HEADS.get(match.group(1), (None, None)) if match else (None, None)
    return heads if width == dim else None


def config_norm(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from a config.json's ``pretrained_cfg`` (or top level), when given."""
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else config
    mean, std = cfg.get("mean"), cfg.get("std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` (memory-mapped when the file allows) of a state dict;
    a ``{"state_dict": …}`` or ``{"model": …}`` wrapper is unwrapped."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickle, truncated or not a torch file
        raise ViTWeightsError(f"{path}: cannot be read as a PyTorch state dict ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ViTWeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def infer_config(state: dict[str, torch.Tensor], *, heads: int | None = None, source: str = "weights") -> ViTConfig:
    """The ViT a timm-layout state dict holds (heads: given, else width // 64)."""
    need = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight", "norm.weight")
    lacking = [k for k in need if k not in state]
    if lacking:
        prefix = {k.split(".", 1)[0] for k in state}
        hint = " (keys carry a 'module.'/'model.' prefix: strip it)" if prefix & {"module", "model"} else ""
        raise ViTWeightsError(f"{source}: not a ViT in timm layout: no {', '.join(lacking)}{hint}; "
                              f"first keys: {', '.join(list(state)[:4])}")
    pw = state["patch_embed.proj.weight"]
    dim, patch = int(pw.shape[0]), int(pw.shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    n_pos = int(state["pos_embed"].shape[1])
    if math.isqrt(n_pos - 1) ** 2 == n_pos - 1:
        grid, cls_pos = math.isqrt(n_pos - 1), True
    elif math.isqrt(n_pos) ** 2 == n_pos:
        grid, cls_pos = math.isqrt(n_pos), False
    else:
        raise ViTWeightsError(f"{source}: pos_embed holds {n_pos} positions, not a square grid (+ CLS); "
                              "register tokens or non-square grids are not supported")
    heads = heads or max(1, dim // 64)
    if dim % heads:
        raise ViTWeightsError(f"{source}: width {dim} is not divisible by {heads} heads; set num_heads in config.json")
    return ViTConfig(dim=dim, depth=depth, heads=heads, mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
                     patch=patch, grid=grid, qkv_bias="blocks.0.attn.qkv.bias" in state,
                     patch_bias="patch_embed.proj.bias" in state, layerscale="blocks.0.ls1.gamma" in state,
                     cls_pos=cls_pos)


def _listing(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def build_vit(state: dict[str, torch.Tensor], config: ViTConfig, *, source: str = "weights") -> VisionTransformer:
    """A :class:`VisionTransformer` of ``config`` holding ``state`` (float32, eval mode); strict:
    :class:`ViTWeightsError` names missing, unexpected and mis-shaped keys."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + \
                ([f"unexpected {_listing(unexpected)}"] if unexpected else []) + \
                ([f"mis-shaped {_listing(shapes, 3)}"] if shapes else [])
        raise ViTWeightsError(f"{source}: weights do not fit a timm-layout {config.summary()}: {'; '.join(parts)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load_vit(path: str | Path, *, heads: int | None = None) -> tuple[VisionTransformer, dict]:
    """(model, info) from a weights file or a folder holding one (+ optional config.json; its head
    count wins over ``heads``, which wins over width // 64); ``info``: ``file``, ``config`` (the dict
    read, or ``{}``), ``norm`` ((mean, std) or None)."""
    file = resolve_weights_file(path)
    config = read_config_json(file)
    state = load_state_dict_file(file)
    width = state["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in state else 0
    model = build_vit(state, infer_config(state, heads=config_heads(config, width) or heads, source=str(file)),
                      source=str(file))
    log.info("%s: %s (%.1f M parameters)", file, model.config.summary(),
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, {"file": file, "config": config, "norm": config_norm(config)}


def save_timm_checkpoint(model: VisionTransformer, folder: str | Path, *, architecture: str | None = None) -> Path:
    """Write ``model`` as a UNI-style folder: ``pytorch_model.bin`` (timm keys) + ``config.json``
    (timm's Hugging Face format, with ``num_heads``); for tests, benchmarks and converted weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    arch = architecture or f"vit_patch{cfg.patch}_{cfg.native_px}"
    (folder / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": 0, "num_features": cfg.dim, "global_pool": "token",
        "model_args": {"img_size": cfg.native_px, "patch_size": cfg.patch, "embed_dim": cfg.dim, "depth": cfg.depth,
                       "num_heads": cfg.heads, "init_values": 1e-5 if cfg.layerscale else None, "num_classes": 0,
                       "dynamic_img_size": True},
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "tessera": asdict(cfg)}, indent=1))
    return folder / "pytorch_model.bin"
