"""Turning spatial-transcriptomics sections into training data, and training a model on them.

A section is an H&E image readable by OpenSlide plus an AnnData of raw spot counts whose
``obsm['spatial']`` holds spot centres (x, y) in level-0 px of that image.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)


@dataclass
class Section:
    """One ST section: patches centred on spots, log-normalised targets, optional true composition."""

    name: str
    patches: np.ndarray  # [N, px, px, 3] uint8
    targets: np.ndarray  # [N, G] log1p(CP10k over the panel)
    composition: np.ndarray | None  # [N, T] (synthetic only)
    xy: np.ndarray  # [N, 2] spot centres, level-0 px


def log_normalize(counts: np.ndarray, *, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalise each row to ``target_sum`` over the given genes, then log1p."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.maximum(totals, 1.0) * target_sum).astype(np.float32)


def read_reference(path: str | Path, types_path: str | Path | None = None, *, type_column: str = "cell_type"):
    """A single-cell reference as AnnData with ``obs[type_column]``.

    ``path`` is an ``.h5ad`` (with the type column in ``obs``) or a CSV (optionally gzipped) of
    cells × genes counts whose first column is the cell id, with ``types_path`` a CSV of
    ``cell_id, <type_column>``.
    """
    import anndata as ad

    path = Path(path)
    if path.suffix == ".h5ad":
        adata = ad.read_h5ad(path)
    else:
        counts = pd.read_csv(path, index_col=0)
        if types_path is None:
            raise ValueError(f"{path.name}: a counts CSV needs a cell-type table (cell_id, {type_column}).")
        types = pd.read_csv(types_path, index_col=0)
        common = counts.index.intersection(types.index)
        if len(common) == 0:
            raise ValueError(f"No cell id of {Path(types_path).name} is in {path.name}.")
        adata = ad.AnnData(counts.loc[common].to_numpy(dtype=np.float32))
        adata.obs_names = common.astype(str)
        adata.var_names = counts.columns.astype(str)
        adata.obs[type_column] = types.loc[common, types.columns[0]].astype(str).to_numpy()
    if type_column not in adata.obs:
        raise ValueError(f"The reference has no obs column {type_column!r}.")
    return adata


def reference_profiles(reference, genes: list[str], cell_types: list[str] | None = None,
                       *, type_column: str = "cell_type") -> tuple[pd.DataFrame, list[str]]:
    """Mean counts per cell type over ``genes`` (AnnData of single cells), normalised like targets."""
    import scipy.sparse as sp

    missing = [g for g in genes if g not in reference.var_names]
    if missing:
        raise ValueError(f"The reference lacks {len(missing)} panel genes, e.g. {missing[:5]}")
    types = cell_types or sorted(reference.obs[type_column].astype(str).unique())
    sub = reference[:, genes]
    X = sub.X.toarray() if sp.issparse(sub.X) else np.asarray(sub.X)
    labels = reference.obs[type_column].astype(str).to_numpy()
    means = np.stack([X[labels == t].mean(axis=0) for t in types])
    return pd.DataFrame(log_normalize(means), index=types, columns=genes), types


def training_section(section, genes: list[str], *, tile_um: float, mpp: float,
                     cell_types: list[str] | None = None) -> Section:
    """Patches, targets and (synthetic only) true composition of a :class:`core.training.stdata.SpatialSection`."""
    from core.training.stdata import section_patches, targets

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
                      held_out: str | None = None, epochs: int = 40, seed: int = 0):
    """Train a SciSt-style fusion head (:class:`models.fusion.FusionHead`) on frozen encoder tokens.

    The composition is learned (softmax over the reference types); where the sections carry a
    true composition (synthetic data only) it also supervises that composition. Returns
    (model, metrics): metrics on the ``held_out`` section (never used for fitting or for choosing
    epochs) and the training time. The caller saves the checkpoint.
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
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    return model, metrics
