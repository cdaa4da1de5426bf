"""What every reference-informed head shares: the cell-type × gene profile matrix it mixes."""
from __future__ import annotations

import torch
from torch import nn


class ReferenceHead(nn.Module):
    """Base for heads whose prior is composition [B, T] @ profiles [T, G] (a buffer, saved with the head)."""

    def __init__(self, config, profiles: torch.Tensor):
        super().__init__()
        if profiles.shape != (config.n_types, config.n_genes):
            raise ValueError(f"profiles must be {config.n_types}×{config.n_genes}, got {tuple(profiles.shape)}")
        self.config = config
        self.register_buffer("profiles", profiles.float())
