"""Leave-one-section-out comparison of expression models on real ST, all in one table.

Per fold, every method is fitted on the other sections only (no epoch or hyper-parameter is
chosen on the test section):
- ``ridge``: PCA-256 + ridge on frozen encoder features (the HEST-Benchmark protocol; alpha by
  inner leave-one-section-out on the training sections);
- ``cnn``: an end-to-end CNN regressor (ST-Net-like: the whole encoder fine-tuned, flips and
  rotations, fixed epochs) on the same patches at half resolution (CPU budget);
- ``prior`` / ``prior_nuclei``: the reference prior alone — composition × reference profiles —
  with the composition learned from image features, or counted from segmented nuclei (no
  training at all);
- ``full`` / ``full_nuclei``: the fusion model with either composition.
Encoder features, nuclei counts and patches are computed once per section and cached on disk.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)
METHODS = {
    "ridge": "PCA-256 + ridge on frozen encoder features (HEST-Benchmark protocol)",
    "cnn": "end-to-end CNN regressor (ST-Net-like, whole encoder fine-tuned)",
    "prior": "reference prior alone, learned composition",
    "prior_nuclei": "reference prior alone, nuclei-derived composition (no training)",
    "full": "full fusion model, learned composition",
    "full_nuclei": "full fusion model, nuclei-derived composition as input",
}
CACHE_VERSION = "v2"


@dataclass
class Prepared:
    """One section's cached inputs over the panel."""

    name: str
    pooled: np.ndarray  # [N, C] pooled encoder features
    tokens: np.ndarray  # [N, T, C] float16 encoder feature map
    y: np.ndarray  # [N, G] targets
    nuclei: np.ndarray | None = None  # [N, len(nuclei CLASSES)] nucleus counts per class
    small: np.ndarray | None = None  # [N, h, w, 3] uint8 patches at half resolution (CNN baseline)


def prepare(sections, genes: list[str], *, encoder: str, tile_um: float, mpp: float, cache_dir: Path,
            batch_size: int = 32, workers: int = 2, encoder_weights: str | Path | None = None) -> list[Prepared]:
    """Features, nuclei counts and small patches of every spot (cached per section/encoder/tiling)."""
    import torch

    from core.wsi.nuclei_classes import compositions
    from core.training.stdata import section_patches, targets
    from models.encoders import create_encoder
    from models.scist import TesseraModel

    spec = create_encoder(encoder, weights_path=encoder_weights)
    wrapper = TesseraModel(spec, torch.nn.Identity()).eval()  # only for its preprocessing
    out = []
    for section in sections:
        key = hashlib.blake2b(f"{CACHE_VERSION}|{section.name}|{section.image_path}|{encoder}|{tile_um}|{mpp}".encode(),
                              digest_size=8).hexdigest()
        cache = cache_dir / f"{section.name}-{key}.npz"
        if cache.is_file():
            data = dict(np.load(cache))
        else:
            started = time.perf_counter()
            patches, keep = section_patches(section, tile_um=tile_um, mpp=mpp)
            pooled, tokens = _encode(wrapper, spec, patches, batch_size)
            _, counts = compositions(patches, mpp=mpp, workers=workers, return_counts=True)
            data = {"pooled": pooled, "tokens": tokens, "keep": keep, "nuclei": counts, "small": _halve(patches)}
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **data)
            tmp.replace(cache)
            log.info("%s: %d patches encoded + nuclei in %.0f s", section.name, len(patches), time.perf_counter() - started)
        out.append(Prepared(section.name, data["pooled"], data["tokens"], targets(section, genes)[data["keep"]],
                            data["nuclei"], data["small"]))
    return out


def _halve(patches: np.ndarray) -> np.ndarray:
    """2 × 2 box downsampling of uint8 patches [N, H, W, 3] (H, W even)."""
    n, h, w, c = patches.shape
    small = patches[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return np.round(small).astype(np.uint8)


def _encode(wrapper, spec, patches: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    pooled, tokens = [], []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            x = wrapper.preprocess(torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])))
            t = spec.module.tokens(x)
            tokens.append(t.half().numpy())
            pooled.append(t.mean(dim=1).numpy())
    return np.concatenate(pooled), np.concatenate(tokens)


def nuclei_composition(prepared: Prepared, reference_types: list[str], shares: dict | None = None,
                       mapping: dict | None = None) -> np.ndarray:
    """Weights over the reference types [N, T] from a section's nucleus counts (see
    :func:`core.wsi.nuclei_classes.map_to_reference`; a class split over several types in proportion
    to ``shares``; ``mapping`` nuclei class → reference types, default the Xenium breast types;
    patches without nuclei get the uniform composition)."""
    from core.wsi.nuclei import CLASSES
    from core.wsi.nuclei_classes import map_to_reference

    counts = prepared.nuclei.astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.where(total > 0, total, 1.0)
    return map_to_reference(fractions, CLASSES, reference_types, mapping, priors=shares,
                            empty=total[:, 0] == 0).astype(np.float32)


def ridge_predict(train: list[Prepared], test: Prepared, *, n_pca: int = 256) -> tuple[np.ndarray, float]:
    """PCA-256 + ridge on pooled features; alpha chosen by inner leave-one-section-out on ``train``."""
    def fit(parts, alpha):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = np.concatenate([p.pooled for p in parts])
        y = np.concatenate([p.y for p in parts])
        pca = PCA(n_components=min(n_pca, len(x) - 1, x.shape[1]), random_state=0)
        return make_pipeline(StandardScaler(), pca, Ridge(alpha=alpha)).fit(x, y)

    from models.evaluate import per_gene_pearson

    scores = {}
    for alpha in ALPHAS:
        rs = [np.nanmean(per_gene_pearson(fit([p for p in train if p is not v], alpha).predict(v.pooled), v.y))
              for v in train]
        scores[alpha] = float(np.mean(rs))
    best = max(scores, key=scores.get)
    return fit(train, best).predict(test.pooled), best


