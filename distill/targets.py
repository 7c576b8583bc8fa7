"""The soft-target store: draw and render replayable views, export teacher logits to shards, read them memory-mapped.

Layout of `targets/` (format version 1):

    manifest.json                  written last; `complete: true` only when every shard is in
    shard-00000.safetensors        rows of samples [first_sample, first_sample + num_samples)
    shard-00000.json               the shard's sidecar: its sha256 and fingerprint (marks it complete)

A sample has `views + 1` rows: `views` random views (the student's random-resized-crop box and flip,
drawn from a generator seeded by (seed, sample, view), so any process draws the same) and one
deterministic center view, row `views`. Row r of a shard is sample `first_sample + r // (views + 1)`,
view `r % (views + 1)`. Tensors per shard:

    params  float32 [rows, 5]   y0, x0, y1, x1 (normalised crop box), flip (0/1)
    label   int64   [samples]   -1 for unlabeled images
    logits  float16 [rows, K]   storage "full"; or, storage "topk":
    topk_logits float16 [rows, k], topk_index int16/int32 [rows, k], lse float32 [rows] (log-sum-exp of
    all K logits, so the tail mass 1 - Σ softmax over the top k is known)

Each model renders a view for itself: crop the box out of the original image, resize to its own input
size, flip, normalise with its own mean/std; so the student sees the very pixels the teacher saw.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill.data import INTERPOLATIONS, Preprocess, Split
from distill.errors import DistillError
from distill.models import sha256_file
from distill.runs import write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAM_COLUMNS = ("y0", "x0", "y1", "x1", "flip")
FLOAT16_MAX = 65504.0


# --- views ---------------------------------------------------------------------
def draw_view(spec, seed: int, sample: int, view: int, height: int, width: int) -> np.ndarray:
    """One random view's parameters (PARAM_COLUMNS): torchvision's RandomResizedCrop box, then a flip.

    The generator is seeded by (seed, sample, view) alone, so the draw does not depend on batching,
    workers or processes, and an interrupted export redraws exactly the same views.
    """
    rng = np.random.default_rng([seed, sample, view])
    area = height * width
    log_ratio = np.log(spec.ratio)
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            break
    else:  # torchvision's fallback: the whole image, clamped to the ratio range
        h, w, y, x = _center_box(height, width, 1.0, spec.ratio)
    flip = float(rng.random() < spec.hflip)
    return np.array([y / height, x / width, (y + h) / height, (x + w) / width, flip], dtype=np.float32)


def center_view(spec, height: int, width: int) -> np.ndarray:
    """The deterministic test view: `center_crop_pct` of the shorter side, centred, no flip."""
    h, w, y, x = _center_box(height, width, spec.center_crop_pct, None)
    return np.array([y / height, x / width, (y + h) / height, (x + w) / width, 0.0], dtype=np.float32)


def _center_box(height, width, pct, ratio):
    if ratio is not None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            h, w = height, width
    else:
        h = w = max(1, round(min(height, width) * pct))
    return h, w, (height - h) // 2, (width - w) // 2


def view_params(spec, seed: int, sample: int, height: int, width: int) -> np.ndarray:
    """All rows of one sample: `spec.views` random views, then the center view. [views + 1, 5]"""
    rows = [draw_view(spec, seed, sample, v, height, width) for v in range(spec.views)]
    return np.stack(rows + [center_view(spec, height, width)])


def render(image: np.ndarray, params: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """The view's pixels for a model of input `size`: crop the box, resize, flip. uint8 [size, size, 3]."""
    height, width = image.shape[:2]
    y0, y1 = _pixels(params[0], params[2], height)
    x0, x1 = _pixels(params[1], params[3], width)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    out = cv2.resize(crop, (size, size), interpolation=INTERPOLATIONS[interpolation])
    return out[:, ::-1] if params[4] >= 0.5 else out


def _pixels(lo: float, hi: float, n: int) -> tuple[int, int]:
    # boxes are stored as i / n in float32; rounding back gives the very same pixel rows
    a, b = round(float(lo) * n), round(float(hi) * n)
    return a, max(b, a + 1)


