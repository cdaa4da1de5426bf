"""Held-out comparison of expression models on real ST: folds by patient and by section, seeds,
bootstrap confidence intervals, paired tests against ridge — all in one report.

Two fold schemes, both reported, per-patient first (the claim a user needs is about *new
patients*):
- ``patient``: the sections are grouped by patient; each fold trains on the other patients'
  sections and tests on every section of the held-out patient (serial sections of one patient
  are never split between training and test);
- ``section``: leave one section out (other sections of the same patient stay in training; kept
  for comparison with published HER2ST tables, which use it).

In every fold every method is fitted on the training sections only: no epoch, α or gene set is
chosen on a test section. A trained method runs with ``n_seeds`` seeds (mean ± sd over seeds);
the fold's mean PCC gets a 95 % bootstrap CI over spots (resampled within each test section, the
same resamples for every method, so the intervals are paired); each method is compared with
``ridge`` per gene (Wilcoxon signed-rank over genes, on the per-gene r averaged over seeds).
A fold's figure is the mean over its test sections; a scheme's is the mean over its folds, so every
patient (or section) weighs the same.

Gene sets scored: ``panel`` (every target gene), ``hvg50`` (the 50 genes most variable over the
*training* spots of the fold, as HEST-Benchmark does) and any named list given (intersected with
the targets).

Methods (:data:`METHODS`): ridge on frozen features under several feature sets (the HEST-Benchmark
linear probe, α from 10¹–10⁷ by inner cross-validation on the training sections), the reference
prior alone, and the SciSt-style fusion model with and without view augmentation. Encoder features,
nuclei counts and patches are computed once per section and cached on disk
(:mod:`core.training.features`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
ALPHAS = tuple(float(10 ** k) for k in range(1, 8))   # 10¹ … 10⁷
N_BOOT = 200
SCHEMES = ("patient", "section")
REPORT_FORMAT = "tessera-loso/2"
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
    patient: str | None = None  # sections of one patient are never split between train and test
    xy: np.ndarray | None = None  # [N, 2] spot centres (level-0 px): neighbours, spatial inner folds
    keep: np.ndarray | None = None  # [n_spots_in_section] bool: the spots kept (patch inside the image)
    views: dict = field(default_factory=dict)  # "encoder/view" → {"pooled": [V,N,C], "tokens": [V,N,T,C] | None}


def prepare(sections, genes: list[str], *, encoder: str, tile_um: float, mpp: float, cache_dir: Path,
            batch_size: int = 32, workers: int = 2, encoder_weights: str | Path | None = None,
            groups: dict[str, str] | None = None) -> list[Prepared]:
    """Features, nuclei counts and small patches of every spot (cached per section/encoder/tiling);
    ``groups`` maps section → patient (default :func:`patient_of`'s rule)."""
    from core.wsi.nuclei_classes import compositions
    from core.training.stdata import section_patches, targets
    from core.training.features import encode
    from models.encoders import create_encoder

    spec = create_encoder(encoder, weights_path=encoder_weights)
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
            pooled, tokens = encode(spec, patches, batch_size=batch_size)
            _, counts = compositions(patches, mpp=mpp, workers=workers, return_counts=True)
            data = {"pooled": pooled, "tokens": tokens, "keep": keep, "nuclei": counts, "small": _halve(patches)}
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, **data)
            tmp.replace(cache)
            log.info("%s: %d patches encoded + nuclei in %.0f s", section.name, len(patches), time.perf_counter() - started)
        out.append(Prepared(section.name, data["pooled"], data["tokens"], targets(section, genes)[data["keep"]],
                            data["nuclei"], data["small"], patient=patient_of(section.name, groups), xy=section.xy[data["keep"]], keep=data["keep"]))
    return out


