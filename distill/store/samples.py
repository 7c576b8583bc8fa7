"""The store's samples in order and its fingerprints: what identifies the rows, the views, the logits, the store."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from distill.data import Split
from distill.store.augment import check_augment
from distill.store.mixing import mix_spec
from distill.store.shards import FORMAT_VERSION, TAIL_SPREAD
from distill.store.views import PARAM_COLUMNS


class Samples:
    """The store's samples in order: the labeled training split, then the unlabeled images (label -1)."""

    def __init__(self, train: Split, unlabeled: Split | None = None):
        self.parts = [train] + ([unlabeled] if unlabeled is not None and len(unlabeled) else [])
        self.num_labeled = len(train)
        self.labels = np.concatenate([train.labels] + [np.full(len(p), -1, np.int64) for p in self.parts[1:]])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int, need: tuple[int, int] | None = None) -> np.ndarray:
        """Sample i as H x W x 3 uint8 RGB; `need` (width, height) as in `Split.load` (a JPEG decoded smaller)."""
        part, j = self.part(i)
        return part.load(j, need)

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of sample i at full size, from its header (`Split.size`): what its views are drawn on."""
        part, j = self.part(i)
        return part.size(j)

    def scalable(self, i: int) -> bool:
        """Whether a `need` can make `load(i)` cheaper (`Split.scalable`)."""
        return self.part(i)[0].scalable()

    def part(self, i: int) -> tuple[Split, int]:
        return (self.parts[0], i) if i < self.num_labeled else (self.parts[1], i - self.num_labeled)

    def describe(self, i: int) -> str:
        return self.parts[0].describe(i) if i < self.num_labeled else self.parts[1].describe(i - self.num_labeled)


def dataset_fingerprint(samples: Samples, classes: list[str]) -> str:
    """sha256 of what identifies the rows: class names, and per part its name, source rows, labels, paths."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for part in samples.parts:
        h.update(part.name.encode())
        h.update(np.ascontiguousarray(part.ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(part.labels, dtype=np.int64).tobytes())
        if part.paths is not None:
            h.update("\n".join(part.paths).encode())
    return h.hexdigest()


def view_spec(spec, seed: int) -> dict:
    views = {"sampler": "rrc-flip-v1", "columns": list(PARAM_COLUMNS), "views": spec.views, "seed": seed,
             "scale": list(spec.scale), "ratio": list(spec.ratio), "hflip": spec.hflip,
             "center_crop_pct": spec.center_crop_pct}
    augment = check_augment(getattr(spec, "augment", None))
    if augment:
        # the replayed augmentation, defaults filled in, and the per-row seed column it is drawn from; without it
        # the spec (so the fingerprint) stays what it was
        views.update(augment=augment, augment_sampler="replay-v1", seed_column="seed")
    mix = mix_spec(spec)
    if mix is not None:  # targets.mix: likewise only in a mixed store's spec
        views["mix"] = mix
    return views


def logits_spec(spec, num_classes: int) -> dict:
    full = spec.logits == "full" or (spec.logits == "auto" and num_classes <= spec.full_max_classes)
    # out-of-fold targets are other logits of the same teacher: part of the spec, so of the store's fingerprint
    source = {"source": "out-of-fold"} if getattr(spec, "oof", False) else {}
    # per row, of the float32 logits over all K classes: what `kd.standardize` standardises with
    stats = {"row_stats": {"logit_mean": "float32", "logit_std": "float32"}}
    if full:
        return {"storage": "full", "dtype": "float16", **stats, **source}
    k = min(spec.topk, num_classes)
    # the tail (the K - k classes outside the top k): its own log-sum-exp and mean logit, from the float32 logits;
    # the reader spreads it over the tail classes as `reader.TAIL_SPREAD` says
    return {"storage": "topk", "dtype": "float16", "k": k, "index_dtype": "int16" if num_classes < 2**15 else "int32",
            "tail": {"tail_lse": "float32", "tail_mean": "float32", "spread": TAIL_SPREAD}, **stats, **source}


def fingerprint(teacher_sha256: str, dataset: str, views: dict, logits: dict, shard_size: int) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, "teacher": teacher_sha256, "dataset": dataset, "views": views,
                       "logits": logits, "shard_size": shard_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
