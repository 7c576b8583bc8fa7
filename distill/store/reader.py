"""The memory-mapped reader: any (sample, view) row of a complete store in constant time and memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.store.augment import NO_AUGMENT
from distill.store.mixing import MIX_COLUMNS
from distill.store.shards import MANIFEST, REBUILD, check_version, damaged_shards, read_manifest
from distill.store.views import PARAM_COLUMNS

_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "U8": np.uint8, "I8": np.int8}


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only numpy memmap: no copy, constant memory."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    arrays = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        shape = tuple(t["shape"])
        if end == start:
            arrays[name] = np.zeros(shape, dtype=_DTYPES[t["dtype"]])
            continue
        arrays[name] = np.memmap(path, dtype=_DTYPES[t["dtype"]], mode="r", offset=8 + n + start, shape=shape)
    return arrays


class TargetStore:
    """A complete store, memory-mapped: any (sample, view) row in constant time.

    `rows(samples, views)` gives float32 logits [n, K] (top-k storage is reconstructed by `reconstruct_topk`:
    the k kept logits, the tail's exact mass and mean spread over the other classes), each row's logit mean and
    std over all K classes of the teacher's float32 logits ("logit_mean", "logit_std", float32 [n]), the view
    parameters and labels.
    """

    def __init__(self, path, allow_incomplete: bool = False):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise DistillError(f"targets: no store at {self.path} ({MANIFEST} missing); export one with "
                               "teach.py (or teach.py --export-only for a saved teacher)")
        self.manifest = m = read_manifest(self.path)
        if not m.get("complete") and not allow_incomplete:
            raise DistillError(f"targets: the store at {self.path} is incomplete (an export was interrupted); "
                               "run teach.py --export-only to finish it")
        check_version(self.path, m)
        self.num_samples, self.views, self.num_classes = m["num_samples"], m["views"], m["num_classes"]
        self.rows_per_sample, self.shard_size = m["rows_per_sample"], m["shard_size"]
        self.storage = m["logits"]["storage"]
        self.mixed = "mix" in m.get("view_spec", {})  # targets.mix: rows carry a partner view and their mixing
        self._shards = [None] * len(m["shards"])

    def verify(self, accelerator=None) -> None:
        """Check every shard against the sha256 in the manifest (a full read: about 1 s per GB), on the main
        process only when an `accelerator` is given; every process gets its verdict."""
        if accelerator is None or accelerator.num_processes == 1:
            damaged = damaged_shards(self.path, self.manifest)
        else:
            from accelerate.utils import broadcast_object_list
            verdict = [damaged_shards(self.path, self.manifest) if accelerator.is_main_process else None]
            damaged = broadcast_object_list(verdict)[0]
        if damaged:
            raise DistillError(f"targets: {self.path / damaged[0]} is damaged or missing (its sha256 differs from "
                               f"the manifest){f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''}; "
                               "teach.py --export-only (or distill run) exports the damaged shards again")

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        # opened lazily: a DataLoader worker maps only the shards it reads, after it was forked
        if self._shards[s] is None:
            self._shards[s] = _memmap_safetensors(self.path / self.manifest["shards"][s]["file"])
        return self._shards[s]

    def _locate(self, samples, views):
        samples = np.atleast_1d(np.asarray(samples, dtype=np.int64))
        views = np.broadcast_to(np.asarray(views, dtype=np.int64), samples.shape)
        if samples.min(initial=0) < 0 or samples.max(initial=-1) >= self.num_samples:
            raise IndexError(f"sample out of range [0, {self.num_samples})")
        if views.min(initial=0) < 0 or views.max(initial=-1) >= self.rows_per_sample:
            raise IndexError(f"view out of range [0, {self.rows_per_sample})")
        shard_of = samples // self.shard_size
        local = (samples - shard_of * self.shard_size) * self.rows_per_sample + views
        return samples, shard_of, local

    def views_of(self, samples, views) -> dict[str, np.ndarray]:
        """What renders the (sample, view) pairs, without their logits: "params" and "seed" (-1: none)."""
        samples, shard_of, local = self._locate(samples, views)
        out = {"params": np.empty((len(samples), len(PARAM_COLUMNS)), np.float32),
               "seed": np.full(len(samples), NO_AUGMENT, np.int64)}
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            shard = self._shard(int(s))
            out["params"][pick] = shard["params"][local[pick]]
            if "seed" in shard:
                out["seed"][pick] = shard["seed"][local[pick]]
        return out

    def labels(self, samples) -> np.ndarray:
        """The samples' labels (-1: unlabeled)."""
        samples, shard_of, _ = self._locate(samples, 0)
        out = np.empty(len(samples), np.int64)
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            out[pick] = self._shard(int(s))["label"][samples[pick] - s * self.shard_size]
        return out

    def rows(self, samples, views, temperature: float = 1.0, standardized: bool = False) -> dict[str, np.ndarray]:
        """The stored rows of (sample, view) pairs: "logits" [n, K] float32, "params", "seed" (augmentation; -1:
        none), "label", "logit_mean", "logit_std", and in a mixed store (`targets.mix`) "partner" [n, 2] (sample,
        view; -1: unmixed) and "mix" [n, 5] (λ, CutMix box). A top-k row's tail is rebuilt for
        softmax(logits / `temperature`) (`reconstruct_topk`); `standardized`: the logits will be standardised
        first, which makes each row's effective temperature `temperature` · its logit std."""
        samples, shard_of, local = self._locate(samples, views)
        out = {"logits": np.empty((len(samples), self.num_classes), np.float32),
               "params": np.empty((len(samples), len(PARAM_COLUMNS)), np.float32),
               "label": np.empty(len(samples), np.int64), "logit_mean": np.empty(len(samples), np.float32),
               "logit_std": np.empty(len(samples), np.float32),
               "seed": np.full(len(samples), NO_AUGMENT, np.int64)}
        if self.mixed:
            out["partner"] = np.empty((len(samples), 2), np.int64)
            out["mix"] = np.empty((len(samples), len(MIX_COLUMNS)), np.float32)
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            rows, shard = local[pick], self._shard(int(s))
            out["params"][pick] = shard["params"][rows]
            if "seed" in shard:  # targets.augment: the row's augmentation seed
                out["seed"][pick] = shard["seed"][rows]
            if self.mixed:
                out["partner"][pick], out["mix"][pick] = shard["partner"][rows], shard["mix"][rows]
            out["label"][pick] = shard["label"][(samples[pick] - s * self.shard_size)]
            out["logit_mean"][pick], out["logit_std"][pick] = shard["logit_mean"][rows], shard["logit_std"][rows]
            if self.storage == "full":
                out["logits"][pick] = shard["logits"][rows]
            else:
                t = temperature * (shard["logit_std"][rows].astype(np.float64) + 1e-6 if standardized else 1.0)
                out["logits"][pick] = reconstruct_topk(shard["topk_logits"][rows].astype(np.float32),
                                                       shard["topk_index"][rows], shard["tail_lse"][rows],
                                                       shard["tail_mean"][rows], self.num_classes, t)
        return out

    def row(self, sample: int, view: int, temperature: float = 1.0, standardized: bool = False) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.rows([sample], [view], temperature, standardized).items()}

    def check(self, expected: dict) -> None:
        """Refuse a store built for something else: `expected` maps manifest paths to the values the
        caller needs, e.g. {"dataset.fingerprint": ..., "teacher.sha256": ..., "num_classes": 10}."""
        for key, want in expected.items():
            have = self.manifest
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if have != want:
                raise DistillError(f"targets: the store at {self.path} was built for another {key.split('.')[0]} "
                                   f"({key}: {_short(have)} there, {_short(want)} here); rebuild it with "
                                   f"{REBUILD}")

    def nbytes(self) -> int:
        return sum((self.path / s["file"]).stat().st_size for s in self.manifest["shards"])


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "…" if len(text) > 20 else text


