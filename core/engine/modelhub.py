"""Finding and loading model checkpoints (folders with ``model.pt`` + ``card.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelNotFoundError
from core.wsi.slide import TilingParams


@dataclass
class LoadedModel:
    """A model ready for inference plus what the store and tiler need to know about it."""

    model_id: str
    version: str
    genes: list[str]
    cell_types: list[str]
    card: dict
    module: object  # models.scist.TesseraModel (torch is imported lazily)

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.version}"

    def tiling(self, **overrides) -> TilingParams:
        return TilingParams(tile_um=self.card["tile_um"], mpp=self.card["mpp"], **overrides)


def list_models(model_dirs) -> dict[str, Path]:
    """Model id → checkpoint folder, over every folder in ``model_dirs`` (first one wins)."""
    found: dict[str, Path] = {}
    for root in model_dirs:
        for card in sorted(Path(root).glob("*/card.json")):
            model_id = json.loads(card.read_text()).get("model_id", card.parent.name)
            found.setdefault(model_id, card.parent)
    return found


def read_card(model_id: str, model_dirs) -> dict:
    models = list_models(model_dirs)
    if model_id not in models:
        raise ModelNotFoundError(
            f"No model {model_id!r} in {', '.join(map(str, model_dirs))}. "
            f"Available: {', '.join(models) or 'none'}. Train one with `python -m core.cli train`."
        )
    return json.loads((models[model_id] / "card.json").read_text())


def load_model(model_id: str, model_dirs, *, encoder_weights: str | None = None) -> LoadedModel:
    from models.scist import load_checkpoint

    read_card(model_id, model_dirs)
    directory = list_models(model_dirs)[model_id]
    module, card = load_checkpoint(directory, encoder_weights=encoder_weights)
    return LoadedModel(card.model_id, card.version, list(card.genes), list(card.cell_types),
                       json.loads((directory / "card.json").read_text()), module)
