"""The imagefolder source: root/<class>/<image>, class names from the folder names, an optional val_root alike."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distill.data.images import IMAGE_EXTENSIONS, image_files, required_root
from distill.data.splits import Split
from distill.errors import DistillError
from distill.recipe import DataConfig


def load(cfg: DataConfig) -> tuple[Split, Split | None]:
    root = required_root(cfg, "a folder of class folders, root/<class>/<image>")
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
