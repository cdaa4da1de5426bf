"""SciSt-style fusion: the reference-informed initial expression as a query token that attends
to image tokens through a two-way transformer (token self-attention, token→image and
image→token cross-attention), then an MLP to the gene panel.

Differences from the published model, on purpose: the composition is either learned (softmax
over *all* reference types) or given from nuclei segmentation; the output is a residual on the
prior, so the prior stays interpretable; image tokens come from any registered encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.reference import ReferenceHead


@dataclass
class FusionConfig:
    in_dim: int
    n_tokens: int
    n_genes: int
    n_types: int
    dim: int = 256
    depth: int = 2
    heads: int = 8
    emb_dim: int = 64
    dropout: float = 0.1
    learned_composition: bool = True


class TwoWayBlock(nn.Module):
    """Query tokens attend to themselves and to the image; the image then attends back."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.q_to_img = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.img_to_q = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norms[0](q + self.self_attn(q, q, q, need_weights=False)[0])
        q = self.norms[1](q + self.q_to_img(q, img, img, need_weights=False)[0])
        q = self.norms[2](q + self.mlp(q))
        img = self.norms[3](img + self.img_to_q(img, q, q, need_weights=False)[0])
        return q, img


class FusionHead(ReferenceHead):
    """Image tokens [B, N, C] (+ optional composition [B, T]) → expression, composition, prior, embedding."""

    def __init__(self, config: FusionConfig, profiles: torch.Tensor):
        super().__init__(config, profiles)
        d = config.dim
        self.img_proj = nn.Sequential(nn.LayerNorm(config.in_dim), nn.Linear(config.in_dim, d))
        self.pos = nn.Parameter(torch.zeros(1, config.n_tokens, d))
        self.composition = nn.Sequential(nn.LayerNorm(config.in_dim), nn.Linear(config.in_dim, config.n_types))
        self.prior_token = nn.Sequential(nn.Linear(config.n_genes, d), nn.GELU(), nn.Linear(d, d))
        self.out_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(TwoWayBlock(d, config.heads, config.dropout) for _ in range(config.depth))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, config.n_genes))
        self.embed = nn.Linear(d, config.emb_dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.out_token, std=0.02)

    def forward(self, tokens: torch.Tensor, composition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if tokens.shape[1] != self.config.n_tokens:
            raise ValueError(f"expected {self.config.n_tokens} image tokens, got {tokens.shape[1]} "
                             "(the input size differs from the one the model was trained at)")
        if composition is None:
            if not self.config.learned_composition:
                raise ValueError("this model takes the composition as input (nuclei); none was given")
            composition = torch.softmax(self.composition(tokens.mean(dim=1)), dim=-1)
        prior = composition @ self.profiles
        img = self.img_proj(tokens) + self.pos
        q = torch.cat([self.prior_token(prior).unsqueeze(1), self.out_token.expand(tokens.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            q, img = block(q, img)
        expr = prior + self.head(q[:, 1])
        return {"expression": expr, "composition": composition, "prior": prior,
                "embedding": F.normalize(self.embed(q[:, 1]), dim=-1)}


class ProbeFusionHead(FusionHead):
    """A fusion head whose *expression* comes from a linear probe on the pooled image tokens.

    The composition, reference prior and embedding are the fusion head's (the product's cell-type
    maps and similar-tile search need them); the expression is ``probe(mean over tokens)``, a
    linear map fitted in closed form (standardise → PCA → ridge, collapsed into one matrix, see
    :func:`core.training.loso.ridge_linear`). Shipped when the held-out table shows the tuned
    linear probe beating the attention head on new patients.
    """

    def __init__(self, config: FusionConfig, profiles: torch.Tensor):
        super().__init__(config, profiles)
        self.probe = nn.Linear(config.in_dim, config.n_genes)

    def forward(self, tokens: torch.Tensor, composition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(tokens, composition)
        out["expression"] = self.probe(tokens.mean(dim=1))
        return out