def to_tensor(images: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W] normalised with the model's own mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class Samples:
    """The store's samples in order: the labeled training split, then the unlabeled images (label -1)."""

    def __init__(self, train: Split, unlabeled: Split | None = None):
        self.parts = [train] + ([unlabeled] if unlabeled is not None and len(unlabeled) else [])
        self.num_labeled = len(train)
        self.labels = np.concatenate([train.labels] + [np.full(len(p), -1, np.int64) for p in self.parts[1:]])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        if i < self.num_labeled:
            return self.parts[0].load(i)
        return self.parts[1].load(i - self.num_labeled)

    def describe(self, i: int) -> str:
        return self.parts[0].describe(i) if i < self.num_labeled else self.parts[1].describe(i - self.num_labeled)


class _TeacherViews(Dataset):
    """Sample i → its views as the teacher sees them [V + 1, 3, S, S], their parameters, its label."""

    def __init__(self, samples: Samples, spec, seed: int, pre: Preprocess, first: int, last: int):
        self.samples, self.spec, self.seed, self.pre = samples, spec, seed, pre
        self.first, self.last = first, last

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, j: int):
        i = self.first + j
        image = self.samples.load(i)
        params = view_params(self.spec, self.seed, i, *image.shape[:2])
        pixels = np.stack([render(image, p, self.pre.input_size, self.pre.interpolation) for p in params])
        return to_tensor(pixels, self.pre), torch.from_numpy(params), int(self.samples.labels[i])


# --- fingerprints --------------------------------------------------------------
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
    return {"sampler": "rrc-flip-v1", "columns": list(PARAM_COLUMNS), "views": spec.views, "seed": seed,
            "scale": list(spec.scale), "ratio": list(spec.ratio), "hflip": spec.hflip,
            "center_crop_pct": spec.center_crop_pct}


def logits_spec(spec, num_classes: int) -> dict:
    full = spec.logits == "full" or (spec.logits == "auto" and num_classes <= spec.full_max_classes)
    # out-of-fold targets are other logits of the same teacher: part of the spec, so of the store's fingerprint
    source = {"source": "out-of-fold"} if getattr(spec, "oof", False) else {}
    if full:
        return {"storage": "full", "dtype": "float16", **source}
    k = min(spec.topk, num_classes)
    return {"storage": "topk", "dtype": "float16", "k": k, "index_dtype": "int16" if num_classes < 2**15 else "int32",
            "lse": "float32", **source}


def fingerprint(teacher_sha256: str, dataset: str, views: dict, logits: dict, shard_size: int) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, "teacher": teacher_sha256, "dataset": dataset, "views": views,
                       "logits": logits, "shard_size": shard_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- export ----------------------------------------------------------------------
def prepare_store(out: Path, fp: str, rebuild: bool, what: dict) -> str:
    """Decide what to do with `out` before exporting: "fresh", "resume" (same fingerprint, some shards in)
    or "done" (complete, same fingerprint). A store for another teacher/dataset/view spec is refused
    unless `rebuild`; then it is removed."""
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    found = _store_fingerprint(out)
    if found == fp:
        manifest = _read_manifest(out) if (out / MANIFEST).is_file() else {}
        if not manifest.get("complete"):
            return "resume"
        damaged = damaged_shards(out, manifest)
        if not damaged:
            return "done"
        # a shard truncated or altered since: the store is incomplete again, and those shards are exported anew
        for name in damaged:
            for path in (out / name, (out / name).with_suffix(".json")):
                path.unlink(missing_ok=True)
        write_json(out / MANIFEST, {**manifest, "complete": False})
        print(f"targets: {', '.join(damaged)} damaged (sha256 differs from the manifest): exporting again",
              flush=True)
        return "resume"
    if rebuild:
        shutil.rmtree(out)
        return "fresh"
    differs = _what_differs(out, what)
    raise DistillError(f"targets: {out} holds a store for {differs}; pass --rebuild-targets to replace it "
                       "(or point output_dir elsewhere)")


def damaged_shards(out: Path, manifest: dict) -> list[str]:
    """The shard files of a manifest that are missing or whose sha256 is not the recorded one."""
    return [sh["file"] for sh in manifest["shards"]
            if not (out / sh["file"]).is_file() or sha256_file(out / sh["file"]) != sh["sha256"]]


