"""The torch dataset: a split's (transformed image, label) pairs, with per-image seeded augmentation."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distill.data.decode import transform_need
from distill.data.splits import Split


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) pairs of a split; picklable for DataLoader workers.

    With a `seed` (training), image i's random augmentation in epoch e is drawn from (seed, e, i) alone: the
    same whichever process or DataLoader worker loads it, so results do not depend on `num_workers` or on the
    number of processes, and a resumed run sees exactly the images the interrupted one would have.

    A JPEG is decoded only as large as the transform's first resize needs (`decode.transform_need`: the eval
    resize of the shorter side, a RandomResizedCrop's smallest box; data.decode_scaled).
    """

    def __init__(self, split: Split, transform: Callable[[np.ndarray], torch.Tensor], seed: int | None = None):
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.need = transform_need(transform)  # (width, height), a function of the image's (height, width), or None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.seed is not None:
            self.transform.set_seed([self.seed, self.epoch, i])
        return self.transform(self.split.load(i, self.need_of(i))), int(self.split.labels[i])

    def need_of(self, i: int) -> tuple[int, int] | None:
        if not callable(self.need):
            return self.need
        # a random crop's need depends on the image's size: read from its header, only where a decode can use it
        return self.need(*self.split.size(i)) if self.split.scalable() else None
