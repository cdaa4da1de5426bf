"""Training loops over tensors handed in by the caller (no slide I/O here)."""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _one_cycle(model: nn.Module, opt, max_lr, n: int, *, epochs: int, batch_size: int, seed: int,
               batch_loss, name: str) -> list[float]:
    """Shuffled mini-batches under a one-cycle schedule for a fixed number of epochs; returns the
    per-epoch mean loss. ``batch_loss(idx, gen)`` gives the loss of the samples ``idx``."""
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (-(-n // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=max(steps, 1))
    history = []
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(n, generator=gen), 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = batch_loss(idx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history.append(total / n)
        log.info("%s epoch %d loss %.4f", name, epoch, history[-1])
    model.eval()
    return history


def fit_fusion(head, tokens: torch.Tensor, targets: torch.Tensor, *, composition: torch.Tensor | None = None,
               true_composition: torch.Tensor | None = None, epochs: int = 30, seed: int = 0,
               batch_size: int = 64, lr: float = 1e-3, prior_weight: float = 0.3,
               composition_weight: float = 1.0) -> list[float]:
    """Fit a :class:`models.fusion.FusionHead` on cached image tokens [N, T, C] (float16 is fine).

    ``composition`` is the head's *input* (nuclei-derived, for heads without a learned
    composition); ``true_composition`` supervises a learned one (synthetic data only). Loss =
    MSE(expression) + ``prior_weight`` × MSE(prior) [+ KL(true ‖ learned composition)]. One-cycle
    schedule over a fixed number of epochs: nothing is chosen on held-out data.

    ``tokens`` may hold several views of every sample, [V, N, T, C] (flips, stain jitter, …): each
    sample of each batch is then drawn from one view at random (augmentation on cached features).
    """
    torch.manual_seed(seed)
    mse = nn.functional.mse_loss
    n = tokens.shape[-3]

    def batch_loss(idx, gen):
        if tokens.ndim == 4:
            x = tokens[torch.randint(tokens.shape[0], (len(idx),), generator=gen), idx]
        else:
            x = tokens[idx]
        out = head(x.float(), None if composition is None else composition[idx])
        loss = mse(out["expression"], targets[idx]) + prior_weight * mse(out["prior"], targets[idx])
        if true_composition is not None:
            comp = out["composition"].clamp_min(1e-6)
            loss = loss + composition_weight * nn.functional.kl_div(
                comp.log(), true_composition[idx], reduction="batchmean")
        return loss

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    return _one_cycle(head, opt, lr, n, epochs=epochs, batch_size=batch_size, seed=seed,
                      batch_loss=batch_loss, name="fusion")


def fit_joint(space, features: torch.Tensor, targets: torch.Tensor, *, epochs: int = 40, seed: int = 0,
              batch_size: int = 256, lr: float = 1e-3) -> list[float]:
    """Fit a :class:`models.joint.JointSpace` on (pooled image features [N, C] or tokens
    [N, T, C], measured profiles [N, G]) pairs by symmetric InfoNCE. The expression tower's
    standardisation (per-gene mean and std of ``targets``) is set first. One-cycle schedule,
    fixed epochs: nothing is chosen on held-out data."""
    torch.manual_seed(seed)
    x = space.pooled(features.float())
    y = targets.float()
    space.gene_mean.copy_(y.mean(dim=0))
    space.gene_std.copy_(y.std(dim=0).clamp_min(1e-2))
    top = y >= torch.quantile(y, 0.9, dim=0)[None, :]
    space.gene_prototypes.copy_((top.T.float() @ y) / top.sum(dim=0).clamp_min(1)[:, None])
    n = len(x)
    if n < 2:
        raise ValueError("a joint space needs at least two training spots")

    def batch_loss(idx, gen):
        if len(idx) < 2:                       # a last batch of one has no negatives
            idx = torch.cat([idx, torch.randint(n, (1,), generator=gen)])
        return space.loss(space.image(x[idx]), space.expression(y[idx]))

    opt = torch.optim.AdamW(space.parameters(), lr=lr, weight_decay=1e-2)
    return _one_cycle(space, opt, lr, n, epochs=epochs, batch_size=min(batch_size, n), seed=seed,
                      batch_loss=batch_loss, name="joint")


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
    random flip/rotation per batch when ``augment``; one-cycle schedule, fixed epochs.
    """
    torch.manual_seed(seed)
    head_params = list(model.out.parameters())
    ids = {id(p) for p in head_params}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
                             {"params": head_params, "lr": head_lr}], weight_decay=1e-4)

    def batch_loss(idx, gen):
        x = patches[idx]
        if augment:
            x = dihedral(x, int(torch.randint(8, (1,), generator=gen)))
        return nn.functional.mse_loss(model(x), targets[idx])

    return _one_cycle(model, opt, [lr, head_lr], len(patches), epochs=epochs, batch_size=batch_size, seed=seed,
                      batch_loss=batch_loss, name="regressor")
