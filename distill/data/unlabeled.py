"""Unlabeled images (data.unlabeled): a folder of images, or the unused train images of a built-in source."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.data.images import IMAGE_EXTENSIONS, image_files
from distill.data.sources import SOURCES, check_images
from distill.data.splits import UNLABELED, Split
from distill.errors import DistillError
from distill.recipe import DataConfig

# sources whose train split can hold more rows than data.subset keeps: `rest` is the rows left out
_BUILTINS = ("fashion-mnist", "digits", "hf")


def load_unlabeled(cfg: DataConfig, train: Split, val: Split) -> Split | None:
    """Extra images without labels (all UNLABELED) from data.unlabeled; None when it is not set.

    "rest" is the built-in source's train images that neither `train` nor `val` uses (what
    data.subset left out), with their source rows as ids; anything else is a folder of images,
    searched recursively. data.unlabeled_subset then keeps N of them, a seeded random choice.
    The split keeps train's classes, so the class count is known.
    """
    if cfg.unlabeled is None:
        if cfg.unlabeled_subset is not None:
            raise DistillError("data.unlabeled_subset: set without data.unlabeled; give data.unlabeled "
                               "(a folder of images, or 'rest') or remove it")
        return None
    if cfg.unlabeled == "rest":
        return _unlabeled_rest(cfg, train, val)
    folder = Path(cfg.unlabeled).expanduser()
    if not cfg.unlabeled.strip() or not folder.is_dir():
        raise DistillError(f"data.unlabeled: folder {cfg.unlabeled!r} does not exist; give a folder of "
                           "images, or 'rest' for the unused train images of a built-in source")
    paths = image_files(folder)
    if not paths:
        raise DistillError(f"data.unlabeled: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; "
                           "add images or point it at another folder")
    keep = _unlabeled_rows(len(paths), cfg)
    unlabeled = Split(train.classes, np.full(len(keep), UNLABELED), paths=[paths[i] for i in keep],
                      name=str(folder), ids=keep)
    return check_images(cfg, (unlabeled, "data.unlabeled"))[0]


def _unlabeled_rest(cfg: DataConfig, train: Split, val: Split) -> Split:
    if cfg.source not in _BUILTINS:
        raise DistillError(f"data.unlabeled: 'rest' means the unused train images of a built-in or hf source "
                           f"({', '.join(_BUILTINS)}); with data.source {cfg.source} give a folder of images "
                           "instead (./rest for a folder named rest)")
    source, _ = SOURCES[cfg.source](cfg)  # cheap again: the idx files are cached
    # val_fraction carves val out of the same source split, so its rows are used too
    used = [s.ids for s in (train, val) if s.name == source.name]
    rows = np.setdiff1d(source.ids, np.concatenate(used)) if used else source.ids
    if len(rows) == 0:
        raise DistillError(f"data.unlabeled: 'rest' is empty, train and validation use all {len(source)} "
                           f"images of {source.name}; set data.subset to leave some out, or give a folder "
                           "of images")
    rows = rows[_unlabeled_rows(len(rows), cfg)]
    # a builtin source split's ids are its row positions
    rest = Split(train.classes, np.full(len(rows), UNLABELED), images=source.images[rows], name=source.name, ids=rows)
    return check_images(cfg, (rest, "data.unlabeled"))[0]  # an hf dataset's image bytes; builtins are arrays


def _unlabeled_rows(n: int, cfg: DataConfig) -> np.ndarray:
    """Sorted indices of data.unlabeled_subset of `n` rows (all of them when unset or larger)."""
    k = cfg.unlabeled_subset
    if k is None or k >= n:
        return np.arange(n)
    # plain random, not stratified: there are no labels to stratify by
    return np.sort(np.random.default_rng(cfg.split_seed).choice(n, size=k, replace=False))
