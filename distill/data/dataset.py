"""The torch dataset: a split's (transformed image, label) pairs, with per-image seeded augmentation."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distill.data.splits import Split


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) pairs of a split; picklable for DataLoader workers.

    With a `seed` (training), image i's random augmentation in epoch e is drawn from (seed, e, i) alone: the
    same whichever process or DataLoader worker loads it, so results do not depend on `num_workers` or on the
    number of processes, and a resumed run sees exactly the images the interrupted one would have.
    """

    def __init__(self, split: Split, transform: Callable[[np.ndarray], torch.Tensor], seed: int | None = None):
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.seed is not None:
            self.transform.set_seed([self.seed, self.epoch, i])
        return self.transform(self.split.load(i)), int(self.split.labels[i])
