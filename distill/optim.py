"""Optimisers and learning-rate schedules: AdamW or Nesterov SGD, linear warm-up then cosine, per update."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def make_optimizer(groups: list[dict], optim, global_batch: int) -> tuple[torch.optim.Optimizer, float]:
    """AdamW or Nesterov SGD over parameter groups (their `lr_scale` is applied by the scheduler); returns the
    optimizer and its peak lr, scaled by global batch / 256 when `optim.scale_lr`."""
    lr = optim.lr * global_batch / 256 if optim.scale_lr else optim.lr
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=optim.betas), lr
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=True), lr


def make_scheduler(optimizer, optim, lr: float, total_updates: int, updates_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up to the peak lr over `optim.warmup_epochs`, then a cosine to `optim.min_lr`, per update."""
    warmup = min(round(optim.warmup_epochs * updates_per_epoch), total_updates - 1)
    # warmup_prefix: the cosine spans the updates after the warm-up, so the warm-up really ends at the peak
    return CosineLRScheduler(optimizer, t_initial=total_updates - warmup, lr_min=optim.min_lr, warmup_t=warmup,
                             warmup_lr_init=min(optim.min_lr, lr), warmup_prefix=True, t_in_epochs=False)
