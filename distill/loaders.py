"""Data loaders: the resumable epoch order (EpochSampler, with repeated augmentation), the loader, and each batch's
mixing generator."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from distill import threads

# repeat r >= 1 of an image in epoch e is drawn as the image in the epoch stream e + r · REPEAT_STREAM: no real epoch
# gets there (np.random.SeedSequence takes any non-negative integer)
REPEAT_STREAM = 2**32


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's sample order, drawn from (seed, epoch) alone (call `set_epoch`), unlike a RandomSampler's
    generator whose state carries over from epoch to epoch: a run resumed in epoch e sees the order it would
    have seen.

    `balance` (with each sample's class in `classes`): "oversample" draws n samples with replacement, every
    class equally likely; "undersample" takes, without replacement, the rarest class's count from every class.

    `repeats` R > 1 (repeated augmentation, Hoffer et al. 2020; DeiT's RASampler, timm's RepeatAugSampler): the
    epoch keeps its length m but holds the first ⌈m / R⌉ samples of that order, each R times, as (sample, r)
    pairs with r = 0 … R-1 (`RepeatedViews` draws each copy's augmentation apart). As in DeiT the copies of a
    sample go to different processes: with `world_size` W processes and `batch_size` B per process, each
    global batch of W·B positions is filled so that process p gets the DeiT list's positions p, p + W, … (the
    prepared loader gives the global batch's p-th B-slice to process p); one process gets them side by side.
    """

    def __init__(self, n: int, seed: int, classes: np.ndarray | None = None, balance: str = "none",
                 repeats: int = 1, batch_size: int = 1, world_size: int = 1):
        self.n, self.seed, self.epoch, self.balance = n, seed, 0, balance
        self.repeats, self.batch_size, self.world_size = repeats, batch_size, world_size
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
        if self.repeats == 1:
            return iter(order.tolist())
        return iter(self.repeated(order))

    def repeated(self, order: np.ndarray) -> list[tuple[int, int]]:
        m, r, w, b = len(order), self.repeats, self.world_size, self.batch_size
        deit = [(int(i), c) for i in order[:math.ceil(m / r)] for c in range(r)][:m]
        whole = m // (w * b) * (w * b)  # the global batches; the rest stays in order (dropped or spread alike)
        spread = [deit[g + j * w + p] for g in range(0, whole, w * b) for p in range(w) for j in range(b)]
        return spread + deit[whole:]


class RepeatedViews(Dataset):
    """A training dataset whose items are drawn from (seed, epoch, i) (`ImageDataset`, `ReplayDataset`), read by
    (i, r) pairs (`EpochSampler` with repeats): copy r of image i in epoch e is the dataset's item i drawn in the
    epoch stream e + r · 2^32, so r = 0 is the plain item and every other copy another draw: another
    augmentation (teacher), another of the store's views (students: `ReplayDataset.view_of` takes the views after
    copy 0's, all different while R <= targets.views). The stream is set on the dataset under any `Subset` around
    it for the one item."""

    def __init__(self, dataset):
        self.dataset, self.base = dataset, dataset
        while isinstance(self.base, Subset):
            self.base = self.base.dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: tuple[int, int]):
        i, r = index
        if r == 0:
            return self.dataset[i]
        epoch = self.base.epoch
        self.base.set_epoch(epoch + r * REPEAT_STREAM)
        try:
            return self.dataset[i]
        finally:
            self.base.set_epoch(epoch)


def make_loader(dataset, batch_size: int, recipe, train: bool, world_size: int = 1, seed: int | None = None,
                classes: np.ndarray | None = None, balance: str = "none", repeats: int = 1) -> DataLoader:
    """A loader; training draws its order by (seed, epoch) (`set_epoch` on the prepared loader), class-balanced
    with `balance`, with `repeats` differently augmented copies of each image (`EpochSampler`, `RepeatedViews`),
    and drops the last partial batch when there is more than one, because BatchNorm cannot train on a batch of
    one."""
    seed = recipe.seed if seed is None else seed
    threads.workers_note(recipe.data.num_workers)
    sampler = EpochSampler(len(dataset), seed, classes, balance, repeats, batch_size, world_size) if train else None
    return DataLoader(
        RepeatedViews(dataset) if train and repeats > 1 else dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size * world_size,
        num_workers=recipe.data.num_workers,
        # a worker computes on one thread (torch and OpenCV), the main process on its `threads`: up to threads +
        # num_workers busy threads. Chosen so: a worker sleeps once its prefetched batches wait, so taking CPUs from
        # the main process would slow every step for an occasional overlap; `workers_note` says so once when the
        # sum exceeds the CPUs on a CPU-only run, where the main threads do the compute.
        worker_init_fn=threads.worker_init,
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