def _store_fingerprint(out: Path) -> str | None:
    if (out / MANIFEST).is_file():
        return _read_manifest(out).get("fingerprint")
    sidecars = sorted(out.glob("shard-*.json"))
    return json.loads(sidecars[0].read_text()).get("fingerprint") if sidecars else None


def _what_differs(out: Path, what: dict) -> str:
    old = {}
    if (out / MANIFEST).is_file():
        m = _read_manifest(out)
        old = {"teacher": m.get("teacher", {}).get("sha256"), "dataset": m.get("dataset", {}).get("fingerprint"),
               "views": m.get("view_spec"), "logits": m.get("logits")}
    else:
        sidecars = sorted(out.glob("shard-*.json"))
        old = json.loads(sidecars[0].read_text()).get("what", {}) if sidecars else {}
    names = {"teacher": "another teacher (weights sha256)", "dataset": "another dataset",
             "views": "another view spec (targets.*)", "logits": "another logit storage"}
    diffs = [names[k] for k in names if old.get(k) != what.get(k)]
    return " and ".join(diffs) if diffs else "another recipe"


def export(model, pre: Preprocess, samples: Samples, classes: list[str], spec, seed: int, out: Path,
           accelerator, teacher: dict, rebuild: bool = False, num_workers: int = 0, progress: bool = True) -> dict:
    """Run the frozen teacher over every (sample, view) and write the store; returns the manifest.

    Each process writes the shards s with s % num_processes == its index; shards already complete
    (an interrupted run) are kept. The main process writes the manifest once all shards are in.
    `teacher` holds at least `sha256` (of its weights) and what later stages must know about it.
    """
    num_classes = len(classes)
    views, logit_spec = view_spec(spec, seed), logits_spec(spec, num_classes)
    data_fp = dataset_fingerprint(samples, classes)
    what = {"teacher": teacher["sha256"], "dataset": data_fp, "views": views, "logits": logit_spec}
    fp = fingerprint(teacher["sha256"], data_fp, views, logit_spec, spec.shard_size)
    state = prepare_store(out, fp, rebuild, what) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    state = _broadcast(state, accelerator)
    if state == "done":
        accelerator.print(f"targets: {out} is complete and matches the teacher; nothing to export")
        return _read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)

    # The teacher, frozen in this one place: eval mode, no gradients, inference mode below.
    model.eval().requires_grad_(False)
    num_shards = math.ceil(len(samples) / spec.shard_size)
    mine = [s for s in range(num_shards) if s % accelerator.num_processes == accelerator.process_index
            and not _shard_complete(out, s, fp)]
    todo = sum(min(len(samples), (s + 1) * spec.shard_size) - s * spec.shard_size for s in mine)
    bar = tqdm(total=todo * (spec.views + 1), desc="targets", unit="view", leave=False,
               disable=None if progress and accelerator.is_local_main_process else True)
    start, forward_seconds = time.perf_counter(), 0.0
    for s in mine:
        first, last = s * spec.shard_size, min(len(samples), (s + 1) * spec.shard_size)
        loader = DataLoader(_TeacherViews(samples, spec, seed, pre, first, last), batch_size=spec.batch_size,
                            num_workers=num_workers)
        parts = {"params": [], "label": [], "logits": []}
        sample = first
        for x, params, labels in loader:
            t0 = time.perf_counter()
            # channels-last: a DataLoader worker hands over NCHW copies, on which oneDNN's depthwise
            # convolutions (EfficientNet, MobileNet teachers) run ~3x slower (benchmarks/export.py)
            ids = torch.arange(sample, sample + len(labels)).repeat_interleave(x.shape[1])
            sample += len(labels)
            x = x.flatten(0, 1).to(accelerator.device, memory_format=torch.channels_last)
            with torch.inference_mode(), accelerator.autocast():
                # a model that routes by sample (models.OutOfFold) is told which sample each row is
                z = model(x, ids) if getattr(model, "routes_by_sample", False) else model(x)
            parts["logits"].append(z.float().cpu())  # float32 before any rounding, top-k or log-sum-exp
            forward_seconds += time.perf_counter() - t0
            parts["params"].append(params.flatten(0, 1))
            parts["label"].append(labels)
            bar.update(len(params.flatten(0, 1)))
        _write_shard(out, s, first, last, fp, what, logit_spec,
                     torch.cat(parts["logits"]), torch.cat(parts["params"]), torch.cat(parts["label"]))
    bar.close()
    seconds = time.perf_counter() - start
    rows_done = todo * (spec.views + 1)
    speed = torch.tensor([rows_done, seconds, forward_seconds], dtype=torch.float64, device=accelerator.device)
    speed = accelerator.reduce(speed, "sum")
    accelerator.wait_for_everyone()
    manifest = None
    if accelerator.is_main_process:
        rows, secs, fwd = speed.tolist()
        export_stats = {"views_per_sec": rows / max(secs / accelerator.num_processes, 1e-9),
                        "forward_views_per_sec": rows / max(fwd / accelerator.num_processes, 1e-9),
                        "seconds": secs / accelerator.num_processes, "num_processes": accelerator.num_processes,
                        "rows_exported_now": int(rows)}
        manifest = _finish(out, fp, num_shards, samples, classes, spec, views, logit_spec, data_fp, teacher,
                           export_stats)
        accelerator.print(f"targets: {manifest['num_samples']} samples x {spec.views + 1} views -> {out} "
                          f"({export_stats['views_per_sec']:.0f} views/s, teacher top-1 on center views "
                          f"{manifest['diagnostics']['top1_center']:.4f})")
    accelerator.wait_for_everyone()
    return manifest if manifest is not None else _read_manifest(out)


