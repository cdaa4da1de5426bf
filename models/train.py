"""Training loops over tensors handed in by the caller (no slide I/O here)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from models.scist import ReferenceInformedHead

log = logging.getLogger(__name__)


def fit_head(
    head: ReferenceInformedHead,
    feats: torch.Tensor,
    targets: torch.Tensor,
    *,
    composition: torch.Tensor | None = None,
    epochs: int = 200,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    prior_weight: float = 0.3,
    composition_weight: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Fit the head on cached encoder features; returns the per-epoch training loss.

    Loss = MSE(expression) + ``prior_weight`` × MSE(prior) (keeps the reference prior meaningful)
    + ``composition_weight`` × KL(true ‖ predicted composition) when a composition is given
    (synthetic data only; real ST has none). A fixed number of epochs: no test data is seen.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    mse = nn.MSELoss()
    n = len(feats)
    history = []
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            out = head(feats[idx])
            loss = mse(out["expression"], targets[idx]) + prior_weight * mse(out["prior"], targets[idx])
            if composition is not None:
                comp = out["composition"].clamp_min(1e-6)
                loss = loss + composition_weight * nn.functional.kl_div(comp.log(), composition[idx], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        history.append(total / n)
        if epoch % 50 == 0 or epoch == epochs - 1:
            log.info("epoch %d loss %.4f", epoch, history[-1])
    head.eval()
    return history
