"""The student's side: a stored view rendered as the student's input, with its label and the teacher's logits."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data import Preprocess
from distill.data.decode import need_for
from distill.errors import DistillError
from distill.loaders import REPEAT_STREAM
from distill.store.augment import augment, check_augment
from distill.store.mixing import NO_PARTNER, mix_views
from distill.store.reader import TargetStore
from distill.store.samples import Samples
from distill.store.shards import REBUILD
from distill.store.views import render, to_tensor


class ReplayDataset(Dataset):
    """(student image of a stored view, label or -1, teacher targets) for every sample.

    The teacher targets are a dict: "logits" float32 [K] (top-k reconstructed) and the row's "logit_mean" and
    "logit_std" over all K float32 logits (scalars), which `kd.teacher_probs` standardises with; from a mixed store
    (`targets.mix`) also "lam" and "partner_label": the image is then the row's mixed view, the logits the
    teacher's on it, and the label term mixes both labels with λ (`kd.student_loss`).

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
        # repeated augmentation (loaders.RepeatedViews) sets epoch e + r · REPEAT_STREAM for copy r of an image:
        # copies take the next stored views after copy 0's, so the R copies in a batch are R different views
        copy, epoch = divmod(self.epoch, REPEAT_STREAM)
        first = int(np.random.default_rng([self.seed, epoch, i]).integers(self.store.views))
        return (first + copy) % self.store.views

    def __getitem__(self, i: int):
        row = self.store.row(i, self.view_of(i), self.temperature, self.standardized)
        # the row's box is known before the image is read: decode only what this model (and an online teacher) needs
        sizes = [self.pre.input_size] + ([self.teacher_pre.input_size] if self.teacher_pre is not None else [])
        image = self.samples.load(i, need_for([row["params"]], sizes))
        x, lam, partner = self.input(image, row, self.pre)
        cached = {key: torch.from_numpy(np.asarray(row[key])) for key in ("logits", "logit_mean", "logit_std")}
        if self.store.mixed:
            # the label term mixes the own and the partner's label with λ at the student's size (a CutMix box is
            # rounded to its pixels); an unmixed row is its own partner with λ = 1
            label = int(row["label"])
            cached["lam"] = torch.tensor(lam, dtype=torch.float32)
            cached["partner_label"] = torch.tensor(label if partner < 0 else int(self.samples.labels[partner]))
        item = (x, int(row["label"]), cached)
        if self.teacher_pre is not None:
            item += (self.input(image, row, self.teacher_pre)[0],)
        return item

    def input(self, image: np.ndarray, row: dict, pre: Preprocess) -> tuple[torch.Tensor, float, int]:
        """(the row's view as this model's normalised input, λ, partner sample or -1): crop, resize, flip, the
        replayed augmentation, and in a mixed store the partner view mixed in (store/mixing.py)."""
        x = to_tensor(self.render(image, row, pre), pre)
        partner = int(row["partner"][0]) if self.store.mixed else NO_PARTNER
        if partner == NO_PARTNER:
            return x, 1.0, NO_PARTNER
        other_row = {k: v[0] for k, v in self.store.views_of([partner], [int(row["partner"][1])]).items()}
        other_image = self.samples.load(partner, need_for([other_row["params"]], pre.input_size))
        other = to_tensor(self.render(other_image, other_row, pre), pre)
        x, lam = mix_views(x, other, row["mix"])
        return x, lam, partner

    def render(self, image: np.ndarray, row: dict, pre: Preprocess) -> np.ndarray:
        """The row's view at this model's size, unmixed: crop, resize, flip, then the replayed augmentation."""
        return augment(render(image, row["params"], pre.input_size, pre.interpolation), self.augment, int(row["seed"]))