def _halve(patches: np.ndarray) -> np.ndarray:
    """2 × 2 box downsampling of uint8 patches [N, H, W, 3] (H, W even)."""
    n, h, w, c = patches.shape
    small = patches[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return np.round(small).astype(np.uint8)


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


def patient_of(section: str, groups: dict[str, str] | None = None) -> str:
    """The patient a section comes from: ``groups[section]`` when given; else the HER2ST naming
    rule (a letter then the section number, ``C2`` → patient ``C``: Andersson et al. 2021 name
    patients A–H and their serial sections 1–6); else the section is its own patient."""
    if groups and section in groups:
        return str(groups[section])
    m = re.fullmatch(r"([A-Za-z])(\d+)", section)
    return m.group(1).upper() if m else section


def parse_groups(text: str | None) -> dict[str, str] | None:
    """``--groups``: ``B4=B,C2=C,…`` or a CSV/TSV file of ``section,patient`` rows; None → naming rule."""
    if not text:
        return None
    path = Path(text)
    pairs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.replace("\t", ",").split(",")]
            if len(cells) >= 2 and cells[0] and not line.startswith("#") and cells[0].lower() != "section":
                pairs.append((cells[0], cells[1]))
    else:
        for item in text.split(","):
            if "=" not in item:
                raise ValueError(f"--groups: {item!r} is not SECTION=PATIENT (e.g. B4=B,C2=C) and no such file exists")
            a, b = (x.strip() for x in item.split("=", 1))
            pairs.append((a, b))
    if not pairs:
        raise ValueError(f"--groups {text}: no SECTION,PATIENT pair found")
    return dict(pairs)


# ----------------------------------------------------------------------------- features

FEATURE_TOKENS = {  # name in a ridge feature spec → (encoder, view, how the view's V copies combine)
    "lite0": ("efficientnet_lite0", "base", "first"),
    "lite1": ("efficientnet_lite1", "base", "first"),
    "lite2": ("efficientnet_lite2", "base", "first"),
    "d8": ("efficientnet_lite0", "dihedral", "mean"),       # Lite0, averaged over the 8 flips/rotations
    "ctx": ("efficientnet_lite0", "context", "first"),      # Lite0 on the 3× field around the spot
}


def views_needed(methods: list[str]) -> set[tuple[str, str]]:
    """(encoder, view) pairs the methods read beyond the base Lite0 features."""
    need = set()
    for m in methods:
        spec = METHODS[m]
        for token in spec.features:
            if token in FEATURE_TOKENS and token != "lite0":
                need.add(FEATURE_TOKENS[token][:2])
        need |= set(spec.views)
        if spec.tokens_from:
            need.add(tuple(spec.tokens_from.split("/")))
    return need


def attach_views(prepared: list[Prepared], sections, needed, *, tile_um: float, cache_dir: Path,
                 encoder_weights=None) -> None:
    """Load (computing once) the views ``needed`` into each ``Prepared.views``."""
    from core.training.features import section_views

    by_name = {s.name: s for s in sections}
    for encoder, view in sorted(needed):
        tokens = view in ("dihedral", "stain") or any(METHODS[m].tokens_from == f"{encoder}/{view}" for m in METHODS)
        data = section_views([by_name[p.name] for p in prepared], view, encoder=encoder, tile_um=tile_um,
                             cache_dir=cache_dir, encoder_weights=encoder_weights, keep_tokens=tokens)
        for p, d in zip(prepared, data):
            if d["pooled"].shape[1] != len(p.y):
                raise ValueError(f"{p.name}: view {encoder}/{view} has {d['pooled'].shape[1]} spots, targets {len(p.y)}")
            p.views[f"{encoder}/{view}"] = d


def neighbour_mean(x: np.ndarray, xy: np.ndarray | None) -> np.ndarray:
    """Mean of each spot's grid neighbours' rows of ``x`` (within 1.5 × the median nearest-spot
    distance: the 8 around it on a square ST grid, 6 on Visium's); a spot with none keeps its own."""
    if xy is None or len(xy) < 2:
        return x.copy()
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    radius = 1.5 * float(np.median(d[:, 1]))
    out = x.copy()
    for i, nb in enumerate(tree.query_ball_point(xy, r=radius)):
        nb = [j for j in nb if j != i]
        if nb:
            out[i] = x[nb].mean(axis=0)
    return out


def feature_matrix(p: Prepared, tokens: tuple[str, ...]) -> np.ndarray:
    """A ridge input: the feature blocks named in ``tokens`` side by side; ``nbr`` appends the
    grid-neighbour mean of the blocks before it (spot-neighbourhood context)."""
    blocks = []
    for t in tokens:
        if t == "nbr":
            blocks.append(neighbour_mean(np.concatenate(blocks, axis=1), p.xy))
            continue
        encoder, view, how = FEATURE_TOKENS[t]
        if t == "lite0":
            blocks.append(p.pooled.astype(np.float32))
            continue
        v = p.views[f"{encoder}/{view}"]["pooled"]
        blocks.append((v.mean(axis=0) if how == "mean" else v[0]).astype(np.float32))
    return np.concatenate(blocks, axis=1)


# ----------------------------------------------------------------------------- ridge

