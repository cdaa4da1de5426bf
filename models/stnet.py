"""An end-to-end CNN regressor in the spirit of ST-Net: a whole ImageNet backbone fine-tuned with
a linear output per gene. A baseline for the LOSO table, not a shipped model: it has no reference
prior, so it shows what the prior and the fusion add over plain fine-tuning."""
from __future__ import annotations

import torch
from torch import nn

from models.encoders import EncoderSpec


class CNNRegressor(nn.Module):
    """uint8 patches [B, H, W, 3] → expression [B, G]; the encoder's normalisation is inside."""

    def __init__(self, encoder: EncoderSpec, n_genes: int, *, dropout: float = 0.2):
        super().__init__()
        self.backbone = encoder.module
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.dim, n_genes))
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        x = (tiles_uint8.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.out(self.backbone(x.contiguous(memory_format=torch.channels_last)))
