"""The built-in Fashion-MNIST source: 60000 train and 10000 test 28x28 grey images in 10 classes."""
from __future__ import annotations

from distill.data.idx import IDX_FILES, find_fashion_mnist, idx_path, read_idx
from distill.data.splits import Split
from distill.errors import DistillError
from distill.recipe import DataConfig

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load(cfg: DataConfig) -> tuple[Split, Split]:
    if cfg.val_root is not None:
        raise DistillError("data.val_root: not used with data.source fashion-mnist (its test set is the "
                           "validation split); remove it, or set data.val_fraction to split train instead")
    folder = find_fashion_mnist(cfg.root)
    splits = []
    for split, (images_file, labels_file) in IDX_FILES.items():
        images_path, labels_path = idx_path(folder, images_file), idx_path(folder, labels_file)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= 10:
            raise DistillError(f"{images_path}: does not match {labels_path.name} as Fashion-MNIST "
                               f"(images {images.shape}, labels {labels.shape}); replace the files")
        splits.append(Split(FASHION_MNIST_CLASSES, labels, images=images, name=f"fashion-mnist:{split}"))
    return splits[0], splits[1]
