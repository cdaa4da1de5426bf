"""Finding and loading model checkpoints (folders with ``model.pt`` + ``card.json``).

Model ids are plain names (:data:`MODEL_ID_PATTERN`); any other id is refused before it reaches a
path. A folder whose ``card.json`` is malformed is left out of the listing with a logged warning,
and loading it by name says what is wrong. ``model.pt`` is loaded with ``weights_only=True``
(:func:`models.scist.load_checkpoint`), and a loaded model's ``version`` — hence its store key and
every run key — is derived from the SHA-256 of that file, so replacing the weights never serves
runs cached for the old ones. The listing's ``version`` is what ``card.json`` records (reading it
does not hash or import torch); the loaded model's version is authoritative.

A model on a foundation encoder (UNI …) needs that encoder's local weights, which its card records
by path and SHA-256 (:mod:`models.encoder_weights`): they are looked for at ``encoder_weights``
when given, else in the setting ``encoder_weights`` (``$TESSERA_ENCODER_WEIGHTS``) then at the
recorded path, and weights with another SHA-256 are refused (:class:`EncoderWeightsError`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import EncoderWeightsError, InvalidModelIdError, ModelCheckpointError, ModelNotFoundError
from core.wsi.tiling import TilingParams

log = logging.getLogger(__name__)
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LIST = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
_NUMBER = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0  # noqa: E731
_CARD_KEYS = {  # required card.json keys → (check, what the value must be); mirrors models.scist.card_problem
    "model_id": (lambda v: isinstance(v, str), "a string"), "genes": (_LIST, "a list of strings"),
    "cell_types": (_LIST, "a list of strings"), "encoder": (lambda v: isinstance(v, str) and bool(v), "a string"),
    "tile_um": (_NUMBER, "a positive number"), "mpp": (_NUMBER, "a positive number"),
    "input_px": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
}


@dataclass
class LoadedModel:
    """A model ready for inference plus what the store and tiler need to know about it."""

    model_id: str
    version: str
    genes: list[str]
    cell_types: list[str]
    card: dict
    module: object  # models.scist.TesseraModel (torch is imported lazily)
    encoder_weights: str | None = None  # the local encoder weights loaded (foundation encoders), verified
    directory: Path | None = None       # the model's folder (card.json, model.pt, optional cell_typer.json)

    @property
    def cell_typer_path(self) -> Path | None:
        """The learned per-nucleus typer shipped beside the model (``cell_typer.json``), if any."""
        path = None if self.directory is None else Path(self.directory) / "cell_typer.json"
        return path if path is not None and path.is_file() else None

    @property
    def cells_variant(self) -> str:
        """What a cells run of this model depends on beyond the model: the typer (its digest)."""
        path = self.cell_typer_path
        if path is None:
            return "posterior"
        import hashlib

        return "typer-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.version}"

    def tiling(self, **overrides) -> TilingParams:
        return TilingParams(tile_um=self.card["tile_um"], mpp=self.card["mpp"], **overrides)


def is_valid_model_id(model_id) -> bool:
    """A plain name: letters, digits, ``.``, ``_``, ``-`` (starting with a letter or digit, no ``..``)."""
    return isinstance(model_id, str) and bool(MODEL_ID_PATTERN.fullmatch(model_id)) and ".." not in model_id


def check_model_id(model_id) -> str:
    """``model_id`` itself, or :class:`InvalidModelIdError` when it is not a plain name."""
    if not is_valid_model_id(model_id):
        raise InvalidModelIdError(
            f"{model_id!r} is not a valid model id: use letters, digits, '.', '_' and '-' only "
            "(no slashes or '..'), e.g. 'breast-her2st'.")
    return model_id


def _card_problem(card) -> str | None:
    if not isinstance(card, dict):
        return f"card.json must be a JSON object, not {type(card).__name__}"
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        return f"card.json lacks required key(s) {', '.join(missing)}"
    for key, (ok, what) in _CARD_KEYS.items():
        if not ok(card[key]):
            return f"card.json: {key!r} must be {what}, not {card[key]!r:.60}"
    if not is_valid_model_id(card["model_id"]):
        return f"card.json: model_id {card['model_id']!r} is not a valid model id (letters, digits, '.', '_', '-')"
    return None


def _scan_all(model_dirs) -> tuple[dict[str, tuple[Path, dict]], dict[str, tuple[Path, str]]]:
    """(usable, skipped): model id → (checkpoint folder, card) over every folder in ``model_dirs``
    (first one wins; each card.json is read once), and the folders left out → (folder, why), keyed
    by their card's model id when readable, else by the folder's name."""
    found: dict[str, tuple[Path, dict]] = {}
    skipped: dict[str, tuple[Path, str]] = {}
    for root in model_dirs:
        for card_path in sorted(Path(root).glob("*/card.json")):
            folder = card_path.parent
            try:
                card = json.loads(card_path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                card, problem = None, f"card.json is not valid JSON ({exc})"
            else:
                problem = _card_problem(card)
            if problem:
                name = card.get("model_id") if isinstance(card, dict) and isinstance(card.get("model_id"), str) else None
                log.warning("skipping model folder %s: %s", folder, problem)
                skipped.setdefault(name or folder.name, (folder, problem))
                continue
            found.setdefault(card["model_id"], (folder, card))
    return found, skipped


def _scan(model_dirs) -> dict[str, tuple[Path, dict]]:
    """Model id → (checkpoint folder, card) of the usable folders (malformed cards are skipped)."""
    return _scan_all(model_dirs)[0]


def list_models(model_dirs) -> dict[str, Path]:
    """Model id → checkpoint folder, over every folder in ``model_dirs`` (first one wins)."""
    return {model_id: folder for model_id, (folder, _) in _scan(model_dirs).items()}


def list_cards(model_dirs) -> dict[str, dict]:
    """Model id → its card (``model_id``, ``version``, genes, tiling, metrics, …)."""
    return {model_id: card for model_id, (_, card) in _scan(model_dirs).items()}


def _find(model_id: str, model_dirs) -> tuple[Path, dict]:
    check_model_id(model_id)
    models, skipped = _scan_all(model_dirs)
    if model_id in models:
        return models[model_id]
    if model_id in skipped:
        folder, problem = skipped[model_id]
        raise ModelCheckpointError(
            f"Model {model_id!r} in {folder} cannot be used: {problem}. Fix or re-write its card.json "
            "(re-train with `python -m core.cli train`), or remove the folder.")
    raise ModelNotFoundError(
        f"No model {model_id!r} in {', '.join(map(str, model_dirs))}. "
        f"Available: {', '.join(models) or 'none'}. Train one with `python -m core.cli train`."
    )


def read_card(model_id: str, model_dirs) -> dict:
    return _find(model_id, model_dirs)[1]


def load_model(model_id: str, model_dirs, *, encoder_weights: str | Path | None = None,
               encoder_search=None) -> LoadedModel:
    """Load a model by id; its ``version`` (and so ``key``) is derived from the SHA-256 of its
    ``model.pt`` (see :func:`models.scist.version_for`), not taken on trust from ``card.json``.

    ``encoder_weights``: the local encoder weights to use (the only place looked at); else
    ``encoder_search`` (default: the setting ``encoder_weights``) then the card's recorded path."""
    from models.encoder_weights import EncoderWeightsError as WeightsError
    from models.scist import CheckpointError, load_checkpoint

    directory, card_json = _find(model_id, model_dirs)
    if encoder_search is None:
        from core.config import load_settings

        encoder_search = load_settings().encoder_weights
    try:
        module, card = load_checkpoint(directory, encoder_weights=encoder_weights, encoder_search=encoder_search)
    except WeightsError as exc:
        raise EncoderWeightsError(f"Model {model_id!r} cannot be loaded: {exc}") from None
    except CheckpointError as exc:
        raise ModelCheckpointError(
            f"Model {model_id!r} cannot be loaded: {exc}. Replace the folder's model.pt with one written by "
            "Tessera (`python -m core.cli train`) or remove the folder.") from None
    card_json = {**card_json, "version": card.version}
    return LoadedModel(card.model_id, card.version, list(card.genes), list(card.cell_types), card_json, module,
                       encoder_weights=getattr(module, "encoder_weights", None), directory=Path(directory))
