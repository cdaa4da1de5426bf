"""Nucleus classes and per-patch cell composition: features → classes → fractions → weights.

The second half of :mod:`core.wsi.nuclei`: a nucleus classifier (transparent rules or a small fitted
model) over the features of :func:`core.wsi.nuclei.segment_nuclei`, training labels from annotated
cell centres, the class fractions of each patch, and their mapping onto a reference's cell types.
Patches are uint8 RGB ``(H, W, 3)``; ``mpp`` is µm per patch pixel.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from core.wsi.nuclei import CLASSES, FEATURES, segment_nuclei

log = logging.getLogger(__name__)

# --- classes ------------------------------------------------------------------------------
# Rule thresholds from nuclear sizes in breast H&E (lymphocyte ≈ 5–7 µm, plasma cell ≈ 7–8 µm,
# carcinoma nuclei ≥ 1.5× a lymphocyte, fibroblast / endothelial nuclei spindle-shaped, ≤ 5 µm
# wide); masks run ≈ 1 µm wider than the nucleus (blur), hence the margins. Checked, not fitted,
# on the synthetic world. First match wins, in this order:
_RULE_MIN_AREA_UM2 = 16.0  # other: a fragment (the smallest lymphocyte nucleus is ≈ 4.5 µm across)
_RULE_PALE_REL = 0.6       # other: < 0.6× the patch's median nuclear H is cytoplasm or stroma
_RULE_SPINDLE = 0.88, 6.5  # connective: eccentricity ≥ 0.88 (axis ratio ≤ 0.47) and minor ≤ 6.5 µm
_RULE_SMALL_UM = 9.5       # inflammatory only up to this ⌀ (a plasma cell + 1 µm halo + 1 µm slack)
_RULE_DARK_REL = 1.2       # inflammatory: condensed chromatin, ≥ 1.2× the patch's median nuclear H
_RULE_ROUND_ECC = 0.85     # inflammatory: round (axis ratio ≥ 0.53), core ratio ≥ 1 (solid)
_RULE_VESICULAR = 0.9      # neoplastic: ⌀ > 9.5 µm, or core/rim H < 0.9 (open chromatin, thick membrane)
_RULE_EVEN_CORE = 1.2      # epithelial: medium, not dark, evenly filled (core/rim ≥ 1.2); else neoplastic
_LOG_FEATURES = ("area_um2", "diameter_um", "major_um", "minor_um", "h_std", "density")


def rule_classes(features: pd.DataFrame) -> np.ndarray:
    """The transparent default: a class index (into :data:`CLASSES`) per nucleus (see _RULE_*)."""
    col = lambda name: features[name].to_numpy()  # noqa: E731
    d, ecc, rel, core = col("diameter_um"), col("eccentricity"), col("h_rel"), col("h_core_ratio")
    conds = [col("area_um2") < _RULE_MIN_AREA_UM2, rel < _RULE_PALE_REL,
             (ecc >= _RULE_SPINDLE[0]) & (col("minor_um") <= _RULE_SPINDLE[1]),
             (d <= _RULE_SMALL_UM) & (rel >= _RULE_DARK_REL) & (ecc < _RULE_ROUND_ECC) & (core >= 1.0),
             (d > _RULE_SMALL_UM) | (core < _RULE_VESICULAR), (rel < _RULE_DARK_REL) & (core >= _RULE_EVEN_CORE)]
    other, conn, infl, neo, epi = 4, 2, 1, 0, 3
    return np.select(conds, [other, other, conn, infl, neo, epi], neo).astype(np.int64)


def _design(features: pd.DataFrame) -> np.ndarray:
    """Model inputs: :data:`FEATURES`, sizes and counts on a log scale (they are right-skewed)."""
    x = features[FEATURES].to_numpy(np.float64).copy()
    for name in _LOG_FEATURES:
        x[:, FEATURES.index(name)] = np.log1p(np.maximum(x[:, FEATURES.index(name)], 0))
    return x


class NucleusClassifier:
    """Nucleus features → :data:`CLASSES`: the rules (``kind='rules'``) or a fitted model.

    A fitted model is a standardiser and dense layers (``'logistic'``: one; ``'mlp'``: one
    hidden ReLU layer) kept as plain numbers: saved as JSON, predicted with numpy alone.
    """

    classes = CLASSES

    def __init__(self, kind: str = "rules", params: dict | None = None):
        if kind not in ("rules", "logistic", "mlp") or (kind != "rules" and not params):
            raise ValueError(f"kind {kind!r}: use 'rules', or fit() a 'logistic' or 'mlp' model")
        self.kind, self.params = kind, params or {}

    def __repr__(self) -> str:
        return f"NucleusClassifier(kind={self.kind!r})"

    def fit(self, features_list, labels_list, *, kind: str = "mlp", hidden: int = 32, seed: int = 0):
        """Fit on per-patch feature tables and their labels (class names or indices); returns self."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        x = _design(pd.concat(list(features_list), ignore_index=True))
        y = np.concatenate([_as_index(lab) for lab in labels_list])
        if len(x) != len(y) or len(np.unique(y)) < 2:
            raise ValueError(f"need one label per nucleus and ≥ 2 classes; got {len(x)} nuclei, {len(y)} labels")
        mean, std = x.mean(axis=0), x.std(axis=0)
        scale = np.where(std > 1e-9, std, 1.0)
        if kind not in ("logistic", "mlp"):
            raise ValueError(f"cannot fit kind {kind!r}: use 'logistic' or 'mlp'")
        model = (LogisticRegression(max_iter=2000) if kind == "logistic" else
                 MLPClassifier((hidden,), alpha=1e-3, learning_rate_init=3e-3, max_iter=500, early_stopping=True,
                               n_iter_no_change=20, random_state=seed)).fit((x - mean) / scale, y)
        layers = ([(model.coef_.T, model.intercept_)] if kind == "logistic"
                  else list(zip(model.coefs_, model.intercepts_)))
        if layers[-1][0].shape[1] == 1:  # binary: sklearn keeps one logit; softmax needs two
            w, b = layers[-1]
            layers[-1] = (np.hstack([-w / 2, w / 2]), np.r_[-b / 2, b / 2])
        self.kind = kind
        self.params = {"mean": mean.tolist(), "scale": scale.tolist(), "classes": model.classes_.tolist(),
                       "layers": [{"w": np.asarray(w).tolist(), "b": np.asarray(b).tolist()} for w, b in layers]}
        log.info("nuclei: fitted a %s classifier on %d nuclei %s", kind, len(y),
                 {CLASSES[c]: int((y == c).sum()) for c in np.unique(y)})
        return self

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Class probabilities ``(n, len(CLASSES))``; one-hot for the rules."""
        out = np.zeros((len(features), len(CLASSES)))
        if len(features) == 0:
            return out
        if self.kind == "rules":
            out[np.arange(len(features)), rule_classes(features)] = 1.0
            return out
        p = self.params
        a = (_design(features) - np.asarray(p["mean"])) / np.asarray(p["scale"])
        for i, layer in enumerate(p["layers"]):
            a = a @ np.asarray(layer["w"]) + np.asarray(layer["b"])
            a = np.maximum(a, 0) if i < len(p["layers"]) - 1 else np.exp(a - a.max(axis=1, keepdims=True))
        out[:, p["classes"]] = a / a.sum(axis=1, keepdims=True)
        return out

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Class index per nucleus (into :data:`CLASSES`)."""
        if self.kind == "rules":
            return rule_classes(features) if len(features) else np.zeros(0, np.int64)
        return self.predict_proba(features).argmax(axis=1)

    def save(self, path) -> None:
        """Write the classifier as JSON (plain numbers, no pickle)."""
        Path(path).write_text(json.dumps({"format": "tessera.nuclei.classifier", "version": 1, "classes": CLASSES,
                                          "features": FEATURES, "kind": self.kind, "params": self.params}))

    @classmethod
    def load(cls, path) -> "NucleusClassifier":
        """Read a classifier written by :meth:`save`; refuses other class or feature lists."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "tessera.nuclei.classifier" or doc.get("classes") != CLASSES \
                or doc.get("features") != FEATURES:
            raise ValueError(f"{path}: not a nucleus classifier for these classes and features")
        return cls(doc["kind"], doc["params"])


def label_nuclei(labels: np.ndarray, features: pd.DataFrame, truth_xy: np.ndarray, truth_classes, *,
                 mpp: float, radius_um: float = 4.0) -> np.ndarray:
    """Training labels from annotated cell centres ``truth_xy`` ``(m, 2)`` (patch px, x, y).

    Each nucleus takes the class of the centre nearest its centroid among those inside its
    mask or within ``radius_um``; a nucleus with none (debris, red cell, fragment) is "other".
    """
    out = np.full(len(features), CLASSES.index("other"), np.int64)
    truth_xy, cls = np.asarray(truth_xy, np.float64).reshape(-1, 2), _as_index(truth_classes)
    if len(features) == 0 or len(truth_xy) == 0:
        return out
    tx = np.clip(truth_xy[:, 0].astype(int), 0, labels.shape[1] - 1)
    ty = np.clip(truth_xy[:, 1].astype(int), 0, labels.shape[0] - 1)
    fx, fy = features["x"].to_numpy()[:, None], features["y"].to_numpy()[:, None]
    d = np.hypot(fx - truth_xy[:, 0], fy - truth_xy[:, 1])
    ok = (d <= radius_um / mpp) | (labels[ty, tx][None, :] == np.arange(1, len(features) + 1)[:, None])
    d = np.where(ok, d, np.inf)
    has = np.isfinite(d.min(axis=1))
    out[has] = cls[d[has].argmin(axis=1)]
    return out


def _as_index(labels) -> np.ndarray:
    """Class names or indices → int64 indices into :data:`CLASSES`."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    lookup = {c: i for i, c in enumerate(CLASSES)}
    unknown = sorted({str(v) for v in arr} - set(lookup))
    if unknown:
        raise ValueError(f"unknown nucleus classes {unknown}; expected some of {CLASSES}")
    return np.array([lookup[str(v)] for v in arr], np.int64)


