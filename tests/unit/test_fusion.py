"""The fusion head on tiny inputs: shapes, the prior is composition × profiles, and it learns."""
import pytest
import torch

from models.fusion import FusionConfig, FusionHead


def make(**kw):
    torch.manual_seed(0)
    cfg = FusionConfig(in_dim=32, n_tokens=9, n_genes=12, n_types=4, dim=32, heads=4, **kw)
    return FusionHead(cfg, torch.rand(4, 12))


def test_outputs_and_prior():
    head = make().eval()
    out = head(torch.randn(5, 9, 32))
    assert out["expression"].shape == (5, 12) and out["embedding"].shape == (5, 64)
    assert torch.allclose(out["composition"].sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(out["prior"], out["composition"] @ head.profiles, atol=1e-6)


def test_given_composition_is_used():
    head = make(learned_composition=False).eval()
    comp = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    out = head(torch.randn(3, 9, 32), comp)
    assert torch.allclose(out["prior"], head.profiles[0].expand(3, -1))
    with pytest.raises(ValueError, match="composition"):
        head(torch.randn(3, 9, 32))


def test_wrong_token_count_is_explained():
    with pytest.raises(ValueError, match="image tokens"):
        make()(torch.randn(2, 16, 32))


def test_it_fits_a_token_dependent_target():
    torch.manual_seed(1)
    head = make()
    x = torch.randn(64, 9, 32)
    y = x[:, :, :12].mean(1) * 3  # depends on the image tokens, not on the prior
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(head(x)["expression"], y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_fit_fusion_with_given_composition_learns():
    from models.train import fit_fusion

    torch.manual_seed(2)
    head = make(learned_composition=False)
    x, comp = torch.randn(96, 9, 32).half(), torch.softmax(torch.randn(96, 4), 1)
    y = comp @ head.profiles + 3 * x[:, :, :12].float().mean(1)
    before = torch.nn.functional.mse_loss(head.eval()(x.float(), comp)["expression"], y).item()
    history = fit_fusion(head, x, y, composition=comp, epochs=40, lr=3e-3, batch_size=32)
    after = torch.nn.functional.mse_loss(head(x.float(), comp)["expression"], y).item()
    assert not head.training and len(history) == 40 and after < 0.4 * before


def test_half_precision_checkpoint_round_trip(tmp_path):
    from models.scist import ModelCard, load_checkpoint, save_checkpoint

    torch.manual_seed(3)
    cfg = FusionConfig(in_dim=1280, n_tokens=9, n_genes=12, n_types=4, dim=32, heads=4)
    head = FusionHead(cfg, torch.rand(4, 12)).eval()
    card = ModelCard("t", [f"G{i}" for i in range(12)], list("abcd"), "efficientnet_lite0", 112.0, 1.0, 112)
    save_checkpoint(tmp_path / "full", head, card, half=False)
    save_checkpoint(tmp_path / "half", head, card)
    sizes = {k: (tmp_path / k / "model.pt").stat().st_size for k in ("full", "half")}
    assert sizes["half"] < 0.6 * sizes["full"]
    tokens = torch.randn(4, 9, 1280)
    outs = {}
    for k in sizes:
        model, _ = load_checkpoint(tmp_path / k)
        assert all(p.dtype == torch.float32 for p in model.head.parameters())
        with torch.inference_mode():
            outs[k] = model.head(tokens)["expression"]
    assert torch.allclose(outs["half"], outs["full"], atol=2e-2)