def _pca_ridge_path(x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, alphas, n_pca: int = 256) -> np.ndarray:
    """Predictions [len(alphas), n_eval, G] of standardise → PCA(n_pca) → ridge (with intercept)
    fitted on (x, y), for every alpha at once (closed form on the PCA scores: the scores' columns
    are orthogonal, so ridge shrinks each by s²/(s²+α)). Equal to scikit-learn's
    StandardScaler + PCA + Ridge pipeline (``tests/unit/test_loso_harness.py``)."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xs, xe = (x - mu) / sd, (x_eval - mu) / sd
    centre = xs.mean(axis=0)     # ~0 already; PCA centres again
    u, s, vt = np.linalg.svd(xs - centre, full_matrices=False)
    k = min(n_pca, len(x) - 1, x.shape[1])
    u, s, vt = u[:, :k], s[:k], vt[:k]
    ym = y.mean(axis=0)
    uty = u.T @ (y - ym)                                   # [k, G]
    ze = (xe - centre) @ vt.T                              # eval scores [n_eval, k]
    out = []
    for a in alphas:
        # z = u s; ridge on z: beta = (s² + a)⁻¹ s uᵀy
        beta = (s / (s ** 2 + a))[:, None] * uty
        out.append(ze @ beta + ym)
    return np.stack(out).astype(np.float32)


def ridge_linear(x: np.ndarray, y: np.ndarray, alpha: float, n_pca: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The same standardise → PCA → ridge fit as :func:`_pca_ridge_path`, collapsed into one
    affine map: ``x @ W + b`` (W [C, G], b [G]) — shippable as a ``torch.nn.Linear``."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xs = (x - mu) / sd
    centre = xs.mean(axis=0)
    u, s, vt = np.linalg.svd(xs - centre, full_matrices=False)
    k = min(n_pca, len(x) - 1, x.shape[1])
    u, s, vt = u[:, :k], s[:k], vt[:k]
    ym = y.mean(axis=0)
    beta = (s / (s ** 2 + alpha))[:, None] * (u.T @ (y - ym))
    m = vt.T @ beta                                        # [C, G] on standardised, centred inputs
    w = m / sd[:, None]
    b = ym - (mu / sd + centre) @ m
    return w.astype(np.float32), b.astype(np.float32)


def probe_fit(train: list[Prepared], *, alphas=ALPHAS, n_pca: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    """The release linear probe on pooled features: α by :func:`inner_folds` (as in every fold of
    the table), then (W, b) on all of ``train``."""
    _, info = ridge_fit_predict(train, train[:1], ("lite0",), alphas=alphas, n_pca=n_pca)
    x = np.concatenate([p.pooled for p in train]).astype(np.float32)
    y = np.concatenate([p.y for p in train])
    w, b = ridge_linear(x, y, info["alpha"], n_pca)
    return w, b, info


def inner_folds(train: list[Prepared], n_blocks: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner validation splits of the concatenated training spots (index arrays): leave one training
    section out when there are two or more; else ``n_blocks`` spatial stripes of the one section (by
    x, so neighbouring spots do not straddle the split more than at the stripe edges)."""
    offsets = np.cumsum([0] + [len(p.y) for p in train])
    n = offsets[-1]
    if len(train) >= 2:
        return [(np.r_[0:offsets[i], offsets[i + 1]:n], np.arange(offsets[i], offsets[i + 1])) for i in range(len(train))]
    p = train[0]
    order = np.argsort(p.xy[:, 0] if p.xy is not None else np.arange(len(p.y)), kind="stable")
    return [(np.setdiff1d(np.arange(n), b), np.sort(b)) for b in np.array_split(order, n_blocks)]


def ridge_fit_predict(train: list[Prepared], tests: list[Prepared], tokens=("lite0",), *, alphas=ALPHAS,
                      n_pca: int = 256, extra=None) -> tuple[list[np.ndarray], dict]:
    """PCA-256 + ridge on ``feature_matrix(tokens)`` (``extra(p)`` columns appended when given);
    α chosen by the mean per-gene PCC over :func:`inner_folds` of the training sections."""
    from models.evaluate import per_gene_pearson

    def feats(p):
        f = feature_matrix(p, tokens)
        return f if extra is None else np.concatenate([f, extra(p)], axis=1)

    x = np.concatenate([feats(p) for p in train])
    y = np.concatenate([p.y for p in train])
    scores = np.zeros(len(alphas))
    folds = inner_folds(train)
    for tr, va in folds:
        preds = _pca_ridge_path(x[tr], y[tr], x[va], alphas, n_pca)
        scores += [np.nanmean(per_gene_pearson(pr, y[va])) for pr in preds]
    best = int(np.argmax(scores))
    xt = [feats(t) for t in tests]
    pred = _pca_ridge_path(x, y, np.concatenate(xt), [alphas[best]], n_pca)[0]
    cuts = np.cumsum([len(t) for t in xt])[:-1]
    return np.split(pred, cuts), {"alpha": alphas[best], "inner": "sections" if len(train) >= 2 else "spatial stripes",
                                  "inner_scores": {f"{a:g}": round(float(v / len(folds)), 4) for a, v in zip(alphas, scores)}}


