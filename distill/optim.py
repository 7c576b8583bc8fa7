"""Optimisers and learning-rate schedules: AdamW or Nesterov SGD; linear warm-up, then cosine, step decay or
reduce-on-plateau, per update."""
from __future__ import annotations

import bisect
import math

import torch
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler


def make_optimizer(groups: list[dict], optim, global_batch: int) -> tuple[torch.optim.Optimizer, float]:
    """AdamW or Nesterov SGD over parameter groups (their `lr_scale` is applied by the scheduler); returns the
    optimizer and its peak lr, scaled by global batch / 256 when `optim.scale_lr`."""
    lr = optim.lr * global_batch / 256 if optim.scale_lr else optim.lr
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=optim.betas), lr
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=True), lr


def make_scheduler(optimizer, optim, lr: float, total_updates: int, updates_per_epoch: int) -> Scheduler:
    """Linear warm-up to the peak lr over `optim.warmup_epochs`, then `optim.schedule`, per update: a cosine to
    `optim.min_lr` (timm's), or `DecayScheduler`'s step decay or reduce-on-plateau.

    The loops call `step_update(updates done)` after every update and `step(epoch, score)` after an evaluation
    (`training.schedule_after_eval`), which only the plateau schedule reads."""
    warmup = min(round(optim.warmup_epochs * updates_per_epoch), total_updates - 1)
    start = min(optim.min_lr, lr)
    if optim.schedule == "cosine":
        # warmup_prefix: the cosine spans the updates after the warm-up, so the warm-up really ends at the peak
        return CosineLRScheduler(optimizer, t_initial=total_updates - warmup, lr_min=optim.min_lr, warmup_t=warmup,
                                 warmup_lr_init=start, warmup_prefix=True, t_in_epochs=False)
    if optim.schedule == "step":
        if optim.step_epochs:
            at = [round(e * updates_per_epoch) for e in optim.step_epochs]
        else:
            every = max(optim.step_every * updates_per_epoch, 1.0)  # at most one decay per update
            at = [round(k * every) for k in range(1, math.ceil(total_updates / every))]
        return DecayScheduler(optimizer, updates_per_epoch, at, optim.step_gamma, warmup, start, optim.min_lr)
    return DecayScheduler(optimizer, updates_per_epoch, [], optim.plateau_gamma, warmup, start, optim.min_lr,
                          patience=optim.plateau_patience)


class DecayScheduler(Scheduler):
    """Step decay and reduce-on-plateau after a linear warm-up, per update t (updates done):

        lr(t) = init + (peak - init) · t / W                   t < W (the warm-up)
        lr(t) = max(peak · γ^(s(t) + p), min_lr)               t ≥ W

    where s(t) counts the milestones (in updates from the start, warm-up included) ≤ t, and p the plateau
    decays so far: one each time `patience` evaluations in a row score no better than the best (`step(epochs
    done, score)`, higher is better; evaluations that end in the warm-up do not count). That is torch's
    ReduceLROnPlateau with threshold 0 and no cooldown. Parameter groups keep their `lr_scale` (layer decay).

    The plateau state (best score, evaluations since it, decays) lives in the optimizer's first parameter group,
    as timm keeps `initial_lr` there: accelerate's save_state saves it with the optimizer and load_state brings it
    back, so a resumed run continues the plateau logic where it stopped (timm's PlateauLRScheduler loses it).
    """

    def __init__(self, optimizer, updates_per_epoch: int, milestones: list[int], gamma: float, warmup_t: int,
                 warmup_lr_init: float, lr_min: float, patience: int | None = None):
        super().__init__(optimizer, "lr", t_in_epochs=False, initialize=True)
        self.updates_per_epoch, self.milestones, self.gamma = updates_per_epoch, sorted(milestones), gamma
        self.warmup_t, self.warmup_lr_init, self.lr_min, self.patience = warmup_t, warmup_lr_init, lr_min, patience
        optimizer.param_groups[0].setdefault("plateau", {"best": -math.inf, "stale": 0, "decays": 0})
        self.update_groups(self._get_lr(0))

    @property
    def plateau(self) -> dict:
        # looked up each time: loading an optimizer state replaces the parameter groups
        return self.optimizer.param_groups[0]["plateau"]

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + (v - self.warmup_lr_init) * t / self.warmup_t for v in self.base_values]
        decays = bisect.bisect_right(self.milestones, t) + self.plateau["decays"]
        return [max(v * self.gamma ** decays, self.lr_min) for v in self.base_values]

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.update_groups(self._get_lr(num_updates))

    def step(self, epoch: int, metric: float | None = None) -> None:
        """The score (higher is better) of the evaluation after `epoch` epochs: the plateau schedule decays after
        `patience` stale ones."""
        updates = epoch * self.updates_per_epoch
        if self.patience is None or metric is None or updates < self.warmup_t:
            return
        state = self.plateau
        if metric > state["best"]:
            state["best"], state["stale"] = float(metric), 0
            return
        state["stale"] += 1
        if state["stale"] >= self.patience:
            state["stale"], state["decays"] = 0, state["decays"] + 1
            self.update_groups(self._get_lr(updates))