# --- composition ----------------------------------------------------------------------------
_RULES = NucleusClassifier()


def _counts(patches, mpp: float, classifier: NucleusClassifier | None) -> np.ndarray:
    """Nuclei per class ``(N, len(CLASSES))`` of a sequence of patches."""
    out = np.zeros((len(patches), len(CLASSES)), np.int64)
    for i, rgb in enumerate(patches):
        out[i] = np.bincount((classifier or _RULES).predict(segment_nuclei(rgb, mpp=mpp)[1]), minlength=len(CLASSES))
    return out


def _fractions(counts: np.ndarray) -> np.ndarray:
    """Rows of counts → rows of fractions; an all-zero row → uniform."""
    total = counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1), 1.0 / counts.shape[1])


def composition(rgb: np.ndarray, *, mpp: float, classifier: NucleusClassifier | None = None,
                return_count: bool = False):
    """Class fractions ``(len(CLASSES),)`` (sum 1) of one patch's nuclei at ``mpp`` µm/px.

    No nuclei → uniform; ``return_count=True`` returns ``(fractions, n_nuclei)`` so a caller can
    tell that fallback (0 nuclei) from an estimate. ``classifier=None`` uses the rules.
    """
    counts = _counts([rgb], mpp, classifier)
    return (_fractions(counts)[0], int(counts.sum())) if return_count else _fractions(counts)[0]


