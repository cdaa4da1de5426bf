"""The foundation-model path (UNI-class ViT weights in timm layout), proven without timm, a GPU or
downloads: the self-contained ViT against an independent computation, strict loading, position
embeddings resampled like timm's, ONNX equal to PyTorch, the real ViT-L/16 shape, and a tiny ViT
saved in UNI's layout carried end to end: ``train-st`` → card records the weights → ``import`` →
``predict`` (ONNX, verified) → ``evaluate``, with the weights found by path, by
``TESSERA_ENCODER_WEIGHTS`` or ``--encoder-weights``, and other weights refused (SHA-256)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.cli import main as cli
from models.encoders import EncoderError, create_encoder
from models.vit import (ViTConfig, ViTWeightsError, VisionTransformer, build_vit, infer_config, load_vit,
                        save_timm_checkpoint)
from tests.conftest import make_slide

TINY = ViTConfig(dim=64, depth=2, heads=4, mlp_dim=256, patch=16, grid=14)


def _tiny(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(TINY, init_values=0.5).eval()  # LayerScale 0.5: the blocks matter


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny ViT saved as UNI ships: a folder with pytorch_model.bin (timm keys) + config.json."""
    folder = tmp_path_factory.mktemp("uni") / "tiny-vit"
    save_timm_checkpoint(_tiny(), folder)
    return folder


def _reference_forward(sd: dict, x: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """timm's ViT forward written independently: torch's nn.MultiheadAttention (its in_proj is timm's
    qkv — q, k, v stacked, heads contiguous), functional layer_norm (ε 1e-6) and exact GELU."""
    dim = sd["cls_token"].shape[-1]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}."
        mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": sd[p + "attn.qkv.weight"], "in_proj_bias": sd[p + "attn.qkv.bias"],
                             "out_proj.weight": sd[p + "attn.proj.weight"], "out_proj.bias": sd[p + "attn.proj.bias"]})
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        x = x + sd[p + "ls1.gamma"] * mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "ls2.gamma"] * h
    return F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def test_vit_matches_an_independent_forward():
    model = _tiny()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = _reference_forward(model.state_dict(), x, TINY.heads, TINY.depth)
        torch.testing.assert_close(model(x), expected[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.tokens(x), expected[:, 1:], atol=1e-5, rtol=1e-4)


def test_registry_by_path_and_by_name(tiny_weights):
    spec = create_encoder("vit", weights_path=tiny_weights)           # the folder, as UNI ships
    assert (spec.name, spec.dim, spec.native_px) == ("vit", 64, 224)
    assert spec.module.config.heads == 4                               # from config.json, not 64 // 64
    inline = create_encoder(f"vit:{tiny_weights / 'pytorch_model.bin'}")  # the file, named inline
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(spec.module(x), inline.module(x))
    assert spec.module.tokens(x).shape == (1, 196, 64)
    with pytest.raises(EncoderError, match="needs local weights"):
        create_encoder("vit_large_patch16")                            # never a download
    with pytest.raises(ViTWeightsError, match="is not vit_large_patch16"):
        create_encoder("vit_large_patch16", weights_path=tiny_weights)
    with pytest.raises(ViTWeightsError, match="not found"):
        create_encoder("vit", weights_path=tiny_weights / "nope")


def test_strict_loading_names_bad_keys(tmp_path):
    sd = _tiny().state_dict()
    bad = dict(sd)
    bad.pop("blocks.1.ls2.gamma")
    bad["head.weight"] = torch.zeros(3, 64)
    bad["norm.bias"] = torch.zeros(65)
    with pytest.raises(ViTWeightsError) as err:
        build_vit(bad, infer_config(bad, heads=4))
    msg = str(err.value)
    assert "missing blocks.1.ls2.gamma" in msg and "unexpected head.weight" in msg
    assert "mis-shaped norm.bias (65,) (expected (64,))" in msg
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "wrapped.bin")
    with pytest.raises(ViTWeightsError, match="strip it"):
        load_vit(tmp_path / "wrapped.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(ViTWeightsError, match="cannot be read"):
        load_vit(tmp_path / "junk.bin")
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(ViTWeightsError, match="safetensors"):
        load_vit(tmp_path / "model.safetensors")


def test_pos_embed_resampled_bicubically_for_other_grids():
    """At 112 px (a 7 × 7 grid) the 14 × 14 position embedding is resampled as timm's
    ``resample_abs_pos_embed`` does (bicubic, antialiased, float32, CLS position kept); expected:
    a model built with that resampled embedding as its own 7 × 7 grid."""
    model = _tiny()
    sd = model.state_dict()
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True, align_corners=False)
    sd7 = {**sd, "pos_embed": torch.cat([sd["pos_embed"][:, :1], small.permute(0, 2, 3, 1).reshape(1, 49, -1)], 1)}
    native7 = build_vit(sd7, infer_config(sd7, heads=4))
    assert native7.config.grid == 7
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model.tokens(x), native7.tokens(x), atol=1e-5, rtol=1e-4)
        assert model.tokens(torch.randn(1, 3, 112, 160)).shape == (1, 70, 64)   # non-square: 7 × 10
        assert model.tokens(torch.randn(1, 3, 256, 256)).shape == (1, 256, 64)  # upsampled: 16 × 16


