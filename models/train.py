"""Training loops over tensors handed in by the caller (no slide I/O here)."""
from __future__ import annotations

import logging

import torch
from torch import nn


log = logging.getLogger(__name__)


def fit_fusion(head, tokens: torch.Tensor, targets: torch.Tensor, *, composition: torch.Tensor | None = None,
               true_composition: torch.Tensor | None = None, epochs: int = 30, seed: int = 0,
               batch_size: int = 64, lr: float = 1e-3, prior_weight: float = 0.3,
               composition_weight: float = 1.0) -> list[float]:
    """Fit a :class:`models.fusion.FusionHead` on cached image tokens [N, T, C] (float16 is fine).

    ``composition`` is the head's *input* (nuclei-derived, for heads without a learned
    composition); ``true_composition`` supervises a learned one (synthetic data only). Loss =
    MSE(expression) + ``prior_weight`` × MSE(prior) [+ KL(true ‖ learned composition)]. One-cycle
    schedule over a fixed number of epochs: nothing is chosen on held-out data.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    steps = epochs * (-(-len(tokens) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    mse = nn.functional.mse_loss
    history = []
    head.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(tokens), generator=gen), 0.0
        for start in range(0, len(tokens), batch_size):
            idx = order[start:start + batch_size]
            out = head(tokens[idx].float(), None if composition is None else composition[idx])
            loss = mse(out["expression"], targets[idx]) + prior_weight * mse(out["prior"], targets[idx])
            if true_composition is not None:
                comp = out["composition"].clamp_min(1e-6)
                loss = loss + composition_weight * nn.functional.kl_div(
                    comp.log(), true_composition[idx], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / len(tokens))
        log.info("fusion epoch %d loss %.4f", epoch, history[-1])
    head.eval()
    return history


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of images [B, H, W, C] (k in 0..7); H&E has no orientation."""
    if k >= 4:
        x = x.flip(2)
    return torch.rot90(x, k % 4, dims=(1, 2))


def fit_regressor(model: nn.Module, patches: torch.Tensor, targets: torch.Tensor, *, epochs: int = 4,
                  seed: int = 0, batch_size: int = 32, lr: float = 3e-4, head_lr: float = 3e-3,
                  augment: bool = True) -> list[float]:
    """Train an end-to-end CNN regressor (ST-Net-like) on uint8 patches [N, H, W, 3].

    Every layer is trained (the backbone at ``lr``, the new output layer at ``head_lr``), with a
    random flip/rotation per batch when ``augment``; cosine schedule, fixed epochs.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head_params = list(model.out.parameters())
    ids = {id(p) for p in head_params}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
                             {"params": head_params, "lr": head_lr}], weight_decay=1e-4)
    steps = epochs * (-(-len(patches) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, head_lr], total_steps=max(steps, 1))
    history = []
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(patches), generator=gen), 0.0
        for start in range(0, len(patches), batch_size):
            idx = order[start:start + batch_size]
            x = patches[idx]
            if augment:
                x = dihedral(x, int(torch.randint(8, (1,), generator=gen)))
            loss = nn.functional.mse_loss(model(x), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / len(patches))
        log.info("regressor epoch %d loss %.4f", epoch, history[-1])
    model.eval()
    return history
