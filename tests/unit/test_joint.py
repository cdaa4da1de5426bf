"""The joint image ↔ expression space (models.joint, core.training.joint): the contrastive fit
pairs images with their own profiles far above chance, BLEEP-style retrieval predicts better than
the training mean, and the space travels in the checkpoint, through both runtimes and the engine
into the store (schema v6 ``tile_vectors.joint``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.training.joint import joint_fit, knn_predict, retrieval_scores
from models.evaluate import per_gene_pearson
from models.scist import HeadConfig, ModelCard, ReferenceInformedHead, attach_joint, load_checkpoint, save_checkpoint


def _paired(n: int, seed: int, *, genes: int = 30, feat: int = 48, noise: float = 0.3):
    """Spots whose image features are a fixed nonlinear map of a 4-programme expression state (+ noise)."""
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(n, 4))
    mix = np.random.default_rng(99).normal(size=(4, genes))
    proj = np.random.default_rng(98).normal(size=(4, feat))
    y = np.log1p(np.exp(state @ mix * 0.5 + 1.0))                     # positive, log-like values
    x = np.tanh(state @ proj) + noise * rng.normal(size=(n, feat))
    return x.astype(np.float32), y.astype(np.float32)


def test_contrastive_fit_retrieves_own_spot_far_above_chance_and_predicts_by_retrieval():
    """Held-out spots of the same 'tissue': an image finds its own profile among 200 in the top 5
    far more often than chance (5/200 = 0.025); the mean of the 50 nearest training profiles
    correlates with the truth per gene (the training mean has no per-spot signal at all)."""
    x, y = _paired(1200, 0)
    xt, yt = _paired(200, 1)
    space = joint_fit(x, y, epochs=30, seed=0, dim=16)
    r = retrieval_scores(space, xt, yt)
    assert r["random5"] == pytest.approx(5 / 200)
    assert r["top5"] > 8 * r["random5"] and r["top50"] >= r["top5"] >= r["top1"]
    pred = knn_predict(space, y, xt, k=50)
    assert np.nanmean(per_gene_pearson(pred, yt)) > 0.5


def test_an_untrained_space_is_at_chance():
    """The retrieval figure is not built to succeed: a random space sits near k/N."""
    from models.joint import JointConfig, JointSpace

    torch.manual_seed(0)
    space = JointSpace(JointConfig(in_dim=48, n_genes=30, dim=16)).eval()
    xt, yt = _paired(400, 2)
    tops = retrieval_scores(space, xt, yt)
    assert tops["top50"] < 3 * tops["random50"]


def _tiny_model(folder, joint=None):
    torch.manual_seed(0)
    head = ReferenceInformedHead(HeadConfig(1280, 30, 2), torch.rand(2, 30))
    card = ModelCard("tiny", [f"G{i}" for i in range(30)], ["a", "b"], "efficientnet_lite0", 112.0, 1.0, 112)
    return save_checkpoint(folder, head, card, joint=joint)


def test_checkpoint_carries_the_space_and_attach_keeps_the_head(tmp_path):
    """save → load gives the same space (its standardisation buffers included) and a "joint"
    output of unit vectors; attaching a space to a checkpoint keeps the head's tensors bit for bit
    and changes the version (new run keys), with the metrics in the card."""
    x, y = _paired(300, 0, feat=1280)
    space = joint_fit(x, y, epochs=2, seed=0)
    plain = _tiny_model(tmp_path / "plain")
    model, _ = load_checkpoint(tmp_path / "plain")
    assert model.joint is None
    tiles = torch.randint(0, 255, (3, 112, 112, 3), dtype=torch.uint8)
    with torch.inference_mode():
        before = model(tiles)
    assert "joint" not in before

    card = attach_joint(tmp_path / "plain", space, {"retrieval": {"top1": 0.5}})
    assert card.version != plain.version and card.metrics["joint"]["retrieval"]["top1"] == 0.5
    assert json.loads((tmp_path / "plain" / "card.json").read_text())["version"] == card.version
    again, loaded_card = load_checkpoint(tmp_path / "plain")
    assert loaded_card.version == card.version
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, again.head.state_dict()[k]), k
    assert torch.equal(again.joint.gene_mean, space.gene_mean) and torch.equal(again.joint.gene_std, space.gene_std)
    with torch.inference_mode():
        out = again(tiles)
    assert torch.equal(out["expression"], before["expression"])
    assert out["joint"].shape == (3, space.config.dim)
    assert torch.allclose(out["joint"].norm(dim=1), torch.ones(3), atol=1e-5)


def test_a_damaged_joint_entry_is_refused_clearly(tmp_path):
    from models.scist import CheckpointError

    x, y = _paired(100, 0, feat=1280)
    _tiny_model(tmp_path / "m", joint=joint_fit(x, y, epochs=1, seed=0))
    payload = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    payload["joint_state"].pop("gene_mean")
    torch.save(payload, tmp_path / "m" / "model.pt")
    with pytest.raises(CheckpointError, match="joint space"):
        load_checkpoint(tmp_path / "m")


def test_onnx_runtime_returns_the_joint_output_like_torch(tmp_path):
    """The exported graph has the joint output and matches eager PyTorch (the engine's verification)."""
    from models.runtime import OnnxRuntime, TorchRuntime, export_onnx, max_difference, verification_batch

    x, y = _paired(200, 0, feat=1280)
    _tiny_model(tmp_path / "m", joint=joint_fit(x, y, epochs=1, seed=0))
    model, _ = load_checkpoint(tmp_path / "m")
    batch = verification_batch(112, 4)
    eager = TorchRuntime(model, torch.device("cpu"))(batch)
    onnx = OnnxRuntime(export_onnx(model, 112, tmp_path / "m.onnx"), threads=1)(batch)
    assert set(eager) == set(onnx) == {"expression", "embedding", "composition", "joint"}
    assert max_difference(eager, onnx) < 1e-3
    assert max_difference(eager, {k: v for k, v in onnx.items() if k != "joint"}) == float("inf")