def fusion_fit(train: list[Prepared], profiles: np.ndarray, *, compositions: list[np.ndarray] | None = None,
               epochs: int = 30, seed: int = 0):
    """A :class:`models.fusion.FusionHead` fitted on cached tokens; with ``compositions`` (one per
    training section) the head takes them as input instead of learning a composition."""
    import torch

    from models.fusion import FusionConfig, FusionHead
    from models.train import fit_fusion

    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([p.tokens for p in train]))
    y = torch.from_numpy(np.concatenate([p.y for p in train]))
    comp = None if compositions is None else torch.from_numpy(np.concatenate(compositions))
    head = FusionHead(FusionConfig(in_dim=x.shape[2], n_tokens=x.shape[1], n_genes=y.shape[1],
                                   n_types=profiles.shape[0], learned_composition=comp is None),
                      torch.from_numpy(profiles))
    fit_fusion(head, x, y, composition=comp, epochs=epochs, seed=seed)
    return head


def fusion_predict(head, test: Prepared, composition: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(expression, prior) of a fitted fusion head on a section's cached tokens."""
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(test.tokens), 256):
            comp = None if composition is None else torch.from_numpy(composition[i:i + 256])
            outs.append(head(torch.from_numpy(test.tokens[i:i + 256]).float(), comp))
    return (np.concatenate([o["expression"].numpy() for o in outs]),
            np.concatenate([o["prior"].numpy() for o in outs]))


def cnn_predict(train: list[Prepared], test: Prepared, *, encoder: str, epochs: int = 4, seed: int = 0) -> np.ndarray:
    """Fine-tune a fresh :class:`models.stnet.CNNRegressor` on the training sections' small patches."""
    import torch

    from models.encoders import create_encoder
    from models.stnet import CNNRegressor
    from models.train import fit_regressor

    torch.manual_seed(seed)
    y = np.concatenate([p.y for p in train])
    model = CNNRegressor(create_encoder(encoder), y.shape[1])
    with torch.no_grad():  # start the output at the training mean: the first steps fit shape, not offset
        model.out[1].bias.copy_(torch.from_numpy(y.mean(axis=0)))
    fit_regressor(model, torch.from_numpy(np.concatenate([p.small for p in train])), torch.from_numpy(y),
                  epochs=epochs, seed=seed)
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(test.small[i:i + 64])).numpy()
                               for i in range(0, len(test.small), 64)])


def run_loso(prepared: list[Prepared], profiles: np.ndarray, genes: list[str], *, reference_types: list[str],
             type_shares: dict | None = None, nuclei_mapping: dict | None = None, epochs: int = 30, cnn_epochs: int = 4, seed: int = 0,
             encoder: str = "efficientnet_lite0", methods: list[str] | None = None) -> dict:
    """Every method on every fold; returns ``{"genes", "methods", "folds": {section: {method: metrics}}, "table"}``."""
    from models.evaluate import summarize

    methods = list(methods or METHODS)
    nuclei = {p.name: nuclei_composition(p, reference_types, type_shares, nuclei_mapping) for p in prepared} \
        if {"prior_nuclei", "full_nuclei"} & set(methods) else {}
    folds = {}
    for test in prepared:
        train = [p for p in prepared if p is not test]
        started, preds, extra = time.perf_counter(), {}, {}
        if "ridge" in methods:
            preds["ridge"], extra["ridge"] = ridge_predict(train, test)
        if "cnn" in methods:
            preds["cnn"] = cnn_predict(train, test, encoder=encoder, epochs=cnn_epochs, seed=seed)
        if {"prior", "full"} & set(methods):
            head = fusion_fit(train, profiles, epochs=epochs, seed=seed)
            preds["full"], preds["prior"] = fusion_predict(head, test)
        if "prior_nuclei" in methods:
            preds["prior_nuclei"] = nuclei[test.name] @ profiles
        if "full_nuclei" in methods:
            head = fusion_fit(train, profiles, compositions=[nuclei[p.name] for p in train], epochs=epochs, seed=seed)
            preds["full_nuclei"], _ = fusion_predict(head, test, nuclei[test.name])
        folds[test.name] = {m: {**_short(summarize(preds[m], test.y, genes)),
                                **({"alpha": extra[m]} if m in extra else {})} for m in methods}
        log.info("fold %s (%.0f s): %s", test.name, time.perf_counter() - started,
                 {m: round(v["mean_pcc"], 3) for m, v in folds[test.name].items()})
    table = {m: {k: float(np.mean([f[m][k] for f in folds.values()])) for k in ("mean_pcc", "median_pcc", "top50_pcc")}
             for m in methods}
    return {"genes": genes, "methods": {m: METHODS[m] for m in methods}, "folds": folds, "table": table,
            "settings": {"epochs": epochs, "cnn_epochs": cnn_epochs, "seed": seed, "encoder": encoder}}


def format_table(report: dict) -> str:
    """The LOSO table as Markdown (mean over folds, then each fold's mean PCC)."""
    folds = list(report["folds"])
    lines = ["| method | mean PCC | median PCC | top-50 PCC | " + " | ".join(folds) + " |",
             "|---" * (4 + len(folds)) + "|"]
    for m, row in report["table"].items():
        per_fold = " | ".join(f"{report['folds'][f][m]['mean_pcc']:.3f}" for f in folds)
        lines.append(f"| {m} | {row['mean_pcc']:.3f} | {row['median_pcc']:.3f} | {row['top50_pcc']:.3f} | {per_fold} |")
    return "\n".join(lines)


def _short(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_gene"}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