@pytest.mark.parametrize("px", [112, 224])
def test_onnx_export_equals_pytorch(tiny_weights, tmp_path, px):
    from models.fusion import FusionConfig, FusionHead
    from models.runtime import OnnxRuntime, TOLERANCE, TorchRuntime, create_runtime, verification_batch
    from models.scist import TesseraModel

    torch.manual_seed(1)
    n = (px // 16) ** 2
    head = FusionHead(FusionConfig(in_dim=64, n_tokens=n, n_genes=5, n_types=3), torch.rand(3, 5))
    model = TesseraModel(create_encoder("vit", weights_path=tiny_weights), head).eval()
    runtime = create_runtime(model, device=torch.device("cpu"), input_px=px, kind="onnx",
                             cache_dir=tmp_path, version="tiny-vit")
    assert isinstance(runtime, OnnxRuntime) and runtime.verified_difference <= TOLERANCE
    batch = verification_batch(px, n=3)
    got, want = runtime(batch), TorchRuntime(model, torch.device("cpu"))(batch)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4)
    import onnx

    ops = {node.op_type for node in onnx.load(next(tmp_path.glob("*.onnx"))).graph.node}
    assert "Resize" not in ops  # the resampled position embedding is a constant of the graph


def test_real_vit_large_shape(tmp_path):
    """ViT-L/16 as UNI (timm vit_large_patch16_224, init_values 1e-5, num_classes 0): every key of
    UNI's pytorch_model.bin with its shape, 196 tokens at 224 px, pooled width 1024, through the
    registry by path. ~1.2 GB in memory and on disk, a few seconds."""
    import os

    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") < 5 * 2 ** 30:
        pytest.skip("under 5 GiB of free memory for a 300 M-parameter ViT-L")
    with torch.device("meta"):                                    # the layout, before any memory is spent
        layout = {k: tuple(v.shape) for k, v in VisionTransformer(ViTConfig()).state_dict().items()}
    expected = {"cls_token": (1, 1, 1024), "pos_embed": (1, 197, 1024), "patch_embed.proj.weight": (1024, 3, 16, 16),
                "patch_embed.proj.bias": (1024,), "norm.weight": (1024,), "norm.bias": (1024,)}
    for i in range(24):
        p = f"blocks.{i}."
        expected |= {p + "norm1.weight": (1024,), p + "norm1.bias": (1024,), p + "attn.qkv.weight": (3072, 1024),
                     p + "attn.qkv.bias": (3072,), p + "attn.proj.weight": (1024, 1024), p + "attn.proj.bias": (1024,),
                     p + "ls1.gamma": (1024,), p + "norm2.weight": (1024,), p + "norm2.bias": (1024,),
                     p + "mlp.fc1.weight": (4096, 1024), p + "mlp.fc1.bias": (4096,),
                     p + "mlp.fc2.weight": (1024, 4096), p + "mlp.fc2.bias": (1024,), p + "ls2.gamma": (1024,)}
    assert layout == expected and list(layout)[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    assert sum(int(np.prod(v)) for v in layout.values()) == 303_350_784   # ViT-L/16 without a classifier
    gen = torch.Generator().manual_seed(0)
    torch.save({k: torch.empty(v).normal_(0, 0.02, generator=gen) for k, v in layout.items()},
               tmp_path / "pytorch_model.bin")                    # no config.json: heads = 1024 // 64
    spec = create_encoder("vit_large_patch16", weights_path=tmp_path)
    assert (spec.dim, spec.native_px, spec.module.config) == (1024, 224, ViTConfig())
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert spec.module.tokens(x).shape == (1, 196, 1024) and spec.module(x).shape == (1, 1024)


# -- end to end: train-st → predict → evaluate on a tiny generated cohort ---------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two synthetic ST sections (HEST-style: section.h5ad + he.tiff), a single-cell reference,
    and a slide cohort (two slides + a clinical table)."""
    from core.synth.reference import make_reference
    from core.synth.render import render_he
    from core.synth.st import make_section_adata
    from core.synth.tiff import write_pyramidal_tiff
    from core.synth.tissue import layout_tissue, sample_params

    root = tmp_path_factory.mktemp("foundation")
    for i, name in enumerate(["FM-A1", "FM-B1"]):
        rng = np.random.default_rng([11, i])
        tissue = layout_tissue(sample_params(rng), 700.0, 700.0, rng)
        rgb = render_he(tissue, mpp=0.5, rng=rng)
        out = root / "st" / name
        out.mkdir(parents=True)
        write_pyramidal_tiff(out / "he.tiff", rgb, mpp=0.5)
        make_section_adata(name, tissue, rgb, rng, mpp=0.5).write_h5ad(out / "section.h5ad")
    (root / "reference").mkdir()
    make_reference(0, n_cells_per_type=30).write_h5ad(root / "reference" / "reference.h5ad")
    slides = root / "slides"
    slides.mkdir()
    for i in range(2):
        make_slide(slides / f"TCGA-FM-000{i}-01Z-00-DX1.tiff", width=1200, height=900, mpp=0.5, seed=i)
    (root / "clinical.csv").write_text("bcr_patient_barcode,OS,OS.time\nTCGA-FM-0000,1,100\nTCGA-FM-0001,0,200\n")
    return root


def _env(monkeypatch, root: Path) -> None:
    monkeypatch.setenv("TESSERA_MODEL_DIRS", str(root / "models"))
    monkeypatch.setenv("TESSERA_CACHE_DIR", str(root / "cache"))
    monkeypatch.delenv("TESSERA_ENCODER_WEIGHTS", raising=False)


def test_train_predict_evaluate_with_local_vit_weights(cohort, tiny_weights, tmp_path, monkeypatch, capsys, caplog):
    from models.encoder_weights import file_sha256

    root = cohort
    _env(monkeypatch, root)
    weights = tmp_path / "uni"                      # the user's copy of the weights
    shutil.copytree(tiny_weights, weights)
    model_dir = root / "models" / "tiny-vit"
    assert cli(["train-st", "--st", str(root / "st"), "--reference", str(root / "reference" / "reference.h5ad"),
                "--encoder", "vit", "--encoder-weights", str(weights), "--tile-um", "112", "--mpp", "1.0",
                "--epochs", "2", "--cache", str(tmp_path / "features"), "--model-id", "tiny-vit",
                "--out", str(model_dir)]) == 0
    card = json.loads((model_dir / "card.json").read_text())
    record = card["training_data"]["encoder_weights"]
    assert card["encoder"] == "vit" and card["input_px"] == 112
    assert record["path"] == str(weights.resolve()) and record["file"] == "pytorch_model.bin"
    assert record["sha256"] == file_sha256(weights / "pytorch_model.bin")

    store = str(tmp_path / "s.duckdb")
    assert cli(["import", "--slides", str(root / "slides"), "--clinical", str(root / "clinical.csv"),
                "--name", "fm", "--store", store]) == 0
    caplog.set_level(logging.INFO, logger="models.runtime")
    capsys.readouterr()
    assert cli(["predict", "--cohort", "fm", "--model", "tiny-vit", "--store", store, "--workers", "0",
                "--device", "cpu"]) == 0                                   # weights found at the recorded path
    assert "2 predicted" in capsys.readouterr().out
    assert any("runtime: ONNX Runtime" in r.getMessage() for r in caplog.records)   # exported and verified

    other = tmp_path / "other"                                                     # different weights: refused
    save_timm_checkpoint(_tiny(seed=5), other)
    assert cli(["predict", "--cohort", "fm", "--model", "tiny-vit", "--store", store, "--workers", "0",
                "--encoder-weights", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Model 'tiny-vit' cannot be loaded") and "(refused)" in err
    assert "\n" not in err and "Traceback" not in err

    moved = tmp_path / "moved"                                                     # weights moved away
    weights.rename(moved)
    assert cli(["predict", "--cohort", "fm", "--model", "tiny-vit", "--store", store, "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "TESSERA_ENCODER_WEIGHTS" in err and "\n" not in err
    monkeypatch.setenv("TESSERA_ENCODER_WEIGHTS", f"{other}:{moved}")            # a search list: the match wins
    assert cli(["predict", "--cohort", "fm", "--model", "tiny-vit", "--store", store, "--workers", "0"]) == 0
    assert "2 served from the cache" in capsys.readouterr().out

    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--model", "tiny-vit", "--st", str(root / "st"), "--out", str(out),
                "--encoder-weights", str(moved)]) == 0
    report = json.loads(out.read_text())
    assert set(report["sections"]) == {"FM-A1", "FM-B1"}
    assert all(np.isfinite(s["mean_pcc"]) and s["n_spots"] > 5 for s in report["sections"].values())

    from core.engine.modelhub import load_model                                  # weights carried in the folder
    shutil.copytree(moved, model_dir / "encoder")
    card["training_data"]["encoder_weights"]["path"] = "encoder"                 # relative: from the model folder
    (model_dir / "card.json").write_text(json.dumps(card))
    loaded = load_model("tiny-vit", [root / "models"], encoder_search=())
    assert loaded.encoder_weights == str(model_dir / "encoder") and loaded.card["encoder"] == "vit"


def test_train_st_without_weights_is_one_line(cohort, tmp_path, monkeypatch, capsys):
    _env(monkeypatch, cohort)
    assert cli(["train-st", "--st", str(cohort / "st"), "--reference", str(cohort / "reference" / "reference.h5ad"),
                "--encoder", "vit_large_patch16", "--model-id", "x", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --encoder vit_large_patch16 needs --encoder-weights") and "\n" not in err
    assert cli(["train-st", "--st", str(cohort / "st"), "--reference", str(cohort / "reference" / "reference.h5ad"),
                "--encoder", "vit", "--encoder-weights", str(tmp_path / "nowhere"), "--model-id", "x",
                "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_existing_checkpoints_need_no_encoder_weights(monkeypatch, tmp_path):
    """A global TESSERA_ENCODER_WEIGHTS never reaches models whose encoder ships its weights."""
    from core.config import REPO_ROOT
    from core.engine.modelhub import load_model

    monkeypatch.setenv("TESSERA_ENCODER_WEIGHTS", str(tmp_path / "uni"))
    model = load_model("breast-her2st", [REPO_ROOT / "models" / "weights"])
    assert model.encoder_weights is None and model.card["encoder"].startswith("efficientnet_lite")
