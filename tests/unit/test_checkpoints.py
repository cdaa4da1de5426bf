"""Model checkpoints are loaded safely: ``model.pt`` only as weights (a pickle that would run code
is refused without running it), the version follows the weights file's SHA-256 (so replaced
weights never serve cached runs or a cached ONNX export), model ids never reach a path, and a
malformed ``card.json`` is left out of the listing instead of breaking it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from core.engine.modelhub import list_cards, list_models, load_model, read_card
from core.engine.plan import run_key_for
from core.errors import InvalidModelIdError, ModelCheckpointError, ModelNotFoundError, TesseraError
from core.wsi.tiling import TilingParams
from models import scist
from models.runtime import onnx_cache_path
from models.scist import CheckpointError, HeadConfig, ModelCard, ReferenceInformedHead, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
GENES = ["ERBB2", "ESR1"]


def _save(folder: Path, seed: int = 0, model_id: str = "tiny") -> ModelCard:
    torch.manual_seed(seed)
    head = ReferenceInformedHead(HeadConfig(1280, len(GENES), 2), torch.rand(2, len(GENES)))
    card = ModelCard(model_id, list(GENES), ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112)
    return save_checkpoint(folder, head, card)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted model.pt would do under weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-save"])
def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, kind):
    _save(tmp_path / "models" / "tiny")
    marker = tmp_path / "pwned"
    payload = {"format": scist.CHECKPOINT_FORMAT, "head_state": {"x": _RunsCode(marker)}}
    model_pt = tmp_path / "models" / "tiny" / "model.pt"
    if kind == "raw-pickle":
        model_pt.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, model_pt)
    with pytest.raises(ModelCheckpointError, match="refused") as info:
        load_model("tiny", [tmp_path / "models"])
    assert "tiny" in str(info.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "models" / "tiny")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x00\x13not a checkpoint at all" + bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    (b"hello, I am a text file\n", "not a PyTorch checkpoint"),
])
def test_a_model_pt_that_is_not_a_checkpoint_gives_a_clear_error(tmp_path, content, message):
    _save(tmp_path / "tiny")
    (tmp_path / "tiny" / "model.pt").write_bytes(content)
    with pytest.raises(ModelCheckpointError, match=message):
        load_model("tiny", [tmp_path])


def test_truncated_or_foreign_checkpoints_give_a_clear_error(tmp_path):
    _save(tmp_path / "tiny")
    model_pt = tmp_path / "tiny" / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    with pytest.raises(ModelCheckpointError, match="corrupt|not a PyTorch"):
        load_model("tiny", [tmp_path])
    torch.save({"weights": torch.zeros(3)}, model_pt)  # a safe pickle, but not a Tessera checkpoint
    with pytest.raises(ModelCheckpointError, match="not a Tessera checkpoint"):
        load_model("tiny", [tmp_path])
    (tmp_path / "tiny" / "model.pt").unlink()
    with pytest.raises(ModelCheckpointError, match="missing"):
        load_model("tiny", [tmp_path])


def test_replaced_weights_change_the_version_run_key_and_onnx_cache_key(tmp_path, caplog):
    card = _save(tmp_path / "models" / "tiny", seed=0)
    model_pt = tmp_path / "models" / "tiny" / "model.pt"
    assert card.version == hashlib.sha256(model_pt.read_bytes()).hexdigest()[:12]
    tiling = TilingParams(tile_um=112.0, mpp=1.0)
    first = load_model("tiny", [tmp_path / "models"])
    assert first.version == card.version and first.card["version"] == card.version
    # other weights copied over model.pt; card.json still records the old version
    _save(tmp_path / "other", seed=1)
    shutil.copyfile(tmp_path / "other" / "model.pt", model_pt)
    with caplog.at_level(logging.WARNING):
        second = load_model("tiny", [tmp_path / "models"])
    assert second.version == hashlib.sha256(model_pt.read_bytes()).hexdigest()[:12] != first.version
    assert second.key != first.key and second.card["version"] == second.version
    assert "model.pt was replaced" in caplog.text
    assert run_key_for("fp", first.key, tiling, 0.5) != run_key_for("fp", second.key, tiling, 0.5)
    paths = [onnx_cache_path(m.module, tmp_path / "onnx", version=f"tiny-{m.version}", input_px=112)
             for m in (first, second)]
    assert paths[0] != paths[1]
    # the ONNX key follows the weights in memory even under one version string
    same_version = [onnx_cache_path(m.module, tmp_path / "onnx", version="tiny-v", input_px=112)
                    for m in (first, second)]
    assert same_version[0] != same_version[1]
    assert onnx_cache_path(first.module, tmp_path / "onnx", version="tiny-v", input_px=112) == same_version[0]


def test_weights_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    _save(tmp_path / "tiny")
    model_pt = tmp_path / "tiny" / "model.pt"
    calls = []
    real = scist._digests
    monkeypatch.setattr(scist, "_digests", lambda data: calls.append(1) or real(data))
    scist._DIGESTS.clear()
    v1 = load_checkpoint(tmp_path / "tiny")[1].version
    v2 = load_checkpoint(tmp_path / "tiny")[1].version
    assert v1 == v2 and len(calls) == 1
    assert scist.weights_sha256(model_pt) == hashlib.sha256(model_pt.read_bytes()).hexdigest() and len(calls) == 1
    st = model_pt.stat()
    os.utime(model_pt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_checkpoint(tmp_path / "tiny")
    assert len(calls) == 2


def test_shipped_checkpoint_loads_as_weights_only_and_keeps_its_version():
    """The shipped model loads weights-only and its version is the SHA-256 prefix of its model.pt."""
    folder = REPO / "models" / "weights" / "breast-her2st"
    if not (folder / "model.pt").is_file():
        pytest.skip("shipped checkpoint not present")
    recorded = json.loads((folder / "card.json").read_text())["version"]
    model = load_model("breast-her2st", [folder.parent])
    assert model.version == recorded == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()[:12]


def test_a_legacy_blake2b_version_is_still_accepted(tmp_path):
    """Older cards record a BLAKE2b of the same file: still accepted, so stores that predicted with
    those checkpoints keep their runs."""
    _save(tmp_path / "tiny")
    model_pt, card_path = tmp_path / "tiny" / "model.pt", tmp_path / "tiny" / "card.json"
    legacy = hashlib.blake2b(model_pt.read_bytes(), digest_size=6).hexdigest()
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "version": legacy}))
    scist._DIGESTS.clear()
    assert load_checkpoint(tmp_path / "tiny")[1].version == legacy


@pytest.mark.parametrize("model_id", ["../x", "../../etc", "a/b", "..", "", "a\\b", "/abs", ".hidden", "x..y"])
def test_model_ids_that_are_not_plain_names_are_refused(tmp_path, model_id):
    _save(tmp_path / "tiny")
    for call in (load_model, read_card):
        with pytest.raises(InvalidModelIdError, match="not a valid model id"):
            call(model_id, [tmp_path])
    assert issubclass(InvalidModelIdError, ModelNotFoundError)


def test_malformed_cards_are_skipped_by_the_listing(tmp_path, caplog):
    root = tmp_path / "models"
    _save(root / "tiny")
    good = json.loads((root / "tiny" / "card.json").read_text())
    bad = {
        "notjson": "{oops",
        "array": "[1, 2]",
        "nokeys": json.dumps({"model_id": "nokeys"}),
        "wrongtypes": json.dumps({**good, "model_id": "wrongtypes", "genes": "ERBB2", "tile_um": "big"}),
        "escape": json.dumps({**good, "model_id": "../../etc"}),
    }
    for name, text in bad.items():
        shutil.copytree(root / "tiny", root / name)
        (root / name / "card.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="core.engine.modelhub"):
        assert set(list_models([root])) == {"tiny"}
        assert set(list_cards([root])) == {"tiny"}
    assert sum("skipping model folder" in r.getMessage() for r in caplog.records) >= len(bad)
    assert load_model("tiny", [root]).model_id == "tiny"
    with pytest.raises(ModelCheckpointError, match="not valid JSON"):
        load_model("notjson", [root])
    with pytest.raises(ModelCheckpointError, match="lacks required"):
        load_model("nokeys", [root])
    with pytest.raises(ModelCheckpointError, match="genes"):
        load_model("wrongtypes", [root])
    with pytest.raises(TesseraError):
        load_model("array", [root])
    # the checkpoint loader checks the card on its own, too
    with pytest.raises(CheckpointError, match="genes"):
        load_checkpoint(root / "wrongtypes")


def test_cards_with_numpy_numbers_still_save_as_weights_only(tmp_path):
    """Training metrics are often numpy scalars: the saver stores plain numbers, so the
    weights_only loader accepts the checkpoint (and the fusion head used by the demo model loads)."""
    import numpy as np

    from models.fusion import FusionConfig, FusionHead

    head = FusionHead(FusionConfig(in_dim=1280, n_tokens=4, n_genes=2, n_types=2, dim=16, heads=2), torch.rand(2, 2))
    card = ModelCard("fused", list(GENES), ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112,
                     metrics={"pcc": np.float64(0.5), "n": np.int64(3), "per_gene": [np.float32(0.25)]})
    saved = save_checkpoint(tmp_path / "fused", head, card)
    model, loaded = load_checkpoint(tmp_path / "fused")
    assert loaded.version == saved.version and loaded.metrics == {"pcc": 0.5, "n": 3, "per_gene": [0.25]}
    assert model.uses_tokens
