"""The hf source: a Hugging Face `datasets` dataset, from a save_to_disk folder, local files or a hub id."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data.images import to_rgb
from distill.data.splits import Split
from distill.errors import DistillError
from distill.recipe import DataConfig

_LOCAL = "a folder saved with save_to_disk, a folder of images or parquet files, or a .parquet file"


def load(cfg: DataConfig) -> tuple[Split, Split | None]:
    """The dataset's data.train_split and validation split (data.val_split; null: "validation", else "test",
    else none, so load_splits holds out a stratified part of train).

    Classes are the label column's ClassLabel names; a column of ints or strings gets its sorted unique
    training values. Images stay in the dataset's Arrow files, decoded when a row is loaded. Each split's
    name carries the reference, revision, split, row count and the dataset's own fingerprint, so the
    store's dataset fingerprint changes with the data.
    """
    if cfg.val_root is not None:
        raise DistillError("data.val_root: not used with data.source hf (the dataset's own splits are used); "
                           "remove it, and name the validation split with data.val_split")
    splits, ref = _open(cfg)
    key = "data.dataset" if cfg.dataset is not None else "data.root"
    if cfg.train_split not in splits:
        raise DistillError(f"data.train_split: {ref} has no split {cfg.train_split!r}; its splits are: "
                           f"{', '.join(splits)}")
    val_name = cfg.val_split
    if val_name is None:
        val_name = next((s for s in ("validation", "test") if s in splits and s != cfg.train_split), None)
    elif val_name not in splits:
        raise DistillError(f"data.val_split: {ref} has no split {val_name!r}; its splits are: {', '.join(splits)}; "
                           "leave it out to hold out part of the training split")
    train_ds = _checked(splits[cfg.train_split], cfg, ref, cfg.train_split, key)
    names, values = _labels(train_ds, cfg, ref, cfg.train_split)
    classes = names if names is not None else _sorted_classes(values)
    train = _split(train_ds, cfg, ref, cfg.train_split, classes, _to_classes(names, values, classes, ref))
    if val_name is None:
        return train, None
    val_ds = _checked(splits[val_name], cfg, ref, val_name, key)
    val_names, val_values = _labels(val_ds, cfg, ref, val_name)
    return train, _split(val_ds, cfg, ref, val_name, classes,
                         _to_classes(val_names, val_values, classes, f"{ref} split {val_name!r}"))


class Images:
    """A dataset's image column read on demand: [i] is row rows[i] decoded to H x W x 3 uint8 RGB, [array] a
    selection of rows (what Split.subset takes). Pickles as the dataset's file paths, so loader workers reopen it."""

    def __init__(self, dataset, column: str, rows: np.ndarray, name: str):
        self.dataset, self.column, self.rows, self.name = dataset, column, rows, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            row = int(self.rows[i])
            try:
                return _rgb(self.dataset[row][self.column])
            except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL cannot decode the bytes
                raise DistillError(f"{self.name}:{row}: cannot read image ({e}); fix or drop the row, or set "
                                   "data.on_bad_image: skip to leave such rows out") from None
        return Images(self.dataset, self.column, self.rows[np.asarray(i, dtype=np.int64)], self.name)


def check_headers(images: Images, max_pixels: int) -> list[tuple[int, str]]:
    """(index, why) of the rows whose image fails the header check (distill.data.headers), nothing decoded: the
    Arrow column is read raw (bytes or a path per row), and each image's header and end are read in place."""
    from distill.data.headers import inspect_file, inspect_stream, problem_of

    raw = images.dataset.with_format("arrow")  # the stored {bytes, path} structs, not decoded images
    bad = []
    for start in range(0, len(images.rows), 1024):
        column = raw[images.rows[start:start + 1024].tolist()][images.column].combine_chunks()
        data, paths = column.field("bytes"), column.field("path")
        for j in range(len(column)):
            if data[j].is_valid:
                buffer = data[j].as_buffer()
                # one image's bytes copied (pa.BufferReader refuses the seeks PIL probes garbage with)
                header = inspect_stream(io.BytesIO(buffer), buffer.size)
            else:
                path = paths[j].as_py() or ""
                header = inspect_file(path, os.path.getsize(path)) if os.path.isfile(path) else \
                    ("", 0, 0, f"no image bytes, and no file at {path!r}")
            problem = problem_of(header, max_pixels)
            if problem:
                bad.append((start + j, problem))
    return bad


def _rgb(image) -> np.ndarray:
    if image.mode.startswith("I"):
        # 16-bit grey: PIL's convert("RGB") clips to 255 instead of scaling (as images.read_image)
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 65535) / 257
        return to_rgb(np.round(grey).astype(np.uint8))
    return np.asarray(image.convert("RGB"))