def reconstruct_topk(values: np.ndarray, index: np.ndarray, tail_lse: np.ndarray, tail_mean: np.ndarray,
                     num_classes: int, temperature=1.0) -> np.ndarray:
    """Full float32 logits [n, K] from the top k (`values` at `index`) and the tail's own log-sum-exp and mean,
    made for softmax(· / `temperature`) (a float, or one per row).

    The kept logits are exact. Which tail class is which is not stored, so the n = K - k tail classes share one
    level c, the least informative spread, chosen so that the tail's mass at temperature T is right:
    n · exp(c / T) = exp(f(1 / T)), with f(β) = log Σ_tail exp(β · z) the tail's log-sum-exp at inverse
    temperature β. f is known at β = 0 (log n), its slope there (the tail's mean logit) and at β = 1 (the stored
    `tail_lse`, from the float32 logits); f is convex, and between those points it is interpolated by the
    quadratic through them: f(β) ≈ log n + mean · β + (tail_lse - log n - mean) · β². At T = 1 the tail mass is
    exact; c lies between the tail's mean and its T = 1 level, so no tail class rises above a kept one.
    benchmarks/export.py measures the error against the full distribution (KL at T = 1 and T = 4).
    """
    values = np.asarray(values, np.float32)
    rows, k = values.shape
    n = num_classes - k
    out = np.empty((rows, num_classes), np.float32)
    if n > 0:
        lse, mean = np.asarray(tail_lse, np.float64), np.asarray(tail_mean, np.float64)
        t = np.broadcast_to(np.asarray(temperature, np.float64), lse.shape)
        beta = 1.0 / t
        f = np.log(n) + mean * beta + np.maximum(lse - np.log(n) - mean, 0.0) * beta**2
        out[:] = (t * (f - np.log(n)))[:, None]
    np.put_along_axis(out, np.asarray(index).astype(np.int64), values, axis=1)
    return out
