"""Datasets: sources by name (sources.py), splits and selection, unlabeled images, transforms, the torch dataset."""
# Everything callers import from `distill.data` is re-exported here. To monkeypatch, patch the module that uses the
# name (e.g. distill.data.idx.FASHION_MNIST_DIR): a patch of this package's copy reaches no caller.
from distill.data.cache import attach_cache
from distill.data.dataset import ImageDataset
from distill.data.fashion_mnist import FASHION_MNIST_CLASSES
from distill.data.idx import CACHE_DIR, FASHION_MNIST_DIR, download_fashion_mnist, find_fashion_mnist, read_idx
from distill.data.images import IMAGE_EXTENSIONS, image_files, read_image, to_rgb
from distill.data.sources import DEFAULT_VAL_FRACTION, SOURCES, check_images, load_splits
from distill.data.splits import (
    UNLABELED,
    Split,
    fold_ids,
    long_tail_indices,
    split_by_group,
    split_off,
    stratified_indices,
)
from distill.data.transforms import DEFAULT_AUGMENT, INTERPOLATIONS, Preprocess, Transform, build_transform
from distill.data.unlabeled import load_unlabeled

__all__ = [
    "CACHE_DIR",
    "DEFAULT_AUGMENT",
    "DEFAULT_VAL_FRACTION",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "SOURCES",
    "UNLABELED",
    "ImageDataset",
    "Preprocess",
    "Split",
    "Transform",
    "attach_cache",
    "build_transform",
    "check_images",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "fold_ids",
    "image_files",
    "load_splits",
    "load_unlabeled",
    "long_tail_indices",
    "read_idx",
    "read_image",
    "split_by_group",
    "split_off",
    "stratified_indices",
    "to_rgb",
]