def _open(cfg: DataConfig) -> tuple[dict, str]:
    """The dataset's splits by name, and the reference messages name it by."""
    import datasets
    from datasets.exceptions import DatasetsError

    if cfg.root is not None and cfg.dataset is not None:
        raise DistillError("data.dataset: data.source hf reads one dataset and data.root is set too; keep one")
    if cfg.root is None and cfg.dataset is None:
        raise DistillError(f"data.root: required for data.source hf; give {_LOCAL}, or data.dataset: <hub id>")
    if cfg.dataset is not None:
        if not cfg.dataset.strip():
            raise DistillError("data.dataset: empty; give a hub id (owner/name), or data.root for a local dataset")
        ref = cfg.dataset + (f"@{cfg.revision}" if cfg.revision else "")
        try:
            # downloaded into the Hugging Face cache the first time; with HF_HUB_OFFLINE=1 only the cache is read
            found = datasets.load_dataset(cfg.dataset, revision=cfg.revision)
        except (OSError, ValueError, DatasetsError) as e:
            offline = "offline" in str(e).lower() or (datasets.config.HF_HUB_OFFLINE and isinstance(e, OSError))
            hint = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE=1 keeps the hub out: load it once "
                    "online, or save_to_disk it and set data.root" if offline else
                    "check the hub id and data.revision, or save_to_disk it and set data.root")
            raise DistillError(f"data.dataset: cannot load {ref} ({_first_line(e)}); {hint}") from None
        return _by_split(found), ref
    if cfg.revision is not None:
        raise DistillError("data.revision: only for a hub id (data.dataset); a local dataset has no revisions, "
                           "remove it")
    if not cfg.root.strip():  # Path("") would be the current folder
        raise DistillError(f"data.root: empty; give {_LOCAL}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DistillError(f"data.root: {root} does not exist; give {_LOCAL}")
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            found = datasets.load_from_disk(str(root))
        elif root.is_file() and root.suffix == ".parquet":
            found = datasets.load_dataset("parquet", data_files={"train": str(root)})
        elif root.is_dir():
            # datasets picks the builder from the files (imagefolder, parquet, ...) and the splits from their
            # names (train/, test/, train-*.parquet); a folder of class folders has labels from the folder names
            found = datasets.load_dataset(str(root.resolve()))
        else:
            raise DistillError(f"data.root: {root} is not a dataset; give {_LOCAL}")
    except (OSError, ValueError, DatasetsError) as e:
        raise DistillError(f"data.root: datasets cannot read {root} ({_first_line(e)}); give {_LOCAL}") from None
    return _by_split(found), str(root)


def _by_split(found) -> dict:
    import datasets

    # a single saved Dataset is the training split
    return {"train": found} if isinstance(found, datasets.Dataset) else dict(found)


def _checked(ds, cfg: DataConfig, ref: str, split: str, key: str):
    """The split, its image and label (and group) columns checked: one error naming the columns it has."""
    import datasets

    features = ds.features
    columns = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items()) or "(none)"
    for column, column_key in ((cfg.image_column, "data.image_column"), (cfg.label_column, "data.label_column"),
                               (cfg.group_column, "data.group_column")):
        if column is not None and column not in features:
            raise DistillError(f"{column_key}: split {split!r} of {ref} has no column {column!r}; its columns "
                               f"are: {columns}")
    if not isinstance(features[cfg.image_column], datasets.Image):
        raise DistillError(f"data.image_column: column {cfg.image_column!r} of {ref} holds "
                           f"{features[cfg.image_column]}, not images (a datasets.Image feature); its columns are: "
                           f"{columns}")
    if len(ds) == 0:
        raise DistillError(f"{key}: split {split!r} of {ref} has no rows")
    return ds


def _labels(ds, cfg: DataConfig, ref: str, split: str) -> tuple[list[str] | None, np.ndarray]:
    """(the ClassLabel names, or None, and the rows' label values: ints for a ClassLabel or an int column,
    else strings)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = ds.features[cfg.label_column]
    column = ds.select_columns([cfg.label_column]).with_format("arrow")[:][cfg.label_column]
    unlabeled = column.null_count + (int(pc.sum(pc.less(column, 0)).as_py() or 0)
                                     if isinstance(feature, datasets.ClassLabel) else 0)
    if unlabeled:
        raise DistillError(f"data.label_column: {unlabeled} rows of split {split!r} of {ref} have no label "
                           f"(null or -1); {'use another data.val_split, or ' if split != cfg.train_split else ''}"
                           "drop those rows")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), column.to_numpy().astype(np.int64)
    if pa.types.is_integer(column.type):
        return None, column.to_numpy().astype(np.int64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return None, np.array([s.strip() for s in column.to_pylist()], dtype=object)
    raise DistillError(f"data.label_column: column {cfg.label_column!r} of {ref} holds {feature}; expected class "
                       "labels (a ClassLabel, integers or strings)")


def _sorted_classes(values: np.ndarray) -> list[str]:
    # no ClassLabel: the sorted unique values (ints numerically, so 10 comes after 9), as strings
    return [str(v) for v in sorted(set(values.tolist()))]


def _to_classes(names, values: np.ndarray, classes: list[str], where: str) -> np.ndarray:
    """The rows' labels as indices into `classes` (the training split's)."""
    if names == classes:
        return values
    row_names = np.asarray(names, dtype=object)[values] if names is not None else values.astype(str)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(row_names.tolist()) - index.keys())
    if unknown:
        raise DistillError(f"data.label_column: label {unknown[0]!r} of {where} is not a class of the training "
                           f"split ({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})")
    return np.array([index[n] for n in row_names.tolist()], dtype=np.int64)


def _split(ds, cfg: DataConfig, ref: str, split: str, classes: list[str], labels: np.ndarray) -> Split:
    import datasets

    # the name is in the store's dataset fingerprint: with the dataset's own fingerprint (its content for
    # save_to_disk, its files and revision for load_dataset) another version of the data never matches
    name = f"hf:{ref}:{split}[{len(ds)} rows, {ds._fingerprint}]"
    images = ds.select_columns([cfg.image_column])
    if not images.features[cfg.image_column].decode:
        images = images.cast_column(cfg.image_column, datasets.Image())
    groups = None
    if cfg.group_column is not None:
        groups = [str(g) for g in ds.select_columns([cfg.group_column]).with_format("arrow")[:][cfg.group_column]
                  .to_pylist()]
    return Split(classes, labels, images=Images(images, cfg.image_column, np.arange(len(ds)), name), name=name,
                 groups=groups)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
