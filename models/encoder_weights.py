"""Which local encoder weights a model needs, and finding and verifying them when it is loaded.

A model trained on a foundation encoder (UNI …) cannot ship that encoder's weights (size, licence),
so its card records them: ``training_data["encoder_weights"] = {"encoder", "path", "file", "sha256",
"bytes"}`` (:func:`weights_record`). Loading (:func:`find_weights`) tries, in order:

1. an explicit path (``--encoder-weights``, ``load_model(encoder_weights=…)``): only it is tried;
2. otherwise the search list (setting ``encoder_weights``, ``$TESSERA_ENCODER_WEIGHTS``: paths
   separated by ``os.pathsep``), then the recorded ``path`` (a relative one is taken from the
   model folder, so a folder may carry its encoder beside ``model.pt``).

A path is a weights file or a folder holding one (``pytorch_model.bin`` …). The first candidate
whose file has the recorded SHA-256 is used; one with another hash is refused, never used: a
model's version (its store key, hence every cached run) hashes only the head's ``model.pt``, so
other encoder weights would silently serve predictions cached for these. Hashes are cached per
path + size + mtime within a process (a 1.2 GB ViT-L file takes a few seconds once).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from models.encoders import EncoderError, encoder_weights_file, requires_weights
from models.scist import CheckpointError

RECORD_KEY = "encoder_weights"
_SHA: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


class EncoderWeightsError(CheckpointError):
    """The encoder weights a model was trained with are not found, or the ones given differ."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in chunks; cached by resolved path + size + mtime."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA:
            return _SHA[key]
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _SHA_LOCK:
        _SHA[key] = digest
    return digest


def weights_record(weights_path: str | Path, *, encoder: str) -> dict:
    """What a card records about the encoder weights a model is trained with."""
    given = Path(weights_path).expanduser().resolve()
    file = encoder_weights_file(given)
    return {"encoder": encoder, "path": str(given), "file": file.name, "sha256": file_sha256(file),
            "bytes": file.stat().st_size}


def recorded(card) -> dict | None:
    """The card's encoder-weights record, or None (a model whose encoder needs no local weights,
    or one trained before records were written)."""
    record = card.training_data.get(RECORD_KEY) if isinstance(card.training_data, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _candidates(directory: Path, record: dict, explicit, search) -> list[Path]:
    if explicit is not None:
        return [Path(explicit).expanduser()]
    out = [Path(p).expanduser() for p in search]
    if record.get("path"):
        path = Path(record["path"]).expanduser()
        out.append(path if path.is_absolute() else Path(directory) / path)
    return out


def find_weights(directory: Path, card, *, explicit: str | Path | None = None,
                 search: tuple | list = ()) -> Path | str | None:
    """The encoder weights to load ``card``'s model with (None: the encoder's own default).

    Raises :class:`EncoderWeightsError` (one line) when the card records weights and no candidate
    holds them: each candidate tried is named with why it was refused (missing, or its SHA-256).
    """
    record = recorded(card)
    if record is None:  # nothing to verify against: as before records existed
        if explicit is not None:
            return explicit
        if requires_weights(card.encoder):
            return next((p for p in search if Path(p).exists()), None)
        return None
    want = record["sha256"]
    tried = []
    for path in _candidates(directory, record, explicit, search):
        try:
            file = encoder_weights_file(path)
        except EncoderError:
            tried.append(f"{path} not found")
            continue
        sha = file_sha256(file)
        if sha == want:
            return path
        tried.append(f"{file} has sha256 {sha[:12]}…, not {want[:12]}… (refused)")
    raise EncoderWeightsError(
        f"it needs the {card.encoder} weights it was trained with ({record.get('file', 'weights')}, sha256 "
        f"{want[:12]}…, recorded at {record.get('path')}): {'; '.join(tried) or 'no path to try'}. Give them with "
        f"--encoder-weights PATH or TESSERA_ENCODER_WEIGHTS=PATH (a folder or file; several separated by "
        f"{os.pathsep!r})")
