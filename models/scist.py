"""A reference-informed expression model in the spirit of SciSt.

Image features → an embedding → a cell-type composition (softmax over the reference types) →
the *initial expression* = composition × reference profiles; the image embedding then refines
that prior (residual), giving the panel's log-normalised expression. The forward pass is split
into ``forward_features`` (encoder) and ``forward_head`` so features can be cached for training.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import threading
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.reference import ReferenceHead

from models.encoders import EncoderSpec, create_encoder
from models.fusion import FusionConfig, FusionHead, ProbeFusionHead

CHECKPOINT_FORMAT = "tessera-ckpt/1"
VERSION_CHARS = 12  # a model version: the first 12 hex digits of the SHA-256 of its model.pt
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A model folder's ``model.pt`` or ``card.json`` cannot be used: missing, not a checkpoint,
    corrupt, or refused because it holds more than tensors and plain containers (unsafe pickle).
    ``core.engine.modelhub`` turns it into a ``TesseraError`` for the user."""


@dataclass
class HeadConfig:
    in_dim: int
    n_genes: int
    n_types: int
    hidden: int = 256
    emb_dim: int = 64
    dropout: float = 0.1


class ReferenceInformedHead(ReferenceHead):
    """Features [B, in_dim] → dict(expression [B,G], composition [B,T], prior [B,G], embedding [B,E])."""

    def __init__(self, config: HeadConfig, profiles: torch.Tensor):
        super().__init__(config, profiles)
        self.embed = nn.Sequential(
            nn.LayerNorm(config.in_dim), nn.Dropout(config.dropout),
            nn.Linear(config.in_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.emb_dim),
        )
        self.composition = nn.Linear(config.emb_dim, config.n_types)
        self.refine = nn.Sequential(
            nn.Linear(config.emb_dim + config.n_genes, config.hidden), nn.GELU(),
            nn.Linear(config.hidden, config.n_genes),
        )

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(feats)
        comp = torch.softmax(self.composition(emb), dim=-1)
        prior = comp @ self.profiles
        expr = prior + self.refine(torch.cat([emb, prior], dim=-1))
        return {"expression": expr, "composition": comp, "prior": prior,
                "embedding": F.normalize(emb, dim=-1)}