def _broadcast(value, accelerator):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value])[0]


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _shard_complete(out: Path, s: int, fp: str) -> bool:
    """A shard counts only when its sidecar exists, carries this fingerprint and its sha256 matches."""
    sidecar, data = out / f"{_shard_name(s)}.json", out / f"{_shard_name(s)}.safetensors"
    if not (sidecar.is_file() and data.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text())
    except ValueError:
        return False
    return info.get("fingerprint") == fp and info.get("sha256") == sha256_file(data)


def _write_shard(out: Path, s: int, first: int, last: int, fp: str, what: dict, logit_spec: dict,
                 logits: torch.Tensor, params: torch.Tensor, labels: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {"params": params.float().contiguous(), "label": labels.long().contiguous()}
    if logit_spec["storage"] == "full":
        tensors["logits"] = logits.clamp(-FLOAT16_MAX, FLOAT16_MAX).half()
    else:
        top = logits.topk(logit_spec["k"], dim=-1)
        tensors["topk_logits"] = top.values.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().contiguous()
        tensors["topk_index"] = top.indices.to(getattr(torch, logit_spec["index_dtype"])).contiguous()
        tensors["lse"] = logits.logsumexp(-1).float().contiguous()
    name = _shard_name(s)
    tmp = out / f".{name}.safetensors.tmp"
    # one metadata key: safetensors writes several in hash order, and then equal shards would differ in bytes
    about = json.dumps({"fingerprint": fp, "first_sample": first, "last_sample": last}, sort_keys=True)
    save_file(tensors, str(tmp), metadata={"distill": about})
    os.replace(tmp, out / f"{name}.safetensors")
    # the sidecar is the shard's "complete" mark: written after the data, also through a rename
    write_json(out / f"{name}.json", {"shard": s, "first_sample": first, "num_samples": last - first,
                                      "rows": len(params), "sha256": sha256_file(out / f"{name}.safetensors"),
                                      "fingerprint": fp, "what": what})


def _finish(out, fp, num_shards, samples, classes, spec, views, logit_spec, data_fp, teacher, export_stats):
    shards = []
    for s in range(num_shards):
        if not _shard_complete(out, s, fp):
            raise RuntimeError(f"targets: shard {s} missing after export")  # a bug, not bad input
        info = json.loads((out / f"{_shard_name(s)}.json").read_text())
        shards.append({"file": f"{_shard_name(s)}.safetensors", "first_sample": info["first_sample"],
                       "num_samples": info["num_samples"], "rows": info["rows"], "sha256": info["sha256"]})
    manifest = {
        "format": "distill-targets", "version": FORMAT_VERSION, "complete": False, "fingerprint": fp,
        "num_samples": len(samples), "num_labeled": samples.num_labeled,
        "num_unlabeled": len(samples) - samples.num_labeled, "views": spec.views,
        "rows_per_sample": spec.views + 1, "center_view": spec.views, "shard_size": spec.shard_size,
        "num_classes": len(classes), "classes": list(classes), "logits": logit_spec,
        "teacher": teacher, "dataset": {"fingerprint": data_fp, "parts": [p.name for p in samples.parts]},
        "view_spec": views, "shards": shards, "export": export_stats,
    }
    write_json(out / MANIFEST, manifest)  # incomplete until the diagnostics below read every shard
    store = TargetStore(out, allow_incomplete=True)
    manifest["diagnostics"] = diagnostics(store)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return manifest


# --- reading -----------------------------------------------------------------------
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


def _read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{out / MANIFEST}: unreadable ({e}); rebuild the store with "
                           "teach.py --export-only --rebuild-targets") from None


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
        self.manifest = m = _read_manifest(self.path)
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


