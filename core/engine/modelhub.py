"""Finding and loading model checkpoints (folders with ``model.pt`` + ``card.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelNotFoundError
from core.wsi.tiling import TilingParams


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


def _scan(model_dirs) -> dict[str, tuple[Path, dict]]:
    """Model id → (checkpoint folder, card) over every folder in ``model_dirs`` (first one wins);
    each card.json is read once."""
    found: dict[str, tuple[Path, dict]] = {}
    for root in model_dirs:
        for card_path in sorted(Path(root).glob("*/card.json")):
            card = json.loads(card_path.read_text())
            found.setdefault(card.get("model_id", card_path.parent.name), (card_path.parent, card))
    return found


def list_models(model_dirs) -> dict[str, Path]:
    """Model id → checkpoint folder, over every folder in ``model_dirs`` (first one wins)."""
    return {model_id: folder for model_id, (folder, _) in _scan(model_dirs).items()}


def list_cards(model_dirs) -> dict[str, dict]:
    """Model id → its card (``model_id``, ``version``, genes, tiling, metrics, …)."""
    return {model_id: card for model_id, (_, card) in _scan(model_dirs).items()}


def _find(model_id: str, model_dirs) -> tuple[Path, dict]:
    models = _scan(model_dirs)
    if model_id not in models:
        raise ModelNotFoundError(
            f"No model {model_id!r} in {', '.join(map(str, model_dirs))}. "
            f"Available: {', '.join(models) or 'none'}. Train one with `python -m core.cli train`."
        )
    return models[model_id]


def read_card(model_id: str, model_dirs) -> dict:
    return _find(model_id, model_dirs)[1]


def load_model(model_id: str, model_dirs, *, encoder_weights: str | None = None) -> LoadedModel:
    from models.scist import load_checkpoint

    directory, card_json = _find(model_id, model_dirs)
    module, card = load_checkpoint(directory, encoder_weights=encoder_weights)
    return LoadedModel(card.model_id, card.version, list(card.genes), list(card.cell_types), card_json, module)
