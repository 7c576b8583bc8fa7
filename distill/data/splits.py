"""Splits and selection: the Split container, stratified subsets, k folds, group splits, long tails, val split-off."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from distill.data.images import DEFAULT_MAX_IMAGE_PIXELS, image_size, read_image, to_rgb
from distill.errors import DistillError

# The label of an image that has none (data.unlabeled); such rows are never stratified.
UNLABELED = -1


class Split:
    """One split of a dataset: class names, int64 labels, and RGB uint8 images by index.

    Images live either in memory (`images`, N x H x W [x C] uint8, the builtins) or on disk
    (`paths`, read with PIL on demand). `ids` are the rows' indices in the source split, so
    `describe()` still names the original image after `subset()`. Labels are UNLABELED (-1) in the
    split `load_unlabeled` returns.
    """

    def __init__(
            self,
            classes: Sequence[str],
            labels: Sequence[int] | np.ndarray,
            *,
            images: np.ndarray | None = None,
            paths: Sequence[str] | None = None,
            name: str = "",
            ids: np.ndarray | None = None,
            groups: Sequence[str] | np.ndarray | None = None,
            max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if (images is None) == (paths is None):
            raise ValueError("Split needs exactly one of images or paths")
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skipped: list[tuple[str, str]] = []  # (path, why) of unreadable files left out (on_bad_image: skip)
        self.images = images
        self.paths = None if paths is None else [str(p) for p in paths]
        self.name = name
        self.max_pixels = max_pixels  # data.max_image_pixels, applied when a file is decoded
        self.decode_scaled = True  # data.decode_scaled: False ignores `need` in load (every decode at full size)
        self.cache, self.cache_rows = None, None  # data.cache: the cache, and each row's index in it
        self.ids = np.arange(len(self.labels)) if ids is None else np.asarray(ids, dtype=np.int64)
        self.groups = None if groups is None else np.asarray(groups, dtype=str)  # data.group_column
        if len(self.ids) != len(self.labels) or len(images if paths is None else self.paths) != len(self.labels):
            raise ValueError("Split: images/paths, labels and ids differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "files" if self.paths is not None else "in memory"
        return f"Split({self.name!r}, {len(self)} images, {len(self.classes)} classes, {kind})"

    def load(self, i: int, need: tuple[int, int] | None = None) -> np.ndarray:
        """Image `i` as H x W x 3 uint8 RGB. `need` (width, height): the smallest size the caller's crops need
        (a JPEG may then be decoded at 1/2, 1/4 or 1/8 of its size, distill.data.decode); None: full size."""
        need = need if self.decode_scaled else None
        if self.cache is not None:  # data.cache: the decoded-image cache (distill.data.cache)
            return self.cache.load(self.cache_rows[i], need)
        if self.paths is not None:
            return read_image(self.paths[i], self.max_pixels, need)
        return to_rgb(self.images[i]).copy()

    def scalable(self) -> bool:
        """Whether a `need` can make `load` cheaper: files on disk or the decoded-image cache, data.decode_scaled on.
        Otherwise `size` may cost a decode of its own (an hf dataset's image): load the image whole instead."""
        return self.decode_scaled and (self.paths is not None or self.cache is not None)

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of image `i` as `load(i)` without `need` gives it, from its header (nothing decoded):
        what a view's crop box is drawn from."""
        if self.cache is not None:
            return self.cache.size(self.cache_rows[i])
        if self.paths is not None:
            return image_size(self.paths[i])
        return tuple(self.images[i].shape[:2]) if isinstance(self.images, np.ndarray) else self.load(i).shape[:2]

    def describe(self, i: int) -> str:
        """Where image `i` comes from: its file, or `<source>:<split>:<index>` for builtins."""
        if self.paths is not None:
            return self.paths[i]
        return f"{self.name}:{self.ids[i]}"

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        indices = np.asarray(indices, dtype=np.int64)
        out = Split(
            self.classes, self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[j] for j in indices],
            name=self.name, ids=self.ids[indices], groups=None if self.groups is None else self.groups[indices],
            max_pixels=self.max_pixels,
        )
        out.decode_scaled = self.decode_scaled
        if self.cache is not None:
            out.cache, out.cache_rows = self.cache, self.cache_rows[indices]
        return out


