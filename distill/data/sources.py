"""The data sources by name (the extension point) and load_splits, which turns a data config into train and val."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from distill.data import csvfile, digits, fashion_mnist, hf, imagefolder
from distill.data.images import read_image
from distill.data.splits import Split, long_tail_indices, split_off, stratified_indices
from distill.errors import DistillError
from distill.recipe import DataConfig

_logger = logging.getLogger(__name__)

# Used when the source has no validation split of its own and data.val_fraction is null.
DEFAULT_VAL_FRACTION = 0.2

# name → load(cfg) -> (train, val or None when the source has no validation split of its own). A new source is
# one module with a `load` function, one line here, and its test.
SOURCES: dict[str, Callable[[DataConfig], tuple[Split, Split | None]]] = {
    "fashion-mnist": fashion_mnist.load,
    "digits": digits.load,
    "imagefolder": imagefolder.load,
    "csv": csvfile.load,
    "hf": hf.load,
}


def load_splits(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, val) for a data config; the same config gives the same rows in any process.

    Validation: with `val_fraction` set, a stratified fraction of train (a given val split, e.g.
    Fashion-MNIST's test set or `val_root`, is then not used); with `val_fraction` null, the given
    val split, or a stratified 0.2 of train when the source has none. `subset` then keeps N
    images of each split, stratified.
    """
    train, val = SOURCES[cfg.source](cfg)
    if cfg.val_fraction is not None:
        if val is not None:
            _logger.info("data.val_fraction=%s: validating on a split of train; the given val split is not used",
                         cfg.val_fraction)
        train, val = split_off(train, cfg.val_fraction, cfg.split_seed)
    elif val is None:
        _logger.info("data: %s has no validation split; using a stratified %s of train (data.split_seed=%d)",
                     cfg.source, DEFAULT_VAL_FRACTION, cfg.split_seed)
        train, val = split_off(train, DEFAULT_VAL_FRACTION, cfg.split_seed)
    if cfg.subset is not None:
        train = train.subset(stratified_indices(train.labels, cfg.subset, cfg.split_seed))
        val = val.subset(stratified_indices(val.labels, cfg.subset, cfg.split_seed))
    if cfg.long_tail is not None:
        train = train.subset(long_tail_indices(train.labels, len(train.classes), cfg.long_tail, cfg.split_seed))
    return check_images(train, cfg, "data.root"), check_images(val, cfg, "data.val_root")


def check_images(split: Split, cfg: DataConfig, key: str) -> Split:
    """The split without its unreadable files (data.on_bad_image: skip; they go to `split.skipped`).

    With `error` nothing is decoded here: a bad file stops the run with its name when it is read.
    With `skip` every file is decoded once (the only way to find truncated images), before any training,
    so every process and every stage drops the same rows.
    """
    if split.paths is None or cfg.on_bad_image == "error":
        return split
    bad = []
    for i, path in enumerate(split.paths):
        try:
            read_image(path)
        except DistillError as e:
            bad.append((i, path, str(e)))
    if not bad:
        return split
    keep = np.setdiff1d(np.arange(len(split)), [i for i, _, _ in bad])
    if len(keep) == 0:
        raise DistillError(f"{key}: none of the {len(split)} images can be read (first: {bad[0][2]})")
    kept = split.subset(keep)
    kept.skipped = split.skipped + [(path, why) for _, path, why in bad]
    _logger.warning("%s: skipped %d unreadable image(s) of %d (data.on_bad_image: skip), e.g. %s",
                    key, len(bad), len(split), bad[0][1])
    return kept
