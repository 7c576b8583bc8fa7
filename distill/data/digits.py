"""The built-in digits source: scikit-learn's 1797 8x8 handwritten digits, with no validation split of its own."""
from __future__ import annotations

import numpy as np

from distill.data.splits import Split
from distill.errors import DistillError
from distill.recipe import DataConfig


def load(cfg: DataConfig) -> tuple[Split, None]:
    from sklearn.datasets import load_digits

    for key in ("root", "val_root"):
        if getattr(cfg, key) is not None:
            raise DistillError(f"data.{key}: not used with data.source digits (it ships with scikit-learn); "
                               "remove it")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 → 0..255
    return Split([str(c) for c in range(10)], digits.target, images=images, name="digits:all"), None
