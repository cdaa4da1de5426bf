"""Fitting and measuring the joint image ↔ expression space (:mod:`models.joint`).

- :func:`joint_fit`: a :class:`models.joint.JointSpace` on training sections' cached encoder
  features (the same tokens the fusion model reads) and measured spot profiles.
- :func:`knn_predict`: BLEEP-style expression by retrieval: a test spot's image embedding →
  the ``k`` training spots whose *expression* embeddings are nearest (cosine) → the mean of their
  measured profiles (BLEEP, Xie et al. 2023, uses the same average over k nearest reference spots).
- :func:`retrieval_scores`: expression → spot retrieval within a held-out section: the measured
  profile of each spot embedded by the expression tower, every spot of the section ranked by the
  cosine of its image embedding; top-k accuracy is the share of spots whose own image is among
  the k best, next to the random figure k / N.

Both take plain arrays, so the LOSO harness (:mod:`core.training.loso`, row ``joint_knn``), the
demo model's card (:func:`core.training.fit.train_on_sections`) and the shipping command
(:func:`ship_joint`) use one implementation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
KNN_K = 50
TOP_KS = (1, 5, 50)


def joint_fit(features: np.ndarray, targets: np.ndarray, *, epochs: int = 40, seed: int = 0, dim: int = 64):
    """A fitted :class:`models.joint.JointSpace` on features [N, T, C] or [N, C] and profiles [N, G]."""
    import torch

    from models.joint import JointConfig, JointSpace
    from models.train import fit_joint

    torch.manual_seed(seed)
    x = torch.from_numpy(np.asarray(features, np.float32))
    x = x.mean(dim=1) if x.dim() == 3 else x
    space = JointSpace(JointConfig(in_dim=int(x.shape[-1]), n_genes=int(targets.shape[1]), dim=dim))
    fit_joint(space, x, torch.from_numpy(np.asarray(targets, np.float32)), epochs=epochs, seed=seed)
    return space.eval()


def embed(space, features: np.ndarray | None = None, profiles: np.ndarray | None = None) -> np.ndarray:
    """Image embeddings of ``features`` or expression embeddings of ``profiles`` (unit rows)."""
    import torch

    with torch.inference_mode():
        if features is not None:
            x = torch.from_numpy(np.asarray(features, np.float32))
            return np.concatenate([space.image(x[i:i + 1024]).numpy() for i in range(0, len(x), 1024)])
        y = torch.from_numpy(np.asarray(profiles, np.float32))
        return np.concatenate([space.expression(y[i:i + 1024]).numpy() for i in range(0, len(y), 1024)])


def knn_predict(space, train_profiles: np.ndarray, test_features: np.ndarray, *, k: int = KNN_K) -> np.ndarray:
    """BLEEP-style prediction [N_test, G]: the mean measured profile of the ``k`` training spots
    whose expression embedding is nearest to each test spot's image embedding."""
    bank = embed(space, profiles=train_profiles)
    query = embed(space, features=test_features)
    k = min(k, len(bank))
    out = np.empty((len(query), train_profiles.shape[1]), np.float32)
    for i in range(0, len(query), 512):
        sims = query[i:i + 512] @ bank.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[i:i + 512] = train_profiles[top].mean(axis=1)
    return out


def retrieval_scores(space, features: np.ndarray, profiles: np.ndarray, *, ks=TOP_KS) -> dict:
    """Expression → spot retrieval within one section: {``top{k}``: share of spots whose own image
    ranks among the k nearest to their measured profile, ``random{k}``: k / N, ``n``}."""
    img = embed(space, features=features)
    expr = embed(space, profiles=profiles)
    sims = expr @ img.T                                  # row: a profile query; columns: the section's spots
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(axis=1)             # 0 = the own spot is the best match
    n = len(own)
    out = {"n": int(n)}
    for k in ks:
        out[f"top{k}"] = float(np.mean(rank < k))
        out[f"random{k}"] = float(min(k, n) / max(n, 1))
    return out


def joint_metrics(space, train_profiles: np.ndarray, test_features: np.ndarray, test_profiles: np.ndarray,
                  genes: list[str]) -> dict:
    """A held-out section's retrieval scores and the BLEEP-style prediction's PCC (the card's entry)."""
    from models.evaluate import summarize

    pred = knn_predict(space, train_profiles, test_features)
    return {"retrieval": retrieval_scores(space, test_features, test_profiles),
            "knn_prediction": {"k": KNN_K, **{k: v for k, v in summarize(pred, test_profiles, genes).items()
                                              if k in ("mean_pcc", "median_pcc")}}}