def ridge_predict(train: list[Prepared], test: Prepared, *, n_pca: int = 256) -> tuple[np.ndarray, float]:
    """Ridge on pooled Lite0 features for one test section: (prediction, chosen α)."""
    preds, info = ridge_fit_predict(train, [test], n_pca=n_pca)
    return preds[0], info["alpha"]


# ----------------------------------------------------------------------------- fusion

def fusion_fit(train: list[Prepared], profiles: np.ndarray, *, compositions: list[np.ndarray] | None = None,
               epochs: int = 30, seed: int = 0, view: str | None = None):
    """A :class:`models.fusion.FusionHead` fitted on cached tokens; with ``compositions`` (one per
    training section) the head takes them as input instead of learning a composition. With
    ``view`` (``"encoder/view"`` keys of ``Prepared.views``, '+'-joined) every sample of every
    epoch is drawn from one of its base or augmented views at random (augmentation on cached
    features: each view is encoded once)."""
    import torch

    from models.fusion import FusionConfig, FusionHead
    from models.train import fit_fusion

    torch.manual_seed(seed)
    if view:
        stacks = []
        for p in train:
            v = [p.tokens[None]] + [p.views[k]["tokens"] for k in view.split("+")]
            stacks.append(np.concatenate(v))
        x = torch.from_numpy(np.concatenate(stacks, axis=1))     # [V, N, T, C]
    else:
        x = torch.from_numpy(np.concatenate([p.tokens for p in train]))
    y = torch.from_numpy(np.concatenate([p.y for p in train]))
    comp = None if compositions is None else torch.from_numpy(np.concatenate(compositions))
    head = FusionHead(FusionConfig(in_dim=x.shape[-1], n_tokens=x.shape[-2], n_genes=y.shape[1],
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


# ----------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    """A row of the table. ``kind``: ridge (deterministic: one run), fusion / cnn (seeded), prior."""

    description: str
    kind: str
    features: tuple[str, ...] = ()
    views: tuple[tuple[str, str], ...] = ()
    # the engine can run it as it runs models: one encoder, one forward pass per tile (no neighbouring
    # spots, no 3× field, no test-time views, no second encoder, no head beyond the checkpoint's)
    shippable: bool = True
    tokens_from: str | None = None   # fusion on another encoder's tokens ("encoder/view"), not base Lite0

    @property
    def seeded(self) -> bool:
        return self.kind in ("fusion", "fusion_nuclei", "cnn", "prior", "ridge_prior", "joint_knn")


METHODS: dict[str, Method] = {
    "ridge": Method("PCA-256 + ridge on frozen EfficientNet-Lite0 features (HEST-Benchmark linear probe; "
                    "α ∈ 10¹–10⁷ by inner CV on the training sections)", "ridge", ("lite0",)),
    "ridge_d8": Method("ridge on Lite0 features averaged over the 8 flips/rotations", "ridge", ("d8",),
                       shippable=False),
    "ridge_lite1": Method("ridge on EfficientNet-Lite1 features (240 px)", "ridge", ("lite1",)),
    "ridge_lite2": Method("ridge on EfficientNet-Lite2 features (260 px)", "ridge", ("lite2",)),
    "ridge_ens": Method("ridge on Lite0 + Lite1 + Lite2 features side by side (encoder ensemble)", "ridge",
                        ("lite0", "lite1", "lite2"), shippable=False),
    "ridge_ctx": Method("ridge on Lite0 features of the spot + of the 3× field around it (context)", "ridge",
                        ("lite0", "ctx"), shippable=False),
    "ridge_nbr": Method("ridge on Lite0 features of the spot + the mean of its grid neighbours", "ridge",
                        ("lite0", "nbr"), shippable=False),
    "ridge_lite2_nbr": Method("ridge on Lite2 features of the spot + the mean of its grid neighbours", "ridge",
                              ("lite2", "nbr"), shippable=False),
    "ridge_prior": Method("ridge on Lite0 features + the fusion model's reference prior (composition × "
                          "profiles) as inputs", "ridge_prior", ("lite0",), shippable=False),
    "prior": Method("reference prior alone, composition learned by the fusion model", "prior"),
    "prior_nuclei": Method("reference prior alone, nuclei-derived composition (no training)", "prior_nuclei"),
    "full": Method("SciSt-style fusion model, learned composition (the shipped architecture)", "fusion"),
    "full_aug": Method("fusion model trained on dihedral + stain-jittered views of every spot, predictions "
                       "averaged over those 13 views", "fusion",
                       views=(("efficientnet_lite0", "dihedral"), ("efficientnet_lite0", "stain")), shippable=False),
    "full_lite2": Method("fusion model on EfficientNet-Lite2 feature-map tokens (260 px, 81 tokens)", "fusion",
                         tokens_from="efficientnet_lite2/base"),
    "full_nuclei": Method("fusion model, nuclei-derived composition as input", "fusion_nuclei"),
    "cnn": Method("end-to-end CNN regressor (ST-Net-like, EfficientNet-Lite0 fine-tuned, 112 px)", "cnn"),
    "joint_knn": Method("BLEEP-style retrieval: mean measured profile of the 50 training spots nearest in the "
                        "joint image ↔ expression space (contrastive projections of Lite0 features)", "joint_knn",
                        shippable=False),
}
DEFAULT_METHODS = ["ridge", "ridge_d8", "ridge_lite1", "ridge_lite2", "ridge_ens", "ridge_ctx", "ridge_nbr",
                   "ridge_lite2_nbr", "ridge_prior", "prior", "prior_nuclei", "full", "full_aug", "full_lite2"]


def _predict_fold(train, tests, methods, profiles, seed, *, epochs, cnn_epochs, encoder, nuclei, timing):
    """{method: (per-test predictions, info)} of one seed on one fold."""
    preds, cache = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t
        return out

    def full_head():
        if "full" not in cache:
            cache["full"] = timed("full", lambda: fusion_fit(train, profiles, epochs=epochs, seed=seed))
        return cache["full"]

    for m in methods:
        spec = METHODS[m]
        if spec.kind == "ridge":
            preds[m] = timed(m, lambda: ridge_fit_predict(train, tests, spec.features))
        elif spec.kind in ("fusion", "prior"):
            if spec.kind == "fusion" and spec.tokens_from:
                tf = spec.tokens_from
                swap = lambda p: Prepared(p.name, p.pooled, p.views[tf]["tokens"][0], p.y)   # noqa: E731
                head = timed(m, lambda: fusion_fit([swap(p) for p in train], profiles, epochs=epochs, seed=seed))
                preds[m] = ([fusion_predict(head, swap(t))[0] for t in tests], {})
            elif spec.kind == "fusion" and spec.views:
                key = "+".join(f"{e}/{v}" for e, v in spec.views)
                head = timed(m, lambda: fusion_fit(train, profiles, epochs=epochs, seed=seed, view=key))
                preds[m] = ([_tta_predict(head, t, key) for t in tests], {})
            else:
                head = full_head()
                out = [fusion_predict(head, t) for t in tests]
                preds[m] = ([o[0] if spec.kind == "fusion" else o[1] for o in out], {})
        elif spec.kind == "ridge_prior":
            head = full_head()
            priors = {id(p): fusion_predict(head, p)[1] for p in [*train, *tests]}
            preds[m] = timed(m, lambda: ridge_fit_predict(train, tests, spec.features,
                                                           extra=lambda p: priors[id(p)]))
        elif spec.kind == "prior_nuclei":
            preds[m] = ([nuclei[t.name] @ profiles for t in tests], {})
        elif spec.kind == "fusion_nuclei":
            head = timed(m, lambda: fusion_fit(train, profiles, compositions=[nuclei[p.name] for p in train],
                                               epochs=epochs, seed=seed))
            preds[m] = ([fusion_predict(head, t, nuclei[t.name])[0] for t in tests], {})
        elif spec.kind == "joint_knn":
            from core.training.joint import joint_fit, knn_predict

            y_train = np.concatenate([p.y for p in train])
            space = timed(m, lambda: joint_fit(np.concatenate([p.tokens for p in train]), y_train, seed=seed))
            preds[m] = ([knn_predict(space, y_train, t.tokens) for t in tests], {})
        elif spec.kind == "cnn":
            preds[m] = ([timed(m, lambda t=t: cnn_predict(train, t, encoder=encoder, epochs=cnn_epochs, seed=seed))
                         for t in tests], {})
    return preds


def _tta_predict(head, test: Prepared, view_key: str) -> np.ndarray:
    """Mean expression over the base view and every augmented view of the test spots."""
    outs = [fusion_predict(head, test)[0]]
    for k in view_key.split("+"):
        for tokens in test.views[k]["tokens"]:
            outs.append(fusion_predict(head, Prepared(test.name, test.pooled, tokens, test.y))[0])
    return np.mean(outs, axis=0)


# ----------------------------------------------------------------------------- statistics

def folds_for(prepared: list[Prepared], scheme: str) -> dict[str, tuple[list[Prepared], list[Prepared]]]:
    """{fold name: (train, tests)}: one fold per patient (``patient``) or per section (``section``)."""
    if scheme == "section":
        return {p.name: ([q for q in prepared if q is not p], [p]) for p in prepared}
    if scheme != "patient":
        raise ValueError(f"unknown fold scheme {scheme!r}; one of {', '.join(SCHEMES)}")
    patients = list(dict.fromkeys(p.patient or p.name for p in prepared))
    return {pt: ([q for q in prepared if (q.patient or q.name) != pt], [q for q in prepared if (q.patient or q.name) == pt])
            for pt in patients}


def bootstrap_indices(tests: list[Prepared], n_boot: int, seed: int) -> list[np.ndarray]:
    """Per test section, [n_boot, n_spots] spot resamples (with replacement); the same for every method."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, len(t.y), size=(n_boot, len(t.y))) for t in tests]


def _boot_mean_pcc(pred: np.ndarray, y: np.ndarray, idx: np.ndarray, genes_idx: np.ndarray) -> np.ndarray:
    """Mean PCC over ``genes_idx`` for each resample of spots ([n_boot])."""
    from models.evaluate import per_gene_pearson

    return np.array([np.nanmean(per_gene_pearson(pred[i][:, genes_idx], y[i][:, genes_idx])) for i in idx])


def hvg_indices(train: list[Prepared], k: int = 50) -> np.ndarray:
    """The ``k`` genes most variable over the training spots (HEST-Benchmark's choice, made on training data)."""
    var = np.concatenate([p.y for p in train]).var(axis=0)
    return np.sort(np.argsort(-var, kind="stable")[:k])


def wilcoxon_vs(r_method: np.ndarray, r_ref: np.ndarray) -> dict:
    """Paired per-gene comparison (two-sided Wilcoxon signed-rank, scipy; NaN genes dropped)."""
    from scipy.stats import wilcoxon

    ok = np.isfinite(r_method) & np.isfinite(r_ref)
    d = r_method[ok] - r_ref[ok]
    if len(d) < 2 or not np.any(d):
        return {"n_genes": int(len(d)), "median_diff": 0.0, "n_better": 0, "p": 1.0}
    return {"n_genes": int(len(d)), "median_diff": float(np.median(d)), "n_better": int((d > 0).sum()),
            "p": float(wilcoxon(d).pvalue)}


def run_loso(prepared: list[Prepared], profiles: np.ndarray | None, genes: list[str], *, reference_types: list[str] | None = None,
             type_shares: dict | None = None, nuclei_mapping: dict | None = None, epochs: int = 30, cnn_epochs: int = 4,
             seed: int = 0, n_seeds: int = 3, encoder: str = "efficientnet_lite0", methods: list[str] | None = None,
             schemes=SCHEMES, gene_sets: dict[str, list[str]] | None = None, n_boot: int = N_BOOT,
             scheme_methods: dict[str, list[str]] | None = None, scheme_seeds: dict[str, int] | None = None) -> dict:
    """Every method on every fold of every scheme (see the module docstring); returns the report
    ``{"format", "genes", "groups", "methods", "gene_sets", "schemes": {scheme: {"folds", "table"}},
    "headline", "settings"}``. Methods that need the reference are left out (with a note) when
    ``profiles`` is None. ``scheme_methods`` / ``scheme_seeds`` restrict a scheme to fewer rows or
    seeds (a CPU budget; the report records what ran)."""
    from models.evaluate import per_gene_pearson

    methods = list(methods or DEFAULT_METHODS)
    notes = []
    if profiles is None:
        dropped = [m for m in methods if METHODS[m].kind not in ("ridge", "cnn")]
        methods = [m for m in methods if m not in dropped]
        if dropped:
            notes.append(f"no reference covers these genes: {', '.join(dropped)} left out")
    if "ridge" not in methods:
        methods = ["ridge", *methods]      # the paired comparisons are against ridge
    nuclei = {p.name: nuclei_composition(p, reference_types, type_shares, nuclei_mapping) for p in prepared} \
        if {"prior_nuclei", "full_nuclei"} & set(methods) else {}
    named = {name: np.array([genes.index(g) for g in gs if g in genes]) for name, gs in (gene_sets or {}).items()}
    patients = {p.name: p.patient or p.name for p in prepared}
    if "patient" in schemes and len(set(patients.values())) < 2:
        notes.append("one patient only: no per-patient folds")
        schemes = [s for s in schemes if s != "patient"]
    out_schemes = {}
    all_methods = methods
    for scheme in schemes:
        methods = [m for m in all_methods if m in (scheme_methods or {}).get(scheme, all_methods) or m == "ridge"]
        n_seeds_here = (scheme_seeds or {}).get(scheme, n_seeds)
        folds, boot_by_fold, gene_r = {}, {}, {}
        for fold, (train, tests) in folds_for(prepared, scheme).items():
            started, timing = time.perf_counter(), {}
            hvg = hvg_indices(train)
            idx = bootstrap_indices(tests, n_boot, seed)
            runs = {}   # method → list over seeds of (per-test preds, info)
            for s in range(n_seeds_here):
                needed = [m for m in methods if s == 0 or METHODS[m].seeded]
                for m, res in _predict_fold(train, tests, needed, profiles, seed + s, epochs=epochs, cnn_epochs=cnn_epochs,
                                            encoder=encoder, nuclei=nuclei, timing=timing).items():
                    runs.setdefault(m, []).append(res)
            fold_out = {"train_sections": [p.name for p in train], "test_sections": [t.name for t in tests],
                        "n_spots": int(sum(len(t.y) for t in tests)), "methods": {}}
            for m in methods:
                per_seed_r = [np.stack([per_gene_pearson(pr, t.y) for pr, t in zip(preds, tests)]) for preds, _ in runs[m]]
                r = np.mean(per_seed_r, axis=0)                     # [n_tests, G], mean over seeds
                seed_means = [float(np.mean(np.nanmean(x, axis=1))) for x in per_seed_r]
                boot = np.mean([np.mean([_boot_mean_pcc(pr, t.y, ix, np.arange(len(genes)))
                                         for pr, t, ix in zip(preds, tests, idx)], axis=0) for preds, _ in runs[m]], axis=0)
                gene_mean = np.nanmean(r, axis=0) if len(tests) > 1 else r[0]
                row = {"mean_pcc": float(np.mean(seed_means)), "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
                       "seeds": len(seed_means), "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                       "median_pcc": float(np.nanmedian(gene_mean)), "hvg50_pcc": float(np.nanmean(r[:, hvg])),
                       "per_section": {t.name: float(np.nanmean(r[i])) for i, t in enumerate(tests)},
                       "train_s": round(timing.get(m, 0.0) / max(len(seed_means), 1), 2),
                       "per_gene": {g: (None if not np.isfinite(v) else round(float(v), 4)) for g, v in zip(genes, gene_mean)}}
                for name, gi in named.items():
                    row[f"{name}_pcc"] = float(np.nanmean(r[:, gi])) if len(gi) else None
                info = [i for _, i in runs[m] if i]
                if info:
                    row["alpha"] = info[0].get("alpha")
                    row["inner"] = info[0].get("inner")
                    row["inner_scores"] = info[0].get("inner_scores")
                fold_out["methods"][m] = row
                boot_by_fold.setdefault(m, []).append(boot)
                gene_r.setdefault(m, []).append(gene_mean)
                fold_out["methods"][m]["_seed_means"] = seed_means
            for m in methods:
                fold_out["methods"][m]["vs_ridge"] = wilcoxon_vs(gene_r[m][-1], gene_r["ridge"][-1])
            folds[fold] = fold_out
            log.info("%s fold %s (%.0f s): %s", scheme, fold, time.perf_counter() - started,
                     {m: round(v["mean_pcc"], 3) for m, v in fold_out["methods"].items()})
        table = {}
        for m in methods:
            rows = [f["methods"][m] for f in folds.values()]
            seed_means = np.mean([r.pop("_seed_means") for r in rows], axis=0)   # per seed, mean over folds
            boot = np.mean(boot_by_fold[m], axis=0)
            r_gene = np.nanmean(np.stack(gene_r[m]), axis=0)
            table[m] = {"mean_pcc": float(np.mean(seed_means)),
                        "sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
                        "seeds": int(len(seed_means)),
                        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                        "median_pcc": float(np.nanmedian(r_gene)),
                        "hvg50_pcc": float(np.mean([r["hvg50_pcc"] for r in rows])),
                        **{f"{n}_pcc": (float(np.mean([r[f"{n}_pcc"] for r in rows])) if len(gi) else None)
                           for n, gi in named.items()},
                        "vs_ridge": wilcoxon_vs(r_gene, np.nanmean(np.stack(gene_r["ridge"]), axis=0)),
                        "train_s": round(float(np.mean([r["train_s"] for r in rows])), 2),
                        "alpha": [r.get("alpha") for r in rows] if METHODS[m].kind.startswith("ridge") else None}
        out_schemes[scheme] = {"folds": folds, "table": table, "seeds": n_seeds_here}
    return {"format": REPORT_FORMAT, "genes": genes, "groups": patients,
            "methods": {m: {"description": METHODS[m].description, "shippable": METHODS[m].shippable,
                            "seeded": METHODS[m].seeded} for m in all_methods},
            "gene_sets": {"panel": len(genes), "hvg50": 50, **{n: int(len(gi)) for n, gi in named.items()}},
            "schemes": out_schemes, "headline": "patient" if "patient" in out_schemes else "section", "notes": notes,
            "settings": {"epochs": epochs, "cnn_epochs": cnn_epochs, "seed": seed, "n_seeds": n_seeds, "encoder": encoder,
                         "alphas": list(ALPHAS), "n_boot": n_boot}}


def best_row(report: dict, *, shippable: bool = True) -> str:
    """The headline scheme's best method by mean PCC over the panel (only engine-runnable ones)."""
    table = report["schemes"][report["headline"]]["table"]
    rows = [m for m in table if not shippable or (m in METHODS and METHODS[m].shippable)]
    return max(rows, key=lambda m: table[m]["mean_pcc"])


def format_table(report: dict, scheme: str | None = None) -> str:
    """One scheme's table as Markdown (default: every scheme, headline first)."""
    schemes = [scheme] if scheme else sorted(report["schemes"], key=lambda s: s != report["headline"])
    blocks = []
    for sc in schemes:
        data = report["schemes"][sc]
        folds = list(data["folds"])
        extra = [k for k in report["gene_sets"] if k not in ("panel", "hvg50")]
        head = ["method", "mean PCC ± sd (seeds)", "95 % CI", "median", "HVG-50 (train)", *[f"{k}" for k in extra],
                "vs ridge: Δ median, genes better, p", "fit s", *folds]
        lines = [f"**{'per patient' if sc == 'patient' else 'per section'}** ({len(folds)} folds: "
                 + "; ".join(f"test {f} = {', '.join(v['test_sections'])}" for f, v in data["folds"].items()) + ")",
                 "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for m, row in data["table"].items():
            vs = row["vs_ridge"]
            cells = [m, f"{row['mean_pcc']:.3f} ± {row['sd']:.3f} ({row['seeds']})",
                     f"{row['ci95'][0]:.3f}–{row['ci95'][1]:.3f}", f"{row['median_pcc']:.3f}", f"{row['hvg50_pcc']:.3f}",
                     *[("—" if row.get(f"{k}_pcc") is None else f"{row[f'{k}_pcc']:.3f}") for k in extra],
                     "—" if m == "ridge" else f"{vs['median_diff']:+.3f}, {vs['n_better']}/{vs['n_genes']}, " + (f"p={vs['p']:.2g}" if vs['p'] > 0 else 'p<1e-300'),
                     f"{row['train_s']:.0f}",
                     *[f"{data['folds'][f]['methods'][m]['mean_pcc']:.3f}" for f in folds]]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def with_targets(prepared: list[Prepared], sections, genes: list[str]) -> list[Prepared]:
    """The same spots and features with targets over another gene list (a published protocol's)."""
    from dataclasses import replace

    from core.training.stdata import targets

    by_name = {s.name: s for s in sections}
    return [replace(p, y=targets(by_name[p.name], genes)[p.keep]) for p in prepared]


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
