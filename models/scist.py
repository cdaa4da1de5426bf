"""A reference-informed expression model in the spirit of SciSt.

Image features → an embedding → a cell-type composition (softmax over the reference types) →
the *initial expression* = composition × reference profiles; the image embedding then refines
that prior (residual), giving the panel's log-normalised expression. The forward pass is split
into ``forward_features`` (encoder) and ``forward_head`` so features can be cached for training.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.reference import ReferenceHead

from models.encoders import EncoderSpec, create_encoder
from models.fusion import FusionConfig, FusionHead

CHECKPOINT_FORMAT = "tessera-ckpt/1"


@dataclass
class HeadConfig:
    in_dim: int
    n_genes: int
    n_types: int
    hidden: int = 256
    emb_dim: int = 64
    dropout: float = 0.1


class ReferenceInformedHead(ReferenceHead):
    """Features [B, in_dim] → dict(expression [B,G], composition [B,T], prior [B,G], embedding [B,E])."""

    def __init__(self, config: HeadConfig, profiles: torch.Tensor):
        super().__init__(config, profiles)
        self.embed = nn.Sequential(
            nn.LayerNorm(config.in_dim), nn.Dropout(config.dropout),
            nn.Linear(config.in_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.emb_dim),
        )
        self.composition = nn.Linear(config.emb_dim, config.n_types)
        self.refine = nn.Sequential(
            nn.Linear(config.emb_dim + config.n_genes, config.hidden), nn.GELU(),
            nn.Linear(config.hidden, config.n_genes),
        )

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(feats)
        comp = torch.softmax(self.composition(emb), dim=-1)
        prior = comp @ self.profiles
        expr = prior + self.refine(torch.cat([emb, prior], dim=-1))
        return {"expression": expr, "composition": comp, "prior": prior,
                "embedding": F.normalize(emb, dim=-1)}


class TesseraModel(nn.Module):
    """uint8 tiles [B,H,W,3] → the head's outputs. Normalisation happens inside, on the device."""

    def __init__(self, encoder: EncoderSpec, head: nn.Module):
        super().__init__()
        self.encoder = encoder.module
        self.encoder_name = encoder.name
        self.head = head
        self.uses_tokens = isinstance(head, FusionHead)  # fusion heads attend over the feature map
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1) * 255.0)

    def preprocess(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        x = tiles_uint8.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward_features(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(tiles_uint8)
        return (self.encoder.tokens(x) if self.uses_tokens else self.encoder(x)).float()

    def forward_head(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(feats.float())

    def forward(self, tiles_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(tiles_uint8))


@dataclass
class ModelCard:
    """What a checkpoint predicts and how it was made; saved as ``card.json`` beside it."""

    model_id: str
    genes: list[str]
    cell_types: list[str]
    encoder: str
    tile_um: float
    mpp: float
    input_px: int
    training_data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    description: str = ""
    version: str = ""


_HEADS = {"pooled": (HeadConfig, ReferenceInformedHead), "fusion": (FusionConfig, FusionHead)}


def save_checkpoint(directory: Path, head: nn.Module, card: ModelCard, *, half: bool = True) -> ModelCard:
    """Write ``model.pt`` + ``card.json``; the version is a hash of the weights file.

    ``half`` stores floating-point weights as float16 (half the size; loading casts them back to
    float32, and predictions move by ~1e-3 of a log-expression unit).
    """
    directory.mkdir(parents=True, exist_ok=True)
    head_type = "fusion" if isinstance(head, FusionHead) else "pooled"
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in head.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "head_type": head_type, "head_config": asdict(head.config),
               "head_state": state, "card": {**asdict(card), "version": ""}}
    path = directory / "model.pt"
    torch.save(payload, path)
    card.version = hashlib.blake2b(path.read_bytes(), digest_size=6).hexdigest()
    (directory / "card.json").write_text(json.dumps(asdict(card), indent=2))
    return card


def load_checkpoint(directory: Path, *, encoder_weights: str | Path | None = None) -> tuple[TesseraModel, ModelCard]:
    """Load a checkpoint folder into an eval-mode :class:`TesseraModel` and its card."""
    payload = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: unknown checkpoint format {payload.get('format')!r}")
    card = ModelCard(**json.loads((directory / "card.json").read_text()))
    config_cls, head_cls = _HEADS[payload.get("head_type", "pooled")]
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in payload["head_state"].items()}
    head = head_cls(config_cls(**payload["head_config"]), state["profiles"])
    head.load_state_dict(state)
    model = TesseraModel(create_encoder(card.encoder, weights_path=encoder_weights), head).eval()
    return model, card