def ship_joint(model, st_dir: Path, *, epochs: int = 40, seed: int = 0, cache_dir: Path = Path("data/cache/features"),
               held_out: str | None = None) -> dict:
    """Fit the joint space of ``model`` (a loaded model) on the ST sections under ``st_dir`` with
    the model's encoder and tiling, and write it into the model's checkpoint (head untouched;
    :func:`models.scist.attach_joint`). One section (``held_out``, default the last) is held out
    for the card's metrics, then the shipped space is refitted on every section. Returns the
    metrics written to the card."""
    from core.errors import TesseraError
    from core.training.loso import prepare
    from core.training.stdata import find_sections
    from models.scist import attach_joint

    sections = find_sections(st_dir)
    if len(sections) < 2:
        raise TesseraError(f"{st_dir}: {len(sections)} ST section(s); the joint space needs at least two "
                           "(one is held out for its metrics).")
    card = model.card
    prepared = prepare(sections, list(model.genes), encoder=card["encoder"], tile_um=float(card["tile_um"]),
                       mpp=float(card["mpp"]), cache_dir=Path(cache_dir))
    held_out = held_out or prepared[-1].name
    if held_out not in {p.name for p in prepared}:
        raise TesseraError(f"--held-out {held_out}: no such section (found {', '.join(p.name for p in prepared)}).")
    train = [p for p in prepared if p.name != held_out]
    test = next(p for p in prepared if p.name == held_out)
    y_train = np.concatenate([p.y for p in train])
    trial = joint_fit(np.concatenate([p.tokens for p in train]), y_train, epochs=epochs, seed=seed)
    metrics = {"held_out": held_out, "train_sections": [p.name for p in train], "epochs": epochs,
               **joint_metrics(trial, y_train, test.tokens, test.y, list(model.genes))}
    shipped = joint_fit(np.concatenate([p.tokens for p in prepared]), np.concatenate([p.y for p in prepared]),
                        epochs=epochs, seed=seed)
    metrics["shipped_on"] = [p.name for p in prepared]
    attach_joint(Path(model.directory), shipped, metrics)
    log.info("joint space of %s: held-out %s %s", model.model_id, held_out, metrics["retrieval"])
    return metrics


def st_loso(st_dir: Path, *, panel=None, encoder: str = "efficientnet_lite0", tile_um: float = 112.0,
            mpp: float = 0.5, epochs: int = 40, fusion_epochs: int = 30, seed: int = 0, k: int = KNN_K,
            cache_dir: Path = Path("data/cache/features"), reference=None, reference_types=None) -> dict:
    """Leave-one-section-out on real ST: per held-out section, the joint space fitted on the others'
    spots gives expression → spot retrieval (top-1/5/50 and chance) and spot → expression by
    retrieval (BLEEP-style, the mean of the ``k`` nearest training profiles); beside it the
    same k-NN on the plain pooled encoder features (cosine; "plain embedding") and the fusion model
    (:func:`core.training.loso.fusion_fit`, when a ``reference`` gives its profiles). Mean PCC over
    the panel per section, and the mean over sections."""
    from core.training.loso import fusion_fit, fusion_predict, prepare
    from core.training.stdata import find_sections, panel_genes
    from models.evaluate import per_gene_pearson

    sections = find_sections(st_dir)
    genes = panel_genes(sections, panel)
    profiles = None
    if reference is not None:
        from core.training.reference import read_reference, reference_profiles

        ref = read_reference(Path(reference), reference_types)
        genes = [g for g in genes if g in set(ref.var_names)]
        profiles = reference_profiles(ref, genes)[0].to_numpy(np.float32)
    prepared = prepare(sections, genes, encoder=encoder, tile_um=tile_um, mpp=mpp, cache_dir=Path(cache_dir))
    rows = {}
    for test in prepared:
        train = [p for p in prepared if p.name != test.name]
        y_train = np.concatenate([p.y for p in train])
        space = joint_fit(np.concatenate([p.tokens for p in train]), y_train, epochs=epochs, seed=seed)
        row = {"n_spots": int(len(test.y)), "retrieval": retrieval_scores(space, test.tokens, test.y)}
        pcc = {"joint_knn": per_gene_pearson(knn_predict(space, y_train, test.tokens, k=k), test.y),
               "plain_knn": per_gene_pearson(_plain_knn(np.concatenate([p.pooled for p in train]), y_train,
                                                        test.pooled, k), test.y)}
        if profiles is not None:
            head = fusion_fit(train, profiles, epochs=fusion_epochs, seed=seed)
            pcc["fusion"] = per_gene_pearson(fusion_predict(head, test)[0], test.y)
        row["mean_pcc"] = {m: float(np.nanmean(r)) for m, r in pcc.items()}
        rows[test.name] = row
        log.info("joint LOSO %s: %s %s", test.name, row["retrieval"], row["mean_pcc"])
    methods = list(next(iter(rows.values()))["mean_pcc"])
    mean = {"retrieval": {key: float(np.mean([r["retrieval"][key] for r in rows.values()]))
                          for key in next(iter(rows.values()))["retrieval"] if key != "n"},
            "mean_pcc": {m: float(np.mean([r["mean_pcc"][m] for r in rows.values()])) for m in methods}}
    return {"sections": rows, "mean": mean, "genes": len(genes), "k": k, "encoder": encoder, "tile_um": tile_um,
            "mpp": mpp, "epochs": epochs}


def _plain_knn(train_feats: np.ndarray, train_profiles: np.ndarray, test_feats: np.ndarray, k: int) -> np.ndarray:
    """k-NN by cosine on standardised pooled features: the retrieval baseline without a joint space."""
    mu, sd = train_feats.mean(axis=0), train_feats.std(axis=0) + 1e-6
    a = (train_feats - mu) / sd
    b = (test_feats - mu) / sd
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-9
    b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-9
    k = min(k, len(a))
    top = np.argpartition(-(b @ a.T), k - 1, axis=1)[:, :k]
    return train_profiles[top].mean(axis=1)
