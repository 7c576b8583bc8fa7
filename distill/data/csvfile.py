"""The csv source: a CSV file of image paths, labels and optional groups, an optional val_root alike."""
from __future__ import annotations

import csv
from pathlib import Path

from distill.data.images import required_root
from distill.data.splits import Split
from distill.errors import DistillError
from distill.recipe import DataConfig


def load(cfg: DataConfig) -> tuple[Split, Split | None]:
    root = required_root(cfg, f"a CSV file with columns {cfg.path_column!r} and {cfg.label_column!r}")
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
