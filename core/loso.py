"""Leave-one-section-out comparison of expression models on real ST, all in one table.

Per fold, every method is fitted on the other sections only (no epoch or hyper-parameter is
chosen on the test section): ridge on frozen encoder features (PCA-256 + ridge, the
HEST-Benchmark protocol, alpha by inner leave-one-section-out on the training sections), the
reference prior alone (learned composition × reference profiles), and the full fusion model.
Encoder features are computed once per section and cached on disk.
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


@dataclass
class Prepared:
    """One section's cached inputs: pooled features, token maps and targets over the panel."""

    name: str
    pooled: np.ndarray  # [N, C]
    tokens: np.ndarray  # [N, T, C] float16
    y: np.ndarray  # [N, G]


def prepare(sections, genes: list[str], *, encoder: str, tile_um: float, mpp: float, cache_dir: Path,
            batch_size: int = 32) -> list[Prepared]:
    """Encoder features of every spot's patch (cached per section/encoder/tiling) and targets."""
    import torch

    from core.stdata import section_patches, targets
    from models.encoders import create_encoder
    from models.scist import TesseraModel

    spec = create_encoder(encoder)
    wrapper = TesseraModel(spec, torch.nn.Identity()).eval()  # only for its preprocessing
    out = []
    for section in sections:
        key = hashlib.blake2b(f"{section.name}|{section.image_path}|{encoder}|{tile_um}|{mpp}".encode(),
                              digest_size=8).hexdigest()
        cache = cache_dir / f"{section.name}-{key}.npz"
        if cache.is_file():
            data = np.load(cache)
            pooled, tokens, keep = data["pooled"], data["tokens"], data["keep"]
        else:
            started = time.perf_counter()
            patches, keep = section_patches(section, tile_um=tile_um, mpp=mpp)
            pooled, tokens = _encode(wrapper, spec, patches, batch_size)
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(cache, pooled=pooled, tokens=tokens, keep=keep)
            log.info("%s: %d patches encoded in %.0f s", section.name, len(patches), time.perf_counter() - started)
        out.append(Prepared(section.name, pooled, tokens, targets(section, genes)[keep]))
    return out


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


def fusion_fit(train: list[Prepared], profiles: np.ndarray, *, epochs: int = 30, seed: int = 0,
               batch_size: int = 64, lr: float = 1e-3, prior_weight: float = 0.3):
    """Train a :class:`models.fusion.FusionHead` on cached tokens for a fixed number of epochs."""
    import torch

    from models.fusion import FusionConfig, FusionHead

    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate([p.tokens for p in train]))
    y = torch.from_numpy(np.concatenate([p.y for p in train]))
    head = FusionHead(FusionConfig(in_dim=x.shape[2], n_tokens=x.shape[1], n_genes=y.shape[1],
                                   n_types=profiles.shape[0]), torch.from_numpy(profiles))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * (-(-len(x) // batch_size)))
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            out = head(x[idx].float())
            loss = torch.nn.functional.mse_loss(out["expression"], y[idx]) + \
                prior_weight * torch.nn.functional.mse_loss(out["prior"], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("fusion epoch %d loss %.4f", epoch, total / len(x))
    return head.eval()


def fusion_predict(head, test: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(expression, prior) of a fitted fusion head on a section's cached tokens."""
    import torch

    with torch.inference_mode():
        outs = [head(torch.from_numpy(test.tokens[i:i + 256]).float()) for i in range(0, len(test.tokens), 256)]
    return (np.concatenate([o["expression"].numpy() for o in outs]),
            np.concatenate([o["prior"].numpy() for o in outs]))


def run_loso(prepared: list[Prepared], profiles: np.ndarray, genes: list[str], *, epochs: int = 30,
             seed: int = 0) -> dict:
    """Every method on every fold; returns ``{"genes", "folds": {section: {method: metrics}}, "table"}``."""
    from models.evaluate import summarize

    folds = {}
    for test in prepared:
        train = [p for p in prepared if p is not test]
        started = time.perf_counter()
        ridge, alpha = ridge_predict(train, test)
        head = fusion_fit(train, profiles, epochs=epochs, seed=seed)
        full, prior = fusion_predict(head, test)
        folds[test.name] = {
            "ridge": {**_short(summarize(ridge, test.y, genes)), "alpha": alpha},
            "prior": _short(summarize(prior, test.y, genes)),
            "full": _short(summarize(full, test.y, genes)),
        }
        log.info("fold %s (%.0f s): %s", test.name, time.perf_counter() - started,
                 {m: round(v["mean_pcc"], 3) for m, v in folds[test.name].items()})
    methods = list(next(iter(folds.values())))
    table = {m: {k: float(np.mean([f[m][k] for f in folds.values()])) for k in ("mean_pcc", "median_pcc", "top50_pcc")}
             for m in methods}
    return {"genes": genes, "folds": folds, "table": table}


def _short(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "per_gene"}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
