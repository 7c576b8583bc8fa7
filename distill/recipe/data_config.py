"""The recipe's `data:` section: where the images come from, how they are split, checked, decoded and cached."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from distill.recipe.fields import _at_least, _data_sources, _one_of, _open_unit


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="fashion-mnist", metadata=_one_of(_data_sources))  # distill.data.sources
    # builtin: folder of idx files; imagefolder: root/<class>/*; csv: the csv file; hf: a folder saved with
    # save_to_disk, a folder of images or parquet files (datasets.load_dataset infers which), or a .parquet file
    root: str | None = None
    # hf: a hub id instead of data.root (datasets.load_dataset downloads it into the Hugging Face cache;
    # HF_HUB_OFFLINE=1 reads only the cache), at data.revision (a branch, tag or commit; null: the default branch)
    dataset: str | None = None
    revision: str | None = None
    # hf: the splits; val_split null: "validation", else "test", else a stratified part of train (val_fraction)
    train_split: str = "train"
    val_split: str | None = None
    # hf: the column of images (a datasets.Image feature); labels are data.label_column (a ClassLabel's names
    # are the classes; ints or strings: their sorted unique values)
    image_column: str = "image"
    # a given validation set (imagefolder folder or csv file); fashion-mnist's is its test split
    val_root: str | None = None
    # null: use the given validation split; a number: stratified split of train by this fraction
    val_fraction: float | None = field(default=None, metadata=_open_unit())
    split_seed: int = 0
    # keep N images per split, stratified (quick runs)
    subset: int | None = field(default=None, metadata=_at_least(1))
    # extra images without labels for the soft-target store: an image folder, or "rest" = the built-in
    # train images that data.subset left out (their labels dropped)
    unlabeled: str | None = None
    unlabeled_subset: int | None = field(default=None, metadata=_at_least(1))
    path_column: str = "path"  # csv
    label_column: str = "label"  # csv, hf
    # csv, hf: a column naming each image's group (a person, a scan, a video); k-fold teachers keep a group's
    # images in one fold, so no group is in both a fold's training and its held-out images
    group_column: str | None = None
    num_workers: int = field(default=0, metadata=_at_least(0, 256))
    # a bad image file (its header or end fails a cheap check of every file before training, distill.data.headers):
    # error (one line naming it) or skip (left out, listed in the run directory's skipped_images.txt)
    on_bad_image: Literal["error", "skip"] = "error"
    # width x height above this is a bad file (a decompression bomb: a few KB that decode to GBs), checked from the
    # header and again at decode; the default is PIL's own Image.MAX_IMAGE_PIXELS
    max_image_pixels: int = field(default=89_478_485, metadata=_at_least(1))
    # a JPEG file is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, distill.data.decode) when every
    # crop a stage takes of it still has the model's input size; false: always at full size, as before. On by
    # default: 2-3x faster reading photos bigger than the models' inputs; the views differ from a full decode's by a
    # mean of 1.1 uint8 levels at 224 px to 4.6 at 64 px, mostly the full decode's own aliasing (README "Scaled
    # decoding"), so results on image folders move a little; in-memory builtins, hf datasets and non-JPEG files are
    # untouched, so Fashion-MNIST results (the golden test) do not move
    decode_scaled: bool = True
    # decode every image file once into a cache (distill.data.cache), shrunk so its longer side is at most this many
    # pixels; every later stage and epoch reads it. auto: 2 x the largest input size of any stage (teacher.input_size,
    # students' resolution and fixres.resolution; 224 where null), so a random crop of half the image's side still
    # has the model's full resolution. null: off, the files are decoded every time
    cache: int | Literal["auto"] | None = field(default=None, metadata={
        "check": ("an integer in [16, 16384], 'auto' or null", lambda v: v == "auto" or 16 <= v <= 16384)})
    # where the cache lives; null: $XDG_CACHE_HOME/distill/images/ (~/.cache), shared by runs on the same files
    cache_dir: str | None = None
    # jpeg: re-encoded at quality 95, ~9x smaller than raw; raw: uint8 pixels, ~8x faster to read while the cache
    # fits in memory (the page cache), slower than jpeg once it has to come from disk (measured: distill.data.cache)
    cache_format: Literal["jpeg", "raw"] = "jpeg"
    # where a student's training views are decoded, cropped and resized: cpu (the loader, PIL and OpenCV) or device
    # (the loop, on accelerator.device: torchvision's decode_jpeg on the batch's files, nvJPEG on a GPU; crop and
    # resize as tensor ops, distill.data.device_decode). device needs image files, cached KD and a store without
    # targets.augment or targets.mix; evaluation and FixRes decode on the CPU either way
    decode: Literal["cpu", "device"] = "cpu"
    # make the training split long-tailed (experiments on balanced data): class c keeps
    # n_max · ratio^(-c / (C - 1)) of its images, class 0 the most (Cui et al. 2019); validation stays as it is
    long_tail: float | None = field(default=None, metadata={"check": ("a ratio >= 1", lambda v: v >= 1)})