def nucleus_counts(rgb: np.ndarray, *, mpp: float, classifier: NucleusClassifier | None = None) -> np.ndarray:
    """Nuclei per class (``len(CLASSES)`` int16) in one tile at ``mpp`` µm/px (the engine's
    ``--nuclei`` counts, computed in its loader workers)."""
    return _counts([rgb], mpp, classifier)[0].astype(np.int16)


def compositions(patches, *, mpp: float, classifier: NucleusClassifier | None = None, workers: int = 1,
                 chunk: int = 32, return_counts: bool = False):
    """Class fractions ``(N, len(CLASSES))`` of many patches (``(N, H, W, 3)`` array or a list).

    ``workers > 1`` spreads chunks of ``chunk`` patches over a process pool. Rows without
    nuclei are uniform (logged); ``return_counts=True`` also returns the per-class nucleus
    counts ``(N, len(CLASSES))``, whose zero rows mark that fallback.
    """
    jobs = [patches[i:i + chunk] for i in range(0, len(patches), chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork is fast but unsafe once threads exist (e.g. inside Streamlit): spawn there
        method = "fork" if threading.active_count() == 1 and os.name == "posix" else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            parts = list(pool.map(_counts, jobs, [mpp] * len(jobs), [classifier] * len(jobs)))
    else:
        parts = [_counts(job, mpp, classifier) for job in jobs]
    counts = np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)), np.int64)
    if (empty := int((counts.sum(axis=1) == 0).sum())):
        log.info("nuclei: %d of %d patches without nuclei got the uniform composition", empty, len(counts))
    return (_fractions(counts), counts) if return_counts else _fractions(counts)


