"""The student's side: a stored view rendered as the student's input, with its label and the teacher's logits."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data import Preprocess
from distill.errors import DistillError
from distill.store.reader import TargetStore
from distill.store.samples import Samples
from distill.store.views import render, to_tensor


class ReplayDataset(Dataset):
    """(student image of a stored view, label or -1, teacher logits float32 [K]) for every sample.

    `view="random"` picks one of the random views per sample and epoch (call `set_epoch`);
    `view="center"` always the center view (evaluation, FixRes).
    """

    def __init__(self, store: TargetStore, samples: Samples, pre: Preprocess, view: str = "random", seed: int = 0,
                 teacher_pre: Preprocess | None = None):
        # teacher_pre: also yield the view as the teacher sees it (online distillation)
        if len(samples) != len(store):
            raise DistillError(f"targets: the store at {store.path} has {len(store)} samples, the data "
                               f"{len(samples)}; rebuild it with teach.py --export-only --rebuild-targets")
        self.store, self.samples, self.pre, self.view, self.seed = store, samples, pre, view, seed
        self.teacher_pre = teacher_pre
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def view_of(self, i: int) -> int:
        if self.view == "center":
            return self.store.manifest["center_view"]
        return int(np.random.default_rng([self.seed, self.epoch, i]).integers(self.store.views))

    def __getitem__(self, i: int):
        row = self.store.row(i, self.view_of(i))
        image = self.samples.load(i)
        pixels = render(image, row["params"], self.pre.input_size, self.pre.interpolation)
        item = (to_tensor(pixels, self.pre), int(row["label"]), torch.from_numpy(row["logits"]))
        if self.teacher_pre is not None:
            t = self.teacher_pre
            item += (to_tensor(render(image, row["params"], t.input_size, t.interpolation), t),)
        return item
