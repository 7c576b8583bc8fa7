"""The memory-mapped reader: any (sample, view) row of a complete store in constant time and memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.store.shards import FORMAT_VERSION, MANIFEST, damaged_shards, read_manifest
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

    `rows(samples, views)` gives float32 logits [n, K] (top-k storage is reconstructed: the k kept
    logits, the tail mass spread evenly over the other classes), the view parameters and labels.
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
        if m.get("format") != "distill-targets" or m.get("version") != FORMAT_VERSION:
            raise DistillError(f"targets: {self.path} is not a version-{FORMAT_VERSION} distill store; "
                               "rebuild it with teach.py --export-only --rebuild-targets")
        self.num_samples, self.views, self.num_classes = m["num_samples"], m["views"], m["num_classes"]
        self.rows_per_sample, self.shard_size = m["rows_per_sample"], m["shard_size"]
        self.storage = m["logits"]["storage"]
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

    def rows(self, samples, views) -> dict[str, np.ndarray]:
        samples = np.atleast_1d(np.asarray(samples, dtype=np.int64))
        views = np.broadcast_to(np.asarray(views, dtype=np.int64), samples.shape)
        if samples.min(initial=0) < 0 or samples.max(initial=-1) >= self.num_samples:
            raise IndexError(f"sample out of range [0, {self.num_samples})")
        if views.min(initial=0) < 0 or views.max(initial=-1) >= self.rows_per_sample:
            raise IndexError(f"view out of range [0, {self.rows_per_sample})")
        shard_of = samples // self.shard_size
        local = (samples - shard_of * self.shard_size) * self.rows_per_sample + views
        out = {"logits": np.empty((len(samples), self.num_classes), np.float32),
               "params": np.empty((len(samples), len(PARAM_COLUMNS)), np.float32),
               "label": np.empty(len(samples), np.int64)}
        for s in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == s)
            rows, shard = local[pick], self._shard(int(s))
            out["params"][pick] = shard["params"][rows]
            out["label"][pick] = shard["label"][(samples[pick] - s * self.shard_size)]
            if self.storage == "full":
                out["logits"][pick] = shard["logits"][rows]
            else:
                out["logits"][pick] = reconstruct_topk(shard["topk_logits"][rows].astype(np.float32),
                                                       shard["topk_index"][rows], shard["lse"][rows],
                                                       self.num_classes)
        return out

    def row(self, sample: int, view: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.rows([sample], [view]).items()}

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
                                   "teach.py --export-only --rebuild-targets")

    def nbytes(self) -> int:
        return sum((self.path / s["file"]).stat().st_size for s in self.manifest["shards"])


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:16] + "…" if len(text) > 20 else text


def reconstruct_topk(values: np.ndarray, index: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Full logits from the top k: kept logits exact; every other class gets log(tail / (K - k)) + lse,
    where tail = 1 - Σ_topk exp(z_i - lse), so softmax at T = 1 has the true tail mass, spread evenly."""
    k = values.shape[1]
    kept = np.exp(values - lse[:, None]).sum(1)
    tail = np.clip(1.0 - kept, 1e-12, None) / max(num_classes - k, 1)
    out = np.repeat((np.log(tail) + lse)[:, None], num_classes, axis=1).astype(np.float32)
    np.put_along_axis(out, index.astype(np.int64), values, axis=1)
    return out