class TesseraModel(nn.Module):
    """uint8 tiles [B,H,W,3] → the head's outputs. Normalisation happens inside, on the device."""

    def __init__(self, encoder: EncoderSpec, head: nn.Module, joint: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder.module
        self.encoder_name = encoder.name
        self.head = head
        self.joint = joint        # models.joint.JointSpace: adds the tile's "joint" image embedding
        self.uses_tokens = isinstance(head, FusionHead)  # fusion heads attend over the feature map
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1) * 255.0)

    def preprocess(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        x = tiles_uint8.permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward_features(self, tiles_uint8: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(tiles_uint8)
        return (self.encoder.tokens(x) if self.uses_tokens else self.encoder(x)).float()

    def forward_head(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(feats.float())
        if self.joint is not None:
            out["joint"] = self.joint.image(feats.float())
        return out

    def forward(self, tiles_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(tiles_uint8))


@dataclass
class ModelCard:
    """What a checkpoint predicts and how it was made; saved as ``card.json`` beside it."""

    model_id: str
    genes: list[str]
    cell_types: list[str]
    encoder: str
    tile_um: float
    mpp: float
    input_px: int
    training_data: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    description: str = ""
    version: str = ""

    @classmethod
    def from_dict(cls, data, *, source: str = "card.json") -> "ModelCard":
        """A card from parsed ``card.json``; :class:`CheckpointError` (naming the problem) when it is
        not an object, lacks a required key or has a value of the wrong type. Unknown keys are ignored."""
        problem = card_problem(data)
        if problem:
            raise CheckpointError(f"{source}: {problem}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CARD_FIELDS = {  # key → (check, what it must be); the first six are required
    "model_id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "genes": (lambda v: isinstance(v, list) and all(isinstance(g, str) for g in v), "a list of strings"),
    "cell_types": (lambda v: isinstance(v, list) and all(isinstance(g, str) for g in v), "a list of strings"),
    "encoder": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "tile_um": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "mpp": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "input_px": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "training_data": (lambda v: isinstance(v, dict), "an object"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "version": (lambda v: isinstance(v, str), "a string"),
}
_REQUIRED = ("model_id", "genes", "cell_types", "encoder", "tile_um", "mpp", "input_px")


def card_problem(data) -> str | None:
    """What is wrong with a parsed card (``None`` when it is usable)."""
    if not isinstance(data, dict):
        return f"must be a JSON object, not {type(data).__name__}"
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        return f"missing required key(s) {', '.join(missing)}"
    for key, (ok, what) in _CARD_FIELDS.items():
        if key in data and not ok(data[key]):
            return f"{key!r} must be {what}, not {data[key]!r:.60}"
    return None


def read_card(path: Path) -> ModelCard:
    """Read and check a ``card.json`` (:class:`CheckpointError` when it is missing or malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model folder needs model.pt and card.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    return ModelCard.from_dict(data, source=str(path))


# -- weights file hashes (cached by path + size + mtime) ------------------------------------------
_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}
_DIGESTS_LOCK = threading.Lock()


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _digests(data: bytes) -> tuple[str, str]:
    """(SHA-256 hex, legacy version): the legacy one is what ``save_checkpoint`` recorded before
    versions were SHA-256 based (a 6-byte BLAKE2b), still accepted so older stores keep their runs."""
    return hashlib.sha256(data).hexdigest(), hashlib.blake2b(data, digest_size=6).hexdigest()


def _read_weights(path: Path) -> tuple[bytes, tuple[str, str]]:
    """The file's bytes and digests; the digests come from the cache when the file's size and
    mtime are unchanged across the read (so a file replaced meanwhile is hashed afresh)."""
    before = _stat_key(path)
    data = path.read_bytes()
    stable = _stat_key(path) == before and len(data) == before[1]
    with _DIGESTS_LOCK:
        digests = _DIGESTS.get(before) if stable else None
    if digests is None:
        digests = _digests(data)
        if stable:
            with _DIGESTS_LOCK:
                _DIGESTS[before] = digests
    return data, digests


def weights_sha256(path: Path) -> str:
    """SHA-256 (hex) of a weights file, cached by path + size + mtime."""
    path = Path(path)
    key = _stat_key(path)
    with _DIGESTS_LOCK:
        cached = _DIGESTS.get(key)
    return cached[0] if cached else _read_weights(path)[1][0]


def version_for(digests: tuple[str, str], recorded: str = "") -> str:
    """The version of the weights with these digests: the card's ``recorded`` version when it is
    a hash of this very file (SHA-256 prefix, or the legacy BLAKE2b of older checkpoints), else the
    first :data:`VERSION_CHARS` hex digits of its SHA-256. Either way the version is a function of
    the file's bytes, so a replaced ``model.pt`` always gets a new version (and new run keys)."""
    sha, legacy = digests
    if recorded and recorded in (sha[:VERSION_CHARS], legacy):
        return recorded
    return sha[:VERSION_CHARS]


def _plain(obj):
    """``obj`` with numpy scalars turned into Python numbers (``weights_only`` loading refuses them)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj.item() if hasattr(obj, "item") and type(obj).__module__ == "numpy" else obj


_HEADS = {"pooled": (HeadConfig, ReferenceInformedHead), "fusion": (FusionConfig, FusionHead),
          "probe_fusion": (FusionConfig, ProbeFusionHead)}


def save_checkpoint(directory: Path, head: nn.Module, card: ModelCard, *, half: bool = True,
                    joint: nn.Module | None = None) -> ModelCard:
    """Write ``model.pt`` + ``card.json``; the version is the first 12 hex digits of the SHA-256
    of the written ``model.pt`` (see :func:`version_for`).

    The payload holds only tensors, strings, numbers and plain dicts/lists, so it loads with
    ``torch.load(weights_only=True)``.

    ``half`` stores floating-point weights as float16 (half the size; loading casts them back to
    float32, and predictions move by ~1e-3 of a log-expression unit).

    ``joint``: a :class:`models.joint.JointSpace` saved with the head (``joint_config``,
    ``joint_state``, kept in float32: its buffers standardise expression).
    """
    directory.mkdir(parents=True, exist_ok=True)
    head_type = "probe_fusion" if isinstance(head, ProbeFusionHead) else "fusion" if isinstance(head, FusionHead) else "pooled"
    # a ridge probe's weights are tiny at strong α (fp16 would flush them): kept in float32
    state = {k: (v.half() if half and v.is_floating_point() and not k.startswith("probe.") else v)
             for k, v in head.state_dict().items()}
    card_dict = json.loads(json.dumps(_plain({**asdict(card), "version": ""})))  # plain JSON types only
    payload = {"format": CHECKPOINT_FORMAT, "head_type": head_type, "head_config": _plain(asdict(head.config)),
               "head_state": state, "card": card_dict}
    if joint is not None:
        payload["joint_config"] = _plain(joint.config.to_dict())
        payload["joint_state"] = {k: v.detach().float() for k, v in joint.state_dict().items()}
    path = directory / "model.pt"
    torch.save(payload, path)
    card.version = version_for(_read_weights(path)[1])
    (directory / "card.json").write_text(json.dumps({**card_dict, "version": card.version}, indent=2))
    return card


def _unpickle(path: Path, data: bytes) -> dict:
    """``torch.load(weights_only=True)`` of the bytes, every failure as a :class:`CheckpointError`;
    nothing in the file is ever executed (a pickle asking for code is refused, not run)."""
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was not written completely; "
                              "re-save or re-train the model")
    if data[:1] != b"\x80" and not zipfile.is_zipfile(io.BytesIO(data)):  # neither a zip nor a raw pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (a model.pt written by Tessera)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path} was refused: it holds objects other than tensors and plain containers, which "
                "could run code when loaded (it was not loaded). Use only checkpoints you trust, "
                "written by Tessera's save_checkpoint") from None
        raise CheckpointError(f"{path} is corrupt ({exc})") from None
    except Exception as exc:  # truncated zip, bad storage records, …
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a Tessera checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return payload


def _joint_of(path: Path, payload: dict):
    """The checkpoint's :class:`models.joint.JointSpace`, or None when it ships none."""
    if "joint_state" not in payload and "joint_config" not in payload:
        return None
    from models.joint import JointConfig, JointSpace

    config, state = payload.get("joint_config"), payload.get("joint_state")
    if not isinstance(config, dict) or not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: incomplete joint space (config or weights missing)")
    try:
        joint = JointSpace(JointConfig(**config))
        joint.load_state_dict({k: v.float() for k, v in state.items()})
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: the joint space's weights do not fit its config ({exc})") from None
    return joint.eval()


def attach_joint(directory: Path, joint: nn.Module, metrics: dict | None = None) -> ModelCard:
    """Add (or replace) the joint space of an existing checkpoint without touching its head: the
    head's stored tensors are written back as they were read. The version changes (it is the
    file's hash), so the store keys the model's runs anew. ``metrics`` go to the card's
    ``metrics["joint"]``."""
    directory = Path(directory)
    path = directory / "model.pt"
    payload = _unpickle(path, _read_weights(path)[0])
    payload["joint_config"] = _plain(joint.config.to_dict())
    payload["joint_state"] = {k: v.detach().float() for k, v in joint.state_dict().items()}
    card = json.loads((directory / "card.json").read_text())
    if metrics is not None:
        card.setdefault("metrics", {})["joint"] = _plain(metrics)
    payload["card"] = {**payload.get("card", {}), "metrics": card.get("metrics", {})}
    torch.save(payload, path)
    card["version"] = version_for(_read_weights(path)[1])
    (directory / "card.json").write_text(json.dumps(card, indent=2))
    return ModelCard.from_dict(card)


def load_checkpoint(directory: Path, *, encoder_weights: str | Path | None = None,
                    encoder_search: tuple | list = ()) -> tuple[TesseraModel, ModelCard]:
    """Load a checkpoint folder into an eval-mode :class:`TesseraModel` and its card.

    ``model.pt`` is loaded with ``weights_only=True``; any problem with it or ``card.json`` raises
    :class:`CheckpointError`. The returned card's ``version`` is derived from the SHA-256 of the
    ``model.pt`` read (:func:`version_for`): when ``card.json`` records another version (the weights
    were replaced after the card was written) a warning is logged and the file's version is used.

    Encoder weights (foundation models) are found and verified against the SHA-256 the card records
    by :func:`models.encoder_weights.find_weights`: ``encoder_weights`` is the only path tried when
    given, else ``encoder_search`` then the recorded path; the path used is ``model.encoder_weights``.
    """
    directory = Path(directory)
    card = read_card(directory / "card.json")
    path = directory / "model.pt"
    try:
        data, digests = _read_weights(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model folder needs model.pt and card.json") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from None
    payload = _unpickle(path, data)
    version = version_for(digests, card.version)
    if card.version and version != card.version:
        log.warning("%s: card.json records version %s but model.pt hashes to %s (model.pt was replaced "
                    "after the card was written); using %s", directory, card.version, version, version)
    card.version = version
    head_type = payload.get("head_type", "pooled")
    state = payload.get("head_state")
    if head_type not in _HEADS or not isinstance(payload.get("head_config"), dict) or not isinstance(state, dict) \
            or not all(isinstance(v, torch.Tensor) for v in state.values()) or "profiles" not in state:
        raise CheckpointError(f"{path}: incomplete checkpoint (head type {head_type!r}, head config or weights missing)")
    config_cls, head_cls = _HEADS[head_type]
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    try:
        head = head_cls(config_cls(**payload["head_config"]), state["profiles"])
        head.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit the recorded head ({exc})") from None
    from models.encoder_weights import EncoderWeightsError, find_weights
    from models.encoders import EncoderError

    weights = find_weights(directory, card, explicit=encoder_weights, search=encoder_search)
    try:
        encoder = create_encoder(card.encoder, weights_path=weights)
    except EncoderError as exc:
        raise EncoderWeightsError(f"its encoder {card.encoder} cannot be built: {exc}") from None
    except KeyError as exc:
        raise CheckpointError(f"{directory / 'card.json'}: {exc.args[0] if exc.args else exc}") from None
    model = TesseraModel(encoder, head, _joint_of(path, payload)).eval()
    model.encoder_weights = str(weights) if weights is not None else None
    return model, card
