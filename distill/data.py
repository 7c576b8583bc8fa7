"""Datasets (fashion-mnist, digits, imagefolder, csv), unlabeled images, stratified splits and subsets, albumentations pipelines."""
from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import gzip
import inspect
import logging
import os
import random
import socket
import struct
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pydantic
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from distill.errors import DistillError
from distill.recipe import DataConfig

_logger = logging.getLogger(__name__)

# Where Fashion-MNIST is looked for after data.root and $DISTILL_DATA (module constants so tests can move them).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/distill/fashion-mnist").expanduser()
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Used when the source has no validation split of its own and data.val_fraction is null.
DEFAULT_VAL_FRACTION = 0.2
# The label of an image that has none (data.unlabeled); such rows are never stratified.
UNLABELED = -1


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its pixels: the size it sees, its normalisation, its resize."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # nearest | bilinear | bicubic | area
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, then center-crop input_size


# --- splits -------------------------------------------------------------------
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
    ):
        if (images is None) == (paths is None):
            raise ValueError("Split needs exactly one of images or paths")
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skipped: list[tuple[str, str]] = []  # (path, why) of unreadable files left out (on_bad_image: skip)
        self.images = images
        self.paths = None if paths is None else [str(p) for p in paths]
        self.name = name
        self.ids = np.arange(len(self.labels)) if ids is None else np.asarray(ids, dtype=np.int64)
        self.groups = None if groups is None else np.asarray(groups, dtype=str)  # data.group_column
        if len(self.ids) != len(self.labels) or len(images if paths is None else self.paths) != len(self.labels):
            raise ValueError("Split: images/paths, labels and ids differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "files" if self.paths is not None else "in memory"
        return f"Split({self.name!r}, {len(self)} images, {len(self.classes)} classes, {kind})"

    def load(self, i: int) -> np.ndarray:
        """Image `i` as H x W x 3 uint8 RGB."""
        if self.paths is not None:
            return read_image(self.paths[i])
        return to_rgb(self.images[i]).copy()

    def describe(self, i: int) -> str:
        """Where image `i` comes from: its file, or `<source>:<split>:<index>` for builtins."""
        if self.paths is not None:
            return self.paths[i]
        return f"{self.name}:{self.ids[i]}"

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        indices = np.asarray(indices, dtype=np.int64)
        return Split(
            self.classes, self.labels[indices],
            images=None if self.images is None else self.images[indices],
            paths=None if self.paths is None else [self.paths[j] for j in indices],
            name=self.name, ids=self.ids[indices], groups=None if self.groups is None else self.groups[indices],
        )


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey → 3 equal channels (so RGB models accept it), RGBA → RGB; a 3-channel image is returned as is."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3] if image.shape[2] == 4 else image


def read_image(path: str | os.PathLike) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                # 16-bit grey (PNG, TIFF): PIL's convert("RGB") clips to 255 instead of scaling.
                grey = np.clip(np.asarray(img, dtype=np.float32), 0, 65535) / 257
                return to_rgb(np.round(grey).astype(np.uint8))
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DistillError(f"{path}: cannot read image ({e}); fix or remove the file") from None


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


# --- sources ------------------------------------------------------------------
def load_splits(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, val) for a data config; the same config gives the same rows in any process.

    Validation: with `val_fraction` set, a stratified fraction of train (a given val split, e.g.
    Fashion-MNIST's test set or `val_root`, is then not used); with `val_fraction` null, the given
    val split, or a stratified 0.2 of train when the source has none. `subset` then keeps N
    images of each split, stratified.
    """
    train, val = _SOURCES[cfg.source](cfg)
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


def _load_fashion_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    if cfg.val_root is not None:
        raise DistillError("data.val_root: not used with data.source fashion-mnist (its test set is the "
                           "validation split); remove it, or set data.val_fraction to split train instead")
    folder = find_fashion_mnist(cfg.root)
    splits = []
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images_path, labels_path = _idx_path(folder, images_file), _idx_path(folder, labels_file)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= 10:
            raise DistillError(f"{images_path}: does not match {labels_path.name} as Fashion-MNIST "
                               f"(images {images.shape}, labels {labels.shape}); replace the files")
        splits.append(Split(FASHION_MNIST_CLASSES, labels, images=images, name=f"fashion-mnist:{split}"))
    return splits[0], splits[1]


def find_fashion_mnist(root: str | None) -> Path:
    """The folder holding the four idx files: data.root, else $DISTILL_DATA, the system copy, the cache."""
    if root is not None:
        base = Path(root).expanduser()
        if not base.exists():
            raise DistillError(f"data.root: {base} does not exist; point it at a folder holding the "
                               "Fashion-MNIST idx files, or remove it to use the installed copy")
        found = _idx_folder(base)
        if found is None:
            names = ", ".join(f"{n}[.gz]" for pair in _IDX_FILES.values() for n in pair)
            raise DistillError(f"data.root: no Fashion-MNIST idx files in {base}; expected {names}")
        return found
    env = os.environ.get("DISTILL_DATA")
    tried = ([Path(env).expanduser()] if env else []) + [FASHION_MNIST_DIR, CACHE_DIR]
    for base in tried:
        found = _idx_folder(base)
        if found is not None:
            return found
    failure = download_fashion_mnist(CACHE_DIR)
    found = _idx_folder(CACHE_DIR) if failure is None else None
    if found is None:
        raise DistillError(
            f"data.root: Fashion-MNIST not found in {', '.join(map(str, tried))} (download: {failure}); "
            "install it with `apt-get install dataset-fashion-mnist`, or set data.root / $DISTILL_DATA "
            "to a folder holding the idx files")
    return found


def download_fashion_mnist(dest: Path, timeout: float = 10.0) -> str | None:
    """Try torchvision's download into `dest`; None on success, else why it failed (offline is normal)."""
    from torchvision.datasets import FashionMNIST

    # torchvision's urlopen has no timeout and DNS ignores socket timeouts, so probe the host in a
    # thread first: an offline machine must fail in seconds, not minutes.
    host = FashionMNIST.mirrors[0].split("/")[2]
    resolved = []
    probe = threading.Thread(target=lambda: resolved.append(_resolves(host)), daemon=True)
    probe.start()
    probe.join(timeout)
    if not resolved or not resolved[0]:
        return f"cannot reach {host}"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with contextlib.redirect_stdout(None):
            FashionMNIST(str(dest), train=True, download=True)
            FashionMNIST(str(dest), train=False, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # network, disk or checksum: "not found here"
        return f"failed ({type(e).__name__}: {e})"
    finally:
        socket.setdefaulttimeout(old_timeout)
    return None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _idx_folder(base: Path) -> Path | None:
    # the files themselves, a fashion-mnist/ subfolder, or torchvision's download layout
    for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
        if all(_idx_path(folder, n).is_file() for pair in _IDX_FILES.values() for n in pair):
            return folder
    return None


def _idx_path(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (the MNIST format), gzipped or not, as a read-only uint8 array."""
    try:
        stat = path.stat()
    except OSError as e:
        raise DistillError(f"{path}: cannot read ({e}); replace the file") from None
    return _parse_idx(path, stat.st_mtime_ns, stat.st_size)


# load_splits and load_unlabeled("rest") both need the train images and a parse takes ~0.5 s; the
# arrays are read-only, so callers can share them. mtime and size are in the key so a replaced file is
# read again.
@functools.lru_cache(maxsize=4)
def _parse_idx(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DistillError(f"{path}: cannot read ({e}); replace the file") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DistillError(f"{path}: not an idx file of unsigned bytes; replace the file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DistillError(f"{path}: truncated ({len(data) - offset} bytes for shape {dims}); replace the file")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _load_digits(cfg: DataConfig) -> tuple[Split, None]:
    from sklearn.datasets import load_digits

    for key in ("root", "val_root"):
        if getattr(cfg, key) is not None:
            raise DistillError(f"data.{key}: not used with data.source digits (it ships with scikit-learn); "
                               "remove it")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 → 0..255
    return Split([str(c) for c in range(10)], digits.target, images=images, name="digits:all"), None


def _load_imagefolder(cfg: DataConfig) -> tuple[Split, Split | None]:
    root = _required_root(cfg, "a folder of class folders, root/<class>/<image>")
    classes, paths, labels = _scan_folder(root, "data.root")
    train = Split(classes, labels, paths=paths, name=str(root))
    if cfg.val_root is None:
        return train, None
    val_root = Path(cfg.val_root).expanduser()
    val_classes, val_paths, val_labels = _scan_folder(val_root, "data.val_root")
    for name in val_classes:
        if name not in classes:
            raise DistillError(f"data.val_root: class folder {name!r} in {val_root} is not a class of data.root "
                               f"({root} has {', '.join(classes)}); rename or remove it")
    to_train = np.array([classes.index(name) for name in val_classes], dtype=np.int64)
    return train, Split(classes, to_train[val_labels], paths=val_paths, name=str(val_root))


def _scan_folder(root: Path, key: str) -> tuple[list[str], list[str], np.ndarray]:
    if not root.is_dir():
        raise DistillError(f"{key}: folder {root} does not exist; expected {root}/<class>/<image>")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DistillError(f"{key}: {root} has no class folders; expected {root}/<class>/<image>")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(root / name)
        if not found:
            raise DistillError(f"{key}: class folder {root / name} has no images "
                               f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += found
        labels += [label] * len(found)
    return classes, paths, np.array(labels, dtype=np.int64)


def image_files(folder: Path) -> list[str]:
    """The images under `folder`, recursively, sorted (os.walk order is the filesystem's; sorting makes
    splits reproducible). Hidden folders and files are skipped: .ipynb_checkpoints holds copies, and
    macOS's ._x.jpg files are metadata that PIL cannot read."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def _load_csv(cfg: DataConfig) -> tuple[Split, Split | None]:
    root = _required_root(cfg, f"a CSV file with columns {cfg.path_column!r} and {cfg.label_column!r}")
    paths, names, groups = _read_csv(root, "data.root", cfg)
    if all(_is_int(n) for n in names):
        classes = [str(c) for c in sorted({int(n) for n in names})]
    else:
        classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    train = Split(classes, [index[n] for n in names], paths=paths, name=str(root), groups=groups)
    if cfg.val_root is None:
        return train, None
    val_root = Path(cfg.val_root).expanduser()
    val_paths, val_names, val_groups = _read_csv(val_root, "data.val_root", cfg)
    for name in val_names:
        if name not in index:
            raise DistillError(f"data.val_root: label {name!r} in {val_root} is not a label of data.root "
                               f"({root} has {', '.join(classes)}); fix the label or the CSV")
    return train, Split(classes, [index[n] for n in val_names], paths=val_paths, name=str(val_root), groups=val_groups)


def _read_csv(path: Path, key: str, cfg: DataConfig) -> tuple[list[str], list[str], list[str] | None]:
    """Resolved image paths, label names (ints as canonical strings, so '07' and '7' agree) and, with
    data.group_column, group names."""
    if not path.is_file():
        raise DistillError(f"{key}: CSV file {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM into the header
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column, column_key in ((cfg.path_column, "data.path_column"), (cfg.label_column, "data.label_column"),
                                   (cfg.group_column, "data.group_column")):
            if column is not None and column not in columns:
                raise DistillError(f"{column_key}: no column {column!r} in {path}; "
                                   f"its columns are: {', '.join(columns) or '(none)'}")
        rows = [(reader.line_num, row[cfg.path_column], row[cfg.label_column],
                 row[cfg.group_column] if cfg.group_column else None) for row in reader]
    if not rows:
        raise DistillError(f"{key}: {path} has no rows; add one image per row")
    groups = [(g or "").strip() for *_, g in rows] if cfg.group_column else None
    paths, names, missing = [], [], []
    for line, image, label, _ in rows:
        image, label = (image or "").strip(), (label or "").strip()
        if not image or not label:
            column = cfg.path_column if not image else cfg.label_column
            raise DistillError(f"{path}: line {line}: empty {column!r} column; fill it or drop the row")
        full = path.parent / Path(image).expanduser()  # an absolute path stays absolute
        if not full.is_file():
            missing.append((line, image, full))
        paths.append(str(full))
        names.append(str(int(label)) if _is_int(label) else label)
    if missing:
        line, image, full = missing[0]
        raise DistillError(f"{path}: line {line}: image {image!r} not found ({full}); {len(missing)} of "
                           f"{len(rows)} images are missing (relative paths are from the CSV's folder)")
    return paths, names, groups


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _required_root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise DistillError(f"data.root: required for data.source {cfg.source}; give {what}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DistillError(f"data.root: {root} does not exist; give {what}")
    return root


_SOURCES: dict[str, Callable[[DataConfig], tuple[Split, Split | None]]] = {
    "fashion-mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "imagefolder": _load_imagefolder,
    "csv": _load_csv,
}
_BUILTINS = ("fashion-mnist", "digits")


# --- unlabeled images ---------------------------------------------------------
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
    return check_images(Split(train.classes, np.full(len(keep), UNLABELED), paths=[paths[i] for i in keep],
                              name=str(folder), ids=keep), cfg, "data.unlabeled")


def _unlabeled_rest(cfg: DataConfig, train: Split, val: Split) -> Split:
    if cfg.source not in _BUILTINS:
        raise DistillError(f"data.unlabeled: 'rest' means the unused train images of a built-in source "
                           f"({', '.join(_BUILTINS)}); with data.source {cfg.source} give a folder of images "
                           "instead (./rest for a folder named rest)")
    source, _ = _SOURCES[cfg.source](cfg)  # cheap again: the idx files are cached
    # val_fraction carves val out of the same source split, so its rows are used too
    used = [s.ids for s in (train, val) if s.name == source.name]
    rows = np.setdiff1d(source.ids, np.concatenate(used)) if used else source.ids
    if len(rows) == 0:
        raise DistillError(f"data.unlabeled: 'rest' is empty, train and validation use all {len(source)} "
                           f"images of {source.name}; set data.subset to leave some out, or give a folder "
                           "of images")
    rows = rows[_unlabeled_rows(len(rows), cfg)]
    # a builtin source split's ids are its row positions
    return Split(train.classes, np.full(len(rows), UNLABELED), images=source.images[rows],
                 name=source.name, ids=rows)


def _unlabeled_rows(n: int, cfg: DataConfig) -> np.ndarray:
    """Sorted indices of data.unlabeled_subset of `n` rows (all of them when unset or larger)."""
    k = cfg.unlabeled_subset
    if k is None or k >= n:
        return np.arange(n)
    # plain random, not stratified: there are no labels to stratify by
    return np.sort(np.random.default_rng(cfg.split_seed).choice(n, size=k, replace=False))


# --- transforms ---------------------------------------------------------------
INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                  "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
# Written like a recipe's augment lists, placeholders and all, so defaults and user specs take one path.
DEFAULT_AUGMENT: dict[str, list[dict[str, Any]]] = {
    # scale (0.25, 1) instead of timm's ImageNet (0.08, 1): on 28 px images an 8% crop is ~8x8 pixels,
    # too little of the object to keep its label; distillation also rewards views the teacher can read.
    "train": [
        {"name": "RandomResizedCrop", "size": ["input_size", "input_size"], "scale": [0.25, 1.0]},
        {"name": "HorizontalFlip", "p": 0.5},
    ],
    "eval": [
        {"name": "SmallestMaxSize", "max_size": "resize_size"},
        {"name": "CenterCrop", "height": "input_size", "width": "input_size"},
    ],
}
_APPENDED = ("Normalize", "ToTensorV2")


class Transform:
    """An albumentations pipeline as a callable: H x W [x C] uint8 image → float32 tensor 3 x H x W."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=to_rgb(image))["image"]

    def set_seed(self, seed: int | Sequence[int]) -> None:
        """Draw every random decision of the pipeline from one generator seeded by `seed`.

        Not albumentations' `set_random_seed`: it gives every transform its own generator with the *same* seed,
        so their decisions are correlated (a flip with p=0.5 after a crop follows the crop's first draw; two
        flips always agree). One shared stream keeps them independent.
        """
        generator = np.random.default_rng(seed)
        py_random = random.Random(int(generator.integers(2**63)))
        stack = [self.compose]
        while stack:
            node = stack.pop()
            node.random_generator, node.py_random = generator, py_random
            stack.extend(getattr(node, "transforms", ()))

    def __repr__(self) -> str:
        return f"Transform({self.compose!r})"


def build_transform(
        specs: list[dict[str, Any]] | None,
        stage: str,
        pre: Preprocess,
        where: str | None = None,
        seed: int | None = None,
) -> Transform:
    """The pipeline for one model and stage ("train" | "eval"); `specs` None means the stage's default.

    Each spec is `{name: <albumentations class>, **params}`. A param value "input_size" or
    "resize_size" (also inside lists) becomes the model's size; a transform that resizes uses the
    model's interpolation unless the spec sets one (names like "bicubic" are accepted). Normalize
    with the model's mean/std and ToTensorV2 are always appended. `where` is the recipe key of
    `specs`, for error messages.
    """
    if stage not in DEFAULT_AUGMENT:
        raise ValueError(f"stage must be one of {list(DEFAULT_AUGMENT)}, got {stage!r}")
    where = where or f"augment.{stage}"
    sizes = {"input_size": pre.input_size, "resize_size": int(pre.input_size / pre.crop_pct)}
    transforms = [
        _build_one(spec, f"{where}.{i}", sizes, INTERPOLATIONS[pre.interpolation])
        for i, spec in enumerate(DEFAULT_AUGMENT[stage] if specs is None else specs)
    ]
    transforms += [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]
    transform = Transform(A.Compose(transforms))
    if seed is not None:
        transform.set_seed(seed)
    return transform


def _build_one(spec: Any, key: str, sizes: dict[str, int], interpolation: int) -> A.BasicTransform:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise DistillError(f"{key}: expected a mapping with 'name: <albumentations class>', got {spec!r}")
    name = spec["name"]
    if name in _APPENDED:
        raise DistillError(f"{key}.name: {name} is appended automatically with each model's own mean/std; "
                           "remove it")
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        known = [n for n, c in vars(A).items() if isinstance(c, type) and issubclass(c, A.BasicTransform)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see albumentations.ai/docs)"
        raise DistillError(f"{key}.name: no albumentations transform {name!r}{hint}")
    params = {k: _substitute(v, sizes) for k, v in spec.items() if k != "name"}
    for param in ("interpolation", "mask_interpolation"):
        if isinstance(params.get(param), str) and params[param] in INTERPOLATIONS:
            params[param] = INTERPOLATIONS[params[param]]
    if "interpolation" in inspect.signature(cls).parameters:
        params.setdefault("interpolation", interpolation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = cls(**params)
        except (TypeError, ValueError) as e:
            raise DistillError(_param_error(e, key, name)) from None
    for w in caught:
        # albumentations only warns about unknown params; a typo must not silently do nothing
        if "are not valid for transform" in str(w.message):
            raise DistillError(f"{key}: {name}: {w.message}; check the parameter names")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return transform


def _substitute(value: Any, sizes: dict[str, int]) -> Any:
    if isinstance(value, str):
        return sizes.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, sizes) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, sizes) for k, v in value.items()}
    return value


def _param_error(e: Exception, key: str, name: str) -> str:
    # albumentations re-raises pydantic's multi-line report as a ValueError; keep its first error
    cause = e.__cause__ or e.__context__
    if isinstance(cause, pydantic.ValidationError):
        errors = cause.errors()
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{key}.{loc}: {name}: {first['msg']}{more}" if loc else f"{key}: {name}: {first['msg']}{more}"
    return f"{key}: {name}: {str(e).splitlines()[0]}"


# --- the torch dataset --------------------------------------------------------
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
