"""The student's side: a stored view rendered as the student's input, with its label and the teacher's logits."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data import Preprocess
from distill.errors import DistillError
from distill.store.augment import augment, check_augment
from distill.store.reader import TargetStore
from distill.store.samples import Samples
from distill.store.shards import REBUILD
from distill.store.views import render, to_tensor


class ReplayDataset(Dataset):
    """(student image of a stored view, label or -1, teacher targets) for every sample.

    The teacher targets are a dict: "logits" float32 [K] (top-k reconstructed) and the row's "logit_mean" and
    "logit_std" over all K float32 logits (scalars), which `kd.teacher_probs` standardises with.

    `temperature` / `standardized`: the student's KD temperature and `kd.standardize`, for which a top-k store
    rebuilds the tail (`TargetStore.rows`).
    `view="random"` picks one of the random views per sample and epoch (call `set_epoch`);
    `view="center"` always the center view (evaluation, FixRes).
    """

    def __init__(self, store: TargetStore, samples: Samples, pre: Preprocess, view: str = "random", seed: int = 0,
                 teacher_pre: Preprocess | None = None, temperature: float = 1.0, standardized: bool = False):
        # teacher_pre: also yield the view as the teacher sees it (online distillation)
        if len(samples) != len(store):
            raise DistillError(f"targets: the store at {store.path} has {len(store)} samples, the data "
                               f"{len(samples)}; rebuild it with {REBUILD}")
        self.store, self.samples, self.pre, self.view, self.seed = store, samples, pre, view, seed
        self.teacher_pre = teacher_pre
        # the student's distillation temperature (and whether it standardises): a top-k store rebuilds each row's
        # tail so that its mass is right at that temperature
        self.temperature, self.standardized = temperature, standardized
        self.epoch = 0
        # the store's own augmentation (targets.augment when it was exported), replayed from each row's seed
        self.augment = check_augment(store.manifest["view_spec"].get("augment"), "the store's view_spec.augment")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def view_of(self, i: int) -> int:
        if self.view == "center":
            return self.store.manifest["center_view"]
        return int(np.random.default_rng([self.seed, self.epoch, i]).integers(self.store.views))

    def __getitem__(self, i: int):
        row = self.store.row(i, self.view_of(i), self.temperature, self.standardized)
        image = self.samples.load(i)
        pixels = self.render(image, row, self.pre)
        cached = {key: torch.from_numpy(np.asarray(row[key])) for key in ("logits", "logit_mean", "logit_std")}
        item = (to_tensor(pixels, self.pre), int(row["label"]), cached)
        if self.teacher_pre is not None:
            t = self.teacher_pre
            item += (to_tensor(self.render(image, row, t), t),)
        return item

    def render(self, image: np.ndarray, row: dict, pre: Preprocess) -> np.ndarray:
        """The row's view at this model's size: crop, resize, flip, then the replayed augmentation."""
        return augment(render(image, row["params"], pre.input_size, pre.interpolation), self.augment, int(row["seed"]))