# --- diagnostics ---------------------------------------------------------------------
def diagnostics(store: TargetStore, chunk: int = 4096) -> dict:
    """Teacher quality on its own views, and the label-smoothing signature of its center-view outputs.

    A teacher trained with label smoothing α cannot be more confident than 1 - α + α/K, and spreads its
    remaining mass evenly over the other classes (Müller et al. 2019). So: `implied_alpha` = the α whose
    ceiling is the 99th percentile of max-probability, and `nontarget_uniformity` = the mean normalised
    entropy of the non-argmax probabilities over confidently right samples (1 = perfectly even).
    `label_smoothing_suspected` when implied_alpha >= 0.03 and nontarget_uniformity >= 0.85.
    """
    n_lab, k = store.manifest["num_labeled"], store.num_classes
    correct_views = correct_center = 0
    max_probs, uniformity = [], []
    for lo in range(0, n_lab, chunk):
        samples = np.arange(lo, min(n_lab, lo + chunk))
        for v in range(store.rows_per_sample):
            r = store.rows(samples, np.full(len(samples), v))
            p = torch.from_numpy(r["logits"]).softmax(-1)
            conf, pred = p.max(-1)
            right = pred.numpy() == r["label"]
            if v == store.manifest["center_view"]:
                correct_center += right.sum()
                max_probs.append(conf.numpy())
                sure = right & (conf.numpy() > 0.5)
                if sure.any() and k > 2:
                    rest = p[torch.from_numpy(sure)].clone()
                    rest.scatter_(1, pred[torch.from_numpy(sure)].unsqueeze(1), 0.0)
                    rest = rest / rest.sum(1, keepdim=True).clamp(min=1e-12)
                    ent = -(rest * rest.clamp(min=1e-12).log()).sum(1) / math.log(k - 1)
                    uniformity.append(ent.numpy())
            else:
                correct_views += right.sum()
    max_probs = np.concatenate(max_probs) if max_probs else np.zeros(0)
    p99 = float(np.quantile(max_probs, 0.99)) if len(max_probs) else 1.0
    implied_alpha = max(0.0, (1 - p99) * k / (k - 1))
    # None (JSON null), not NaN, when no sample is confidently right: an untrained teacher shows no signature
    uniform = float(np.concatenate(uniformity).mean()) if uniformity else None
    return {
        "top1_views": float(correct_views / max(n_lab * store.views, 1)),
        "top1_center": float(correct_center / max(n_lab, 1)),
        "mean_max_prob": float(max_probs.mean()) if len(max_probs) else None,
        "max_prob_p99": p99,
        "implied_alpha": implied_alpha,
        "ls_ceiling": 1 - implied_alpha + implied_alpha / k,
        "nontarget_uniformity": uniform,
        "label_smoothing_suspected": bool(implied_alpha >= 0.03 and uniform is not None and uniform >= 0.85),
    }


