"""A joint image ↔ expression space (CLIP/BLEEP-style contrastive projections).

Two small towers map into one unit sphere of ``dim`` dimensions:

- the **image tower** takes the encoder's features of a tile (the mean over the fusion head's
  image tokens, or the pooled feature vector of a vector head: the same features the expression
  model reads) → LayerNorm → Linear → GELU → Linear → L2-normalise;
- the **expression tower** takes a profile over the model's panel (log1p CP10k), standardised by
  the training spots' per-gene mean and standard deviation (buffers), → Linear → GELU → Linear →
  L2-normalise.

Training (:func:`models.train.fit_joint`) minimises the symmetric InfoNCE loss over batches of
(tile image, measured spot profile) pairs: each image must pick out its own spot's profile among
the batch's, and each profile its own image, at a learned temperature (CLIP; BLEEP applies it to
spatial transcriptomics). Similarity in the space is the cosine (inner product of unit vectors).

A profile that gives only some genes (a marker panel, a Visium spot on another panel) is completed
with the training mean for the missing genes (:meth:`JointSpace.complete`), i.e. those genes count
as "average", not as zero expression. A query by gene uses that gene's *prototype*: the mean
training profile of the spots in the gene's top decile (``gene_prototypes``), i.e. what tissue
high in that gene expresses alongside it; one gene raised alone in an average profile is not a
profile the space has ever seen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class JointConfig:
    in_dim: int
    n_genes: int
    dim: int = 64
    hidden: int = 256
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class JointSpace(nn.Module):
    """``image(features)`` and ``expression(profile)`` → unit vectors in one space."""

    def __init__(self, config: JointConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden, config.dim
        self.image_tower = nn.Sequential(nn.LayerNorm(config.in_dim), nn.Linear(config.in_dim, h), nn.GELU(),
                                         nn.Dropout(config.dropout), nn.Linear(h, d))
        self.expression_tower = nn.Sequential(nn.Linear(config.n_genes, h), nn.GELU(), nn.Dropout(config.dropout),
                                              nn.Linear(h, d))
        self.register_buffer("gene_mean", torch.zeros(config.n_genes))
        self.register_buffer("gene_std", torch.ones(config.n_genes))
        # row g: the mean training profile of the spots in gene g's top decile (a gene query's profile)
        self.register_buffer("gene_prototypes", torch.zeros(config.n_genes, config.n_genes))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))      # log(1 / 0.07), CLIP's start

    @staticmethod
    def pooled(features: torch.Tensor) -> torch.Tensor:
        """[B, N, C] image tokens → their mean [B, C]; [B, C] features pass through."""
        return features.mean(dim=1) if features.dim() == 3 else features

    def image(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(self.pooled(features.float())), dim=-1)

    def expression(self, profile: torch.Tensor) -> torch.Tensor:
        z = (profile.float() - self.gene_mean) / self.gene_std
        return F.normalize(self.expression_tower(z), dim=-1)

    def complete(self, values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """A full panel profile from ``values`` [B, G] where ``known`` [G] (bool) is set, the
        training mean elsewhere."""
        return torch.where(known[None, :], values.float(), self.gene_mean[None, :])

    def loss(self, image_emb: torch.Tensor, expr_emb: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of matched pairs (row i of both is one spot)."""
        logits = self.logit_scale.clamp(max=4.6052).exp() * image_emb @ expr_emb.T   # scale ≤ 100, as CLIP
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
