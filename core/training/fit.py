"""Turning spatial-transcriptomics sections into training data, and training a model on them.

A section is an H&E image readable by OpenSlide plus an AnnData of raw spot counts whose
``obsm['spatial']`` holds spot centres (x, y) in level-0 px of that image. The single-cell
reference (reading it, per-type profiles, ``log_normalize``) lives in :mod:`core.training.reference`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.training.stdata import section_patches, targets

log = logging.getLogger(__name__)


@dataclass
class Section:
    """One ST section: patches centred on spots, log-normalised targets, optional true composition."""

    name: str
    patches: np.ndarray  # [N, px, px, 3] uint8
    targets: np.ndarray  # [N, G] log1p(CP10k over the panel)
    composition: np.ndarray | None  # [N, T] (synthetic only)
    xy: np.ndarray  # [N, 2] spot centres, level-0 px


def training_section(section, genes: list[str], *, tile_um: float, mpp: float,
                     cell_types: list[str] | None = None) -> Section:
    """Patches, targets and (synthetic only) true composition of a :class:`core.training.stdata.SpatialSection`."""
    patches, keep = section_patches(section, tile_um=tile_um, mpp=mpp)
    comp = section.counts.obsm.get("composition") if "composition" in section.counts.obsm else None
    if comp is not None:
        comp = comp[cell_types] if isinstance(comp, pd.DataFrame) and cell_types else comp
        comp = np.asarray(comp, dtype=np.float32)[keep]
    return Section(section.name, patches, targets(section, genes)[keep], comp, section.xy[keep])


def encode_patches(model, patches: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Frozen encoder features for uint8 patches (CPU)."""
    import torch

    feats = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            feats.append(model.forward_features(torch.from_numpy(patches[i:i + batch_size])).numpy())
    return np.concatenate(feats)


def train_on_sections(sections: list[Section], profiles: pd.DataFrame, *, encoder: str = "efficientnet_lite0",
                      held_out: str | None = None, epochs: int = 40, seed: int = 0, joint: bool = True):
    """Train a SciSt-style fusion head (:class:`models.fusion.FusionHead`) on frozen encoder tokens.

    The composition is learned (softmax over the reference types); where the sections carry a
    true composition (synthetic data only) it also supervises that composition. Returns
    (model, metrics): metrics on the ``held_out`` section (never used for fitting or for choosing
    epochs) and the training time. The caller saves the checkpoint.

    ``joint``: also fit the joint image ↔ expression space (:mod:`core.training.joint`) on the
    same features and targets (``model.joint``; its held-out retrieval in ``metrics["joint"]``).
    """
    import torch
    from models.encoders import create_encoder
    from models.evaluate import summarize
    from models.fusion import FusionConfig, FusionHead
    from models.scist import TesseraModel
    from models.train import fit_fusion

    torch.manual_seed(seed)
    started = time.perf_counter()
    genes, types = list(profiles.columns), list(profiles.index)
    enc = create_encoder(encoder)
    px = sections[0].patches.shape[1]
    with torch.inference_mode():  # the token count follows from the encoder and the input size
        n_tokens = enc.module.tokens(torch.zeros(1, 3, px, px)).shape[1]
    head = FusionHead(FusionConfig(enc.dim, n_tokens, len(genes), len(types)),
                      torch.tensor(profiles.to_numpy(), dtype=torch.float32))
    model = TesseraModel(enc, head).eval()
    feats = {s.name: encode_patches(model, s.patches) for s in sections}
    train = [s for s in sections if s.name != held_out]
    use_comp = all(s.composition is not None for s in train)
    fit_fusion(head,
               torch.tensor(np.concatenate([feats[s.name] for s in train])),
               torch.tensor(np.concatenate([s.targets for s in train])),
               true_composition=torch.tensor(np.concatenate([s.composition for s in train])) if use_comp else None,
               epochs=epochs, seed=seed)
    metrics: dict = {"train_sections": [s.name for s in train], "train_spots": int(sum(len(s.targets) for s in train)),
                     "epochs": epochs}
    if held_out is not None:
        test = next(s for s in sections if s.name == held_out)
        with torch.inference_mode():
            pred = head(torch.tensor(feats[test.name]))["expression"].numpy()
        metrics["held_out"] = {test.name: summarize(pred, test.targets, genes)}
    if joint:
        from core.training.joint import joint_fit, joint_metrics

        x_train = np.concatenate([feats[s.name] for s in train])
        y_train = np.concatenate([s.targets for s in train])
        model.joint = joint_fit(x_train, y_train, epochs=epochs, seed=seed)
        if held_out is not None:
            metrics["joint"] = {"held_out": test.name, "train_sections": [s.name for s in train], "epochs": epochs,
                                **joint_metrics(model.joint, y_train, feats[test.name], test.targets, genes)}
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    return model, metrics
