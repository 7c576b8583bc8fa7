"""Data loaders: the resumable epoch order (EpochSampler), the loader, and each batch's mixing generator."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's sample order, drawn from (seed, epoch) alone (call `set_epoch`), unlike a RandomSampler's
    generator whose state carries over from epoch to epoch: a run resumed in epoch e sees the order it would
    have seen.

    `balance` (with each sample's class in `classes`): "oversample" draws n samples with replacement, every
    class equally likely; "undersample" takes, without replacement, the rarest class's count from every class.
    """

    def __init__(self, n: int, seed: int, classes: np.ndarray | None = None, balance: str = "none"):
        self.n, self.seed, self.epoch, self.balance = n, seed, 0, balance
        if balance != "none":
            self.classes = np.asarray(classes)
            present, counts = np.unique(self.classes, return_counts=True)
            self.groups = [np.flatnonzero(self.classes == c) for c in present]
            self.weights = 1.0 / counts[np.searchsorted(present, self.classes)]
            self.weights /= self.weights.sum()
            self.per_class = int(counts.min())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups) * self.per_class if self.balance == "undersample" else self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.balance == "oversample":
            order = rng.choice(self.n, size=self.n, p=self.weights)
        elif self.balance == "undersample":
            order = rng.permutation(np.concatenate([rng.choice(g, self.per_class, replace=False)
                                                    for g in self.groups]))
        else:
            order = rng.permutation(self.n)
        return iter(order.tolist())


def make_loader(dataset, batch_size: int, recipe, train: bool, world_size: int = 1, seed: int | None = None,
                classes: np.ndarray | None = None, balance: str = "none") -> DataLoader:
    """A loader; training draws its order by (seed, epoch) (`set_epoch` on the prepared loader), class-balanced
    with `balance` (`EpochSampler`), and drops the last partial batch when there is more than one, because
    BatchNorm cannot train on a batch of one."""
    seed = recipe.seed if seed is None else seed
    sampler = EpochSampler(len(dataset), seed, classes, balance) if train else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size * world_size,
        num_workers=recipe.data.num_workers,
        # not persistent: workers must see each epoch's set_epoch() (views and augmentations change per epoch)
        persistent_workers=False,
        # the workers' base seed is drawn from here, not from torch's global generator, whose state a resumed
        # run restores (accelerate's RNG state) and must not see consumed differently
        generator=torch.Generator().manual_seed(seed),
    )


def batch_rng(seed: int, process: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's MixUp/CutMix draw: a function of where the batch is, not of what ran
    before it, so a resumed run mixes as the interrupted one would have."""
    return np.random.default_rng([seed, process, epoch, batch])