# --- stratified selection -----------------------------------------------------
def stratified_indices(labels: Sequence[int] | np.ndarray, n: int, seed: int, *, leave: int = 0) -> np.ndarray:
    """Sorted indices of `n` rows, per-class proportional, the same for the same (labels, n, seed).

    Counts are rounded by largest remainder, except that every class gets at least one row when
    `n` allows it, so a small subset still sees every class. `leave` rows of each
    class are never taken (a val split leaves a singleton class in train). Within a class the rows
    are a prefix of a permutation seeded by (seed, class position).
    """
    labels = np.asarray(labels)
    if (labels == UNLABELED).any():
        raise ValueError("stratified_indices: unlabeled rows (-1) have no class to stratify by")
    classes, counts = np.unique(labels, return_counts=True)
    caps = np.maximum(counts - leave, 0)
    n = int(min(n, caps.sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    quota = counts * n / counts.sum()
    take = np.minimum(np.floor(quota).astype(np.int64), caps)
    present = caps > 0
    if n >= present.sum():
        # every class shows up, paid for by the classes furthest above their quota
        take[present & (take == 0)] = 1
        while take.sum() > n:
            take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    while take.sum() < n:
        for c in np.argsort(-(quota - take), kind="stable"):
            if take.sum() < n and take[c] < caps[c]:
                take[c] += 1
    picked = []
    for c, (cls, k) in enumerate(zip(classes, take)):
        rows = np.flatnonzero(labels == cls)
        # one generator per class: a class's choice does not depend on the other classes' sizes
        rng = np.random.default_rng([seed, c])
        picked.append(rows[rng.permutation(len(rows))[:k]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def fold_ids(split: Split, k: int, seed: int, key: str = "teacher.folds") -> np.ndarray:
    """Each row's fold in [0, k): stratified by class (scikit-learn's StratifiedKFold), and with groups
    (data.group_column) StratifiedGroupKFold, so a group's rows all fall in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = split.groups
    units = len(split) if groups is None else len(set(groups))
    if units < k:
        raise DistillError(f"{key}: {k} folds need at least {k} {'groups' if groups is not None else 'images'}; "
                           f"the training split has {units}")
    folds = np.empty(len(split), dtype=np.int64)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if groups is None
                else StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    with warnings.catch_warnings():  # "the least populated class has only n members": folds miss that class
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held_out) in enumerate(splitter.split(np.zeros(len(split)), split.labels, groups)):
            folds[held_out] = f
    return folds


def split_by_group(split: Split, fraction: float, seed: int, key: str) -> tuple[Split, Split]:
    """(train, val) with about `fraction` of the rows in val, whole groups only, stratified by class as far as
    groups allow (one fold of a StratifiedGroupKFold with round(1 / fraction) folds)."""
    k = max(2, round(1 / fraction))
    folds = fold_ids(split, k, seed, key)
    return split.subset(np.flatnonzero(folds != 0)), split.subset(np.flatnonzero(folds == 0))


def long_tail_indices(labels: Sequence[int] | np.ndarray, num_classes: int, ratio: float, seed: int) -> np.ndarray:
    """Sorted indices of an exponentially long-tailed selection (Cui et al. 2019's CIFAR-LT profile): class c
    keeps min(n_c, max(1, round(n_max · ratio^(-c / (C - 1))))) rows, n_max the largest class count, so class 0
    keeps the most and the last class n_max / ratio. Within a class, a prefix of a permutation seeded by
    (seed, c)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    n_max = counts.max(initial=0)
    picked = []
    for c in range(num_classes):
        keep = min(counts[c], max(1, round(n_max * ratio ** (-c / max(num_classes - 1, 1)))))
        rows = np.flatnonzero(labels == c)
        picked.append(rows[np.random.default_rng([seed, c]).permutation(len(rows))[:keep]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_off(split: Split, fraction: float, seed: int, key: str = "data.val_fraction") -> tuple[Split, Split]:
    """(train, val): a stratified `fraction` of `split` becomes val."""
    if split.groups is not None:  # data.group_column: whole groups go to val, none is in both splits
        return split_by_group(split, fraction, seed, key)
    n_val = max(1, round(fraction * len(split)))
    val_idx = stratified_indices(split.labels, n_val, seed, leave=1)
    if len(val_idx) == 0:
        raise DistillError(f"{key}: {len(split)} images are too few to split off a validation set; "
                           "add images or give a validation set with data.val_root")
    train_idx = np.setdiff1d(np.arange(len(split)), val_idx)
    return split.subset(train_idx), split.subset(val_idx)