# --- class fractions → reference cell types -------------------------------------------------
# "other" maps to nothing: its share is dropped and the rest renormalised.
XENIUM_BREAST_MAPPING = {
    "neoplastic": ["Malignant"], "inflammatory": ["T", "B", "Plasma", "Macrophage", "Myeloid"],
    "connective": ["Fibroblast", "Endothelial"], "epithelial": ["Epithelial"],
}
SYNTH_MAPPING = {  # core.synth.reference.CELL_TYPES
    "neoplastic": ["malignant_epithelial", "cycling_malignant"], "inflammatory": ["t_cell", "b_plasma", "macrophage"],
    "connective": ["fibroblast", "endothelial"], "epithelial": ["normal_epithelial"],
}


def map_to_reference(fractions: np.ndarray, class_names, reference_types, mapping: dict | None = None, *,
                     priors: dict | None = None, empty: np.ndarray | None = None) -> np.ndarray:
    """Class fractions ``(N, C)`` or ``(C,)`` → weights over ``reference_types`` (rows sum 1).

    Each class's share is split over the types ``mapping[class]`` lists (default
    :data:`XENIUM_BREAST_MAPPING`) — evenly, or in proportion to ``priors[type]`` (e.g. each
    type's share of the reference; then every type of a class split in two or more must have
    one). Unmapped classes are dropped and the rest renormalised. Rows flagged in ``empty``
    (patches without nuclei: zero rows of the counts of :func:`compositions`) and rows left
    with no weight are uniform over the reference types — SciSt's no-cell fallback.
    """
    mapping = XENIUM_BREAST_MAPPING if mapping is None else mapping
    frac = np.atleast_2d(np.asarray(fractions, np.float64))
    class_names, reference_types = list(class_names), list(reference_types)
    if frac.shape[1] != len(class_names):
        raise ValueError(f"fractions have {frac.shape[1]} columns but there are {len(class_names)} class names")
    split = np.zeros((len(class_names), len(reference_types)))
    for i, name in enumerate(class_names):
        targets = [t for t in mapping.get(name, []) if t in reference_types]
        if priors is not None and len(targets) > 1 and not set(targets) <= set(priors):
            raise ValueError(f"priors lack {sorted(set(targets) - set(priors))} (class {name!r})")
        w = np.array([max(float((priors or {}).get(t, 1.0)), 0.0) for t in targets])
        if targets and w.sum() > 0:
            split[i, [reference_types.index(t) for t in targets]] = w / w.sum()
    weights = frac @ split
    total = weights.sum(axis=1, keepdims=True)
    flat = (total <= 0) | (np.zeros_like(total, bool) if empty is None else np.reshape(empty, (-1, 1)))
    out = np.where(flat, 1.0 / len(reference_types), weights / np.where(total > 0, total, 1.0))
    return out[0] if np.ndim(fractions) == 1 else out
