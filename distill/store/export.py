"""Export: run the frozen teacher over every view and write the store; resume, redo damaged shards or refuse."""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distill.checkpoint import planned_stop
from distill.data import Preprocess
from distill.disk import agree, check_free
from distill.errors import DistillError
from distill.runs import write_json
from distill.store.diagnostics import diagnostics
from distill.store.mixing import store_mixes
from distill.store.reader import TargetStore
from distill.store.samples import Samples, dataset_fingerprint, fingerprint, logits_spec, view_spec
from distill.store.shards import (
    FORMAT_VERSION,
    MANIFEST,
    check_version,
    damaged_shards,
    read_manifest,
    shard_complete,
    shard_name,
    write_shard,
)
from distill.store.views import TeacherViews
from distill.training import ProgressLine


def prepare_store(out: Path, fp: str, rebuild: bool, what: dict) -> str:
    """Decide what to do with `out` before exporting: "fresh", "resume" (same fingerprint, some shards in)
    or "done" (complete, same fingerprint). A store for another teacher/dataset/view spec is refused
    unless `rebuild`; then it is removed."""
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    found = _store_fingerprint(out)
    if found == fp:
        manifest = read_manifest(out) if (out / MANIFEST).is_file() else {}
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
    if (out / MANIFEST).is_file():
        check_version(out, read_manifest(out))  # a store of an older distill: say so, and how to rebuild it
    differs = _what_differs(out, what)
    raise DistillError(f"targets: {out} holds a store for {differs}; pass --rebuild-targets to replace it "
                       "(or point output_dir elsewhere)")


def bytes_per_view(logit_spec: dict, num_classes: int, augmented: bool = False, mixed: bool = False) -> int:
    """A stored row's bytes: its view parameters (5 float32), with `targets.augment` its seed (int64), with
    `targets.mix` its partner (2 int64) and mixing (5 float32), the row's
    logit mean and std (float32 each), and its logits (float16, all K or the top k with their indices and the
    tail's log-sum-exp and mean)."""
    if logit_spec["storage"] == "full":
        logits = 2 * num_classes
    else:
        logits = logit_spec["k"] * (2 + (2 if logit_spec["index_dtype"] == "int16" else 4)) + 8
    return 5 * 4 + (8 if augmented else 0) + (2 * 8 + 5 * 4 if mixed else 0) + 8 + logits


def check_space(spec, num_samples: int, num_classes: int, out: Path, rows: int | None = None) -> str:
    """The store's size, as one line to print; a DistillError when the `rows` still to write (all of them by
    default) do not fit on the disk that holds `out`. teach.py asks before fine-tuning, export before writing."""
    per_view = bytes_per_view(logits_spec(spec, num_classes), num_classes, bool(getattr(spec, "augment", None)),
                              store_mixes(spec))
    total = num_samples * (spec.views + 1)
    rows = total if rows is None else rows
    free = check_free(out, rows * per_view, "targets: the store",
                      f"lower targets.views ({spec.views}), keep top-k logits (targets.logits: topk), "
                      "or free some space")
    return (f"targets: {num_samples} samples x {spec.views + 1} views at {per_view} bytes per view: "
            f"{total * per_view / 2**20:.1f} MiB in all, {rows * per_view / 2**20:.1f} MiB to write "
            f"({free / 2**30:.1f} GiB free)")


def _store_fingerprint(out: Path) -> str | None:
    if (out / MANIFEST).is_file():
        return read_manifest(out).get("fingerprint")
    sidecars = sorted(out.glob("shard-*.json"))
    return json.loads(sidecars[0].read_text()).get("fingerprint") if sidecars else None


def _what_differs(out: Path, what: dict) -> str:
    old = {}
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
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
           accelerator, teacher: dict, rebuild: bool = False, num_workers: int = 0, progress: bool = True,
           progress_seconds: float = 30.0) -> dict:
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
    state = broadcast(state, accelerator)
    if state == "done":
        accelerator.print(f"targets: {out} is complete and matches the teacher; nothing to export")
        return read_manifest(out)
    num_shards = math.ceil(len(samples) / spec.shard_size)
    missing = [s for s in range(num_shards) if not shard_complete(out, s, fp)]
    rows = sum(min(len(samples), (s + 1) * spec.shard_size) - s * spec.shard_size for s in missing) * (spec.views + 1)
    accelerator.print(check_space(spec, len(samples), num_classes, out, rows))
    out.mkdir(parents=True, exist_ok=True)

    # The teacher, frozen in this one place: eval mode, no gradients, inference mode below.
    model.eval().requires_grad_(False)
    mine = [s for s in missing if s % accelerator.num_processes == accelerator.process_index]
    todo = sum(min(len(samples), (s + 1) * spec.shard_size) - s * spec.shard_size for s in mine)
    bar = tqdm(total=todo * (spec.views + 1), desc="targets", unit="view", leave=False,
               disable=None if progress and accelerator.is_local_main_process else True)
    # tqdm hides the bar where stderr is not a terminal (nohup, a pipe, CI): a plain line there instead
    line = ProgressLine(progress_seconds) if progress and accelerator.is_main_process and not sys.stderr.isatty() else None
    done = 0
    start, forward_seconds, failure = time.perf_counter(), 0.0, None
    for s in mine:
        first, last = s * spec.shard_size, min(len(samples), (s + 1) * spec.shard_size)
        loader = DataLoader(TeacherViews(samples, spec, seed, pre, first, last), batch_size=spec.batch_size,
                            num_workers=num_workers)
        parts = {"params": [], "seed": [], "label": [], "logits": [], "partner": [], "mix": []}
        sample = first
        for x, params, seeds, labels, partners, mixes in loader:
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
            parts["seed"].append(seeds.flatten())
            parts["label"].append(labels)
            parts["partner"].append(partners.flatten(0, 1))
            parts["mix"].append(mixes.flatten(0, 1))
            bar.update(len(params.flatten(0, 1)))
            done += len(params.flatten(0, 1))
            if line is not None and line.due():
                line.show(f"targets: {done}/{bar.total} views, {done / line.elapsed():.1f} views/s, "
                          f"ETA {line.eta(done, bar.total - done)}")
        try:
            write_shard(out, s, first, last, fp, what, logit_spec,
                        torch.cat(parts["logits"]), torch.cat(parts["params"]), torch.cat(parts["label"]),
                        torch.cat(parts["seed"]) if getattr(spec, "augment", None) else None,
                        *((torch.cat(parts["partner"]), torch.cat(parts["mix"])) if "mix" in views else ()))
        except DistillError as e:  # the disk filled up: the complete shards stay, the failed one is gone
            failure = str(e)
            break
        planned_stop("export", s, "shard")  # tests: a kill between two shards
    bar.close()
    failure = agree(accelerator, failure)  # every process stops, not only the one whose write failed
    if failure:
        raise DistillError(failure)
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
    return manifest if manifest is not None else read_manifest(out)


def broadcast(value, accelerator):
    """The main process's `value` on every process (export's decision, a sweep's trial)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value])[0]


def _finish(out, fp, num_shards, samples, classes, spec, views, logit_spec, data_fp, teacher, export_stats):
    shards = []
    for s in range(num_shards):
        if not shard_complete(out, s, fp):
            raise RuntimeError(f"targets: shard {s} missing after export")  # a bug, not bad input
        info = json.loads((out / f"{shard_name(s)}.json").read_text())
        shards.append({"file": f"{shard_name(s)}.safetensors", "first_sample": info["first_sample"],
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