# --- the student's side ----------------------------------------------------------------
class ReplayDataset(Dataset):
    """(student image of a stored view, label or -1, teacher logits float32 [K]) for every sample.

    `view="random"` picks one of the random views per sample and epoch (call `set_epoch`);
    `view="center"` always the center view (evaluation, FixRes).
    """

    def __init__(self, store: TargetStore, samples: Samples, pre: Preprocess, view: str = "random", seed: int = 0,
                 teacher_pre: Preprocess | None = None):
        # teacher_pre: also yield the view as the teacher sees it (online distillation)
        if len(samples) != len(store):
            raise DistillError(f"targets: the store at {store.path} has {len(store)} samples, the data "
                               f"{len(samples)}; rebuild it with teach.py --export-only --rebuild-targets")
        self.store, self.samples, self.pre, self.view, self.seed = store, samples, pre, view, seed
        self.teacher_pre = teacher_pre
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def view_of(self, i: int) -> int:
        if self.view == "center":
            return self.store.manifest["center_view"]
        return int(np.random.default_rng([self.seed, self.epoch, i]).integers(self.store.views))

    def __getitem__(self, i: int):
        row = self.store.row(i, self.view_of(i))
        image = self.samples.load(i)
        pixels = render(image, row["params"], self.pre.input_size, self.pre.interpolation)
        item = (to_tensor(pixels, self.pre), int(row["label"]), torch.from_numpy(row["logits"]))
        if self.teacher_pre is not None:
            t = self.teacher_pre
            item += (to_tensor(render(image, row["params"], t.input_size, t.interpolation), t),)
        return item


# --- distill inspect ----------------------------------------------------------------------
def summary(path) -> str:
    """What `distill inspect <run>/targets` prints."""
    store = TargetStore(path, allow_incomplete=True)
    m, d = store.manifest, store.manifest.get("diagnostics", {})
    size = store.nbytes()
    rows = m["num_samples"] * m["rows_per_sample"]
    lines = [
        f"store        {store.path}  ({'complete' if m.get('complete') else 'INCOMPLETE'}, format {m['version']})",
        f"samples      {m['num_samples']} ({m['num_labeled']} labeled, {m['num_unlabeled']} unlabeled)",
        f"views        {m['views']} random + 1 center per sample = {rows} rows",
        f"classes      {m['num_classes']}",
        f"logits       {m['logits']['storage']} {m['logits']['dtype']}"
        + (f", k={m['logits']['k']} + log-sum-exp" if m["logits"]["storage"] == "topk" else ""),
        f"size         {size / 2**20:.2f} MiB in {len(m['shards'])} shard(s), {size / max(rows, 1):.1f} bytes/view",
        (f"teacher      {m['teacher'].get('model')} sha256 {m['teacher']['sha256'][:12]}…, "
         f"input {m['teacher'].get('input_size')} px, trained with label smoothing: "
         f"{m['teacher'].get('trained_with_label_smoothing')}"),
        (f"views spec   scale {m['view_spec']['scale']}, ratio {[round(r, 3) for r in m['view_spec']['ratio']]}, "
         f"hflip {m['view_spec']['hflip']}, center crop {m['view_spec']['center_crop_pct']}, "
         f"seed {m['view_spec']['seed']}"),
    ]
    if d:
        lines += [
            f"teacher top1 {d['top1_views']:.4f} on random views, {d['top1_center']:.4f} on center views",
            f"confidence   mean max-prob {_fmt(d['mean_max_prob'])}, p99 {d['max_prob_p99']:.4f}",
            (f"LS signature implied alpha {d['implied_alpha']:.3f}, non-target uniformity "
             f"{_fmt(d['nontarget_uniformity'])} -> label smoothing suspected: {d['label_smoothing_suspected']}"),
        ]
    if m.get("export"):
        e = m["export"]
        lines.append(f"export       {e['views_per_sec']:.0f} views/s ({e['forward_views_per_sec']:.0f} views/s "
                     f"teacher forward alone), {e['num_processes']} process(es)")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def teacher_record(info: dict) -> dict:
    """The manifest's `teacher` entry from the saved teacher's model.json."""
    extra = info.get("extra", {})
    pre = info.get("preprocess", {})
    return {"model": info.get("model"), "sha256": info["sha256"], "input_size": pre.get("input_size"),
            "mean": pre.get("mean"), "std": pre.get("std"), "interpolation": pre.get("interpolation"),
            "label_smoothing": extra.get("label_smoothing"),
            "pretrain_label_smoothing": extra.get("pretrain_label_smoothing"),
            "fine_tuned": extra.get("fine_tuned"),
            "trained_with_label_smoothing": extra.get("trained_with_label_smoothing")}

