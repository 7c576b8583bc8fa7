"""The data sources by name (the extension point) and load_splits, which turns a data config into train and val."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from distill.data import csvfile, digits, fashion_mnist, hf, imagefolder
from distill.data.headers import check_files
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
    # before any training: a bad file found hours in, or a run directory written for a run that cannot start
    train, val = check_images(cfg, (train, "data.root"), (val, "data.val_root" if cfg.val_root else "data.root"))
    warn_missing_classes(train, val)
    return train, val


def check_images(cfg: DataConfig, *splits: tuple[Split, str]) -> list[Split]:
    """The (split, its config key) pairs, every image checked before any training (distill.data.headers: each
    file's header and end, nothing decoded, cached per file; an hf dataset's image bytes alike).

    A bad file, with data.on_bad_image `error`: one DistillError naming the first and how many there are in all;
    with `skip`: each split without them (they go to `split.skipped`), the same rows in every process and stage.
    A file that passes the check and still fails to decode (corrupt data inside) stops the run when it is read,
    with its name and the skip hint (read_image).
    """
    for split, _ in splits:
        split.max_pixels = cfg.max_image_pixels  # the decode applies the limit the header check did
        split.decode_scaled = cfg.decode_scaled
    found = [_bad_images(split, cfg) for split, _ in splits]
    misnamed = [(key, names[i], fmt) for (_, key), (names, _, wrong) in zip(splits, found) for i, fmt in wrong]
    if misnamed:
        key, name, fmt = misnamed[0]
        _logger.warning("%s: %d file(s) hold another format than their extension says, e.g. %s (%s); read by "
                        "their content", key, len(misnamed), name, fmt)
    found = [(names, bad) for names, bad, _ in found]
    total = sum(len(bad) for _, bad in found)
    if total and cfg.on_bad_image == "error":
        (_, key), (names, bad) = next((s, f) for s, f in zip(splits, found) if f[1])
        i, why = bad[0]
        raise DistillError(f"{key}: {names[i]}: {why}; {total} bad image file(s) in all; fix or remove it, or set "
                           "data.on_bad_image: skip to leave such files out")
    return [_without(split, key, names, bad) for (split, key), (names, bad) in zip(splits, found)]


def _bad_images(split: Split, cfg: DataConfig) -> tuple[list[str], list[tuple[int, str]], list[tuple[int, str]]]:
    """(each row's name, (index, why) of its bad images, (index, format) of its misnamed files)."""
    if split.paths is not None:
        bad, misnamed = check_files(split.paths, cfg.max_image_pixels)
        names = split.paths
    elif isinstance(split.images, hf.Images):
        bad, misnamed = hf.check_headers(split.images, cfg.max_image_pixels), []
        names = [f"{split.images.name}:{row}" for row in split.images.rows]
    else:
        return [], [], []
    return names, bad, misnamed


def _without(split: Split, key: str, names: list[str], bad: list[tuple[int, str]]) -> Split:
    if not bad:
        return split
    keep = np.setdiff1d(np.arange(len(split)), [i for i, _ in bad])
    if len(keep) == 0:
        raise DistillError(f"{key}: none of the {len(split)} images can be read (first: {names[bad[0][0]]}: "
                           f"{bad[0][1]})")
    kept = split.subset(keep)
    kept.skipped = split.skipped + [(names[i], why) for i, why in bad]
    _logger.warning("%s: skipped %d unreadable image(s) of %d (data.on_bad_image: skip), e.g. %s",
                    key, len(bad), len(split), names[bad[0][0]])
    return kept


def warn_missing_classes(train: Split, val: Split) -> None:
    """One warning line when a training class has no validation image: macro_f1 leaves it out (it is over the
    classes present in the validation labels) and its per-class recall is None."""
    missing = np.setdiff1d(np.unique(train.labels[train.labels >= 0]), np.unique(val.labels))
    if len(missing):
        names = ", ".join(train.classes[c] for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        _logger.warning("data: %d of %d classes have training images but no validation image (%s); macro_f1 is "
                        "over the classes present in the validation labels", len(missing), len(train.classes),
                        names)
