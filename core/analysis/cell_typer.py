"""A learned per-nucleus typer (GHIST's cell-type head, in small): nucleus morphology, its
nucleus-class probabilities and the tile's predicted composition → a posterior over the
reference's cell types.

It is a standardiser and a one-hidden-layer MLP (scikit-learn to fit, numpy to predict, JSON on
disk: ``<model>/cell_typer.json``, no pickle), trained on cells whose types are known (the demo
world's ST sections; on real data, a Xenium section with H&E). The engine uses it in place of the
rule posterior of :func:`core.analysis.cells.type_posterior` when the model's folder holds one;
a cells run's key records which typer made it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
FORMAT = "tessera.cell_typer"


def design(records: np.ndarray, composition: np.ndarray) -> np.ndarray:
    """Inputs ``(n, D)``: morphology (sizes on a log scale), class probabilities and log π."""
    from core.wsi.cells import MORPHOLOGY, class_probs, field

    morph = np.stack([field(records, m) for m in MORPHOLOGY], axis=1).astype(np.float64)
    for i, name in enumerate(MORPHOLOGY):
        if name in ("area_um2", "major_um", "minor_um", "density"):
            morph[:, i] = np.log1p(np.maximum(morph[:, i], 0))
    prior = np.log(np.maximum(np.atleast_2d(composition), 1e-4))
    prior = np.broadcast_to(prior, (len(records), prior.shape[1]))
    return np.hstack([morph, class_probs(records), prior])


class CellTyper:
    """Posterior over ``cell_types`` from :func:`design` inputs; see the module docstring."""

    name = "learned"

    def __init__(self, cell_types: list[str], params: dict):
        self.cell_types, self.params = list(cell_types), params

    @classmethod
    def fit(cls, records: np.ndarray, compositions: np.ndarray, labels: np.ndarray, cell_types: list[str], *,
            hidden: int = 64, seed: int = 0) -> "CellTyper":
        """Fit on cell records, each cell's tile composition ``(n, T)`` and its true type index."""
        from sklearn.neural_network import MLPClassifier

        x = design(records, compositions)
        mean, std = x.mean(axis=0), x.std(axis=0)
        scale = np.where(std > 1e-9, std, 1.0)
        mlp = MLPClassifier((hidden,), alpha=1e-3, learning_rate_init=3e-3, max_iter=300, early_stopping=True,
                            n_iter_no_change=15, random_state=seed).fit((x - mean) / scale, labels)
        params = {"mean": mean.tolist(), "scale": scale.tolist(), "classes": [int(c) for c in mlp.classes_],
                  "layers": [{"w": w.tolist(), "b": b.tolist()} for w, b in zip(mlp.coefs_, mlp.intercepts_)]}
        log.info("cell typer: fitted on %d cells, validation score %.3f", len(labels), mlp.best_validation_score_)
        return cls(cell_types, params)

    def posterior(self, records: np.ndarray, composition: np.ndarray) -> np.ndarray:
        p = self.params
        a = (design(records, composition) - np.asarray(p["mean"])) / np.asarray(p["scale"])
        layers = p["layers"]
        for i, layer in enumerate(layers):
            a = a @ np.asarray(layer["w"]) + np.asarray(layer["b"])
            if i < len(layers) - 1:
                a = np.maximum(a, 0)
        if a.shape[1] == 1:      # binary: scikit-learn keeps one logit
            a = np.hstack([np.zeros_like(a), a])
        a = np.exp(a - a.max(axis=1, keepdims=True))
        out = np.zeros((len(records), len(self.cell_types)))
        out[:, p["classes"]] = a / a.sum(axis=1, keepdims=True)
        return out

    def save(self, path) -> None:
        from core.wsi.cells import CELL_FIELDS

        Path(path).write_text(json.dumps({"format": FORMAT, "version": 1, "cell_types": self.cell_types,
                                          "fields": CELL_FIELDS, "params": self.params}))

    @classmethod
    def load(cls, path) -> "CellTyper":
        from core.wsi.cells import CELL_FIELDS

        doc = json.loads(Path(path).read_text())
        if doc.get("format") != FORMAT or doc.get("fields") != CELL_FIELDS:
            raise ValueError(f"{path}: not a cell typer for these cell record fields")
        return cls(doc["cell_types"], doc["params"])


def load_typer(model) -> CellTyper | None:
    """The model's learned typer (``cell_typer.json`` beside it) or None (the rule posterior).
    A typer for other cell types than the model's is refused."""
    path = getattr(model, "cell_typer_path", None)
    if path is None:
        return None
    typer = CellTyper.load(path)
    if typer.cell_types != list(model.cell_types):
        raise ValueError(f"{path}: its cell types {typer.cell_types[:4]}… are not the model's")
    return typer
