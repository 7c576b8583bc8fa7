"""Benchmark: soft-target export speed vs the bare teacher forward, store size, random-row reads vs a student step, top-k error.

    python benchmarks/export.py [--samples 2000] [--views 4] [--input-size 64] [--workers 0]

The teacher is the efficientnet-lite0 card (real ImageNet weights from a pip package, offline) on
Fashion-MNIST; it is not fine-tuned: a speed benchmark does not depend on what the head learned.
Prints markdown tables; always exits 0 (targets are reported as PASS/FAIL).
"""
import argparse
import contextlib
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill import store
from distill.data import load_splits
from distill.models import build_model, save_model
from distill.recipe import recipe_from_dict

EXPORT_TARGET, READ_TARGET = 0.9, 5.0  # export/forward >= 0.9; a read batch <= 5 % of a student step
TOPK = (5, 10, 20)
TEMPERATURES = (1.0, 4.0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000, help="Fashion-MNIST training images in the store")
    p.add_argument("--views", type=int, default=4, help="random views per sample (+1 center view)")
    p.add_argument("--input-size", type=int, default=64, help="teacher input size (px)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers of the export (data.num_workers; on 2 cores a worker steals the forward's CPU)")
    p.add_argument("--topk-samples", type=int, default=200, help="samples of the 1000-class store for the top-k error")
    p.add_argument("--read-batches", type=int, default=200, help="random 128-row batches read from the store")
    return p.parse_args()


def make_recipe(args):
    """The benchmark's recipe: the card's teacher at --input-size, as recipes/fashion-mnist.yaml overrides it."""
    return recipe_from_dict({
        "name": "bench-export", "data": {"source": "fashion-mnist", "subset": args.samples},
        "teacher": {"card": "efficientnet-lite0", "input_size": args.input_size},
        "targets": {"views": args.views, "logits": "full"},
    })


def build_teacher(recipe, classes: list[str], out: Path):
    """The card's model for `classes`, saved once so its sha256 goes into the store as teach.py's does."""
    model, pre = build_model(recipe.teacher, len(classes), classes=classes)
    info = save_model(model, pre, out, classes,
                      extra={"pretrain_label_smoothing": recipe.teacher.pretrain_label_smoothing})
    return model, pre, store.teacher_record(info)


def prerender(samples, spec, seed, pre) -> list[torch.Tensor]:
    """The export's batches, rendered ahead: [batch_size * (views + 1), 3, S, S] each, in export order.

    Left as `to_tensor` makes them: the channels of an HWC image moved to the front, so the memory is
    channels-last (what the export's forward gets with 0 workers; a worker's collate makes it NCHW).
    """
    views = []
    for i in range(len(samples)):
        image = samples.load(i)
        params = store.view_params(spec, seed, i, *image.shape[:2])
        views.append(np.stack([store.render(image, p, pre.input_size, pre.interpolation) for p in params]))
    return [store.to_tensor(np.stack(views[lo:lo + spec.batch_size]), pre).flatten(0, 1)
            for lo in range(0, len(views), spec.batch_size)]


def bare_forward(model, x, accelerator) -> float:
    """Seconds for one pre-rendered batch through the teacher alone, called exactly as export() calls it."""
    model.eval().requires_grad_(False)
    start = time.perf_counter()
    with torch.inference_mode(), accelerator.autocast():
        z = model(x.to(accelerator.device))
    z.float().cpu()
    return time.perf_counter() - start


def bare_forwards(model, layouts: dict, which, accelerator) -> dict:
    """Seconds per layout over the batches `which` it holds ({index: batch}), alternating batch by batch."""
    seconds = dict.fromkeys(layouts, 0.0)
    for i in which:
        for name, batches in layouts.items():
            if i in batches:
                seconds[name] += bare_forward(model, batches[i], accelerator)
    return seconds


def student_step_seconds(steps: int = 4) -> float:
    """Median wall time of one resnet18 training step: batch 128 at 32 px, forward + backward + SGD."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 1):  # one warm-up step
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 1:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def read_seconds(reader, batches: int, batch: int = 128) -> float:
    """Seconds per `TargetStore.rows` call on `batch` random (sample, view) pairs."""
    rng = np.random.default_rng(0)
    picks = [(rng.integers(reader.num_samples, size=batch), rng.integers(reader.rows_per_sample, size=batch))
             for _ in range(batches + 5)]
    for s, v in picks[:5]:  # map the shards, as a worker's first batches do
        reader.rows(s, v)
    start = time.perf_counter()
    for s, v in picks[5:]:
        reader.rows(s, v)
    return (time.perf_counter() - start) / batches


def old_reconstruct(values: np.ndarray, index: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """The reconstruction of store format 1, for the table: an even tail at 1 - Σ exp(float16 top - lse of all K)."""
    kept = np.exp(values - lse[:, None]).sum(1)
    tail = np.clip(1.0 - kept, 1e-12, None) / max(num_classes - values.shape[1], 1)
    out = np.repeat((np.log(tail) + lse)[:, None], num_classes, axis=1).astype(np.float32)
    np.put_along_axis(out, index.astype(np.int64), values, axis=1)
    return out


def topk_errors(full: np.ndarray, k: int) -> dict:
    """KL(full ‖ top-k reconstruction) per row at each temperature, old (format 1) and new (the library's)."""
    z = torch.from_numpy(full)
    top = z.topk(k, dim=-1)
    # float16 top-k values as the store keeps them (already exact: `full` came out of a float16 store)
    values, index = top.values.half().float().numpy(), top.indices.numpy().astype(np.int16)
    tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, top.indices, False)
    tail_lse = z.masked_fill(~tail, -float("inf")).logsumexp(-1).numpy()  # as the shard writer keeps them
    tail_mean = (z.masked_fill(~tail, 0.0).sum(-1) / max(full.shape[1] - k, 1)).numpy()
    recon = {"old": old_reconstruct(values, index, z.logsumexp(-1).numpy(), full.shape[1]),
             "new": {t: store.reconstruct_topk(values, index, tail_lse, tail_mean, full.shape[1], t)
                     for t in TEMPERATURES}}
    out = {"tail": float(np.exp(tail_lse - z.logsumexp(-1).numpy()).mean())}
    for t in TEMPERATURES:
        logp = torch.from_numpy(full).double().div(t).log_softmax(-1)
        for name, r in recon.items():
            r = r[t] if isinstance(r, dict) else r  # new: rebuilt for the temperature it is used at
            logq = torch.from_numpy(r).double().div(t).log_softmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            # the tail's mass at T, reconstructed / true: the spread's error alone, whatever the classes' order
            ratio = (logq.exp() * tail).sum(-1) / (logp.exp() * tail).sum(-1)
            out[name, t] = (float(kl.mean()), float(kl.max()), float(ratio.mean()))
    return out


def table(header: list[str], *rows: list) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    args = parse_args()
    from accelerate import Accelerator

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    accelerator = Accelerator(cpu=True)
    sections = []  # printed at the end, so the library's own log lines do not cut into the tables

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        recipe = make_recipe(args)
        train, _ = load_splits(recipe.data)
        samples = store.Samples(train)
        model, pre, teacher = build_teacher(recipe, train.classes, tmp / "teacher")
        spec, seed = recipe.targets, recipe.seed

        # 1. export vs the bare forward on the same views and batches
        batches = prerender(samples, spec, seed, pre)
        n_views = sum(len(b) for b in batches)
        # The same views in two memory layouts: as `to_tensor` renders them (channels-last) and NCHW-contiguous,
        # as a DataLoader worker's collate hands them to the export. Other jobs on the machine make the speed
        # drift, so the layouts alternate batch by batch, half of the batches before the export, half after.
        # The NCHW rate is taken on every second batch, to keep the run short.
        layouts = {"to_tensor": dict(enumerate(batches)),
                   "nchw": {i: b.contiguous() for i, b in enumerate(batches) if i % 2 == 0}}
        for xs in layouts.values():  # warm-up: oneDNN builds its kernels for each layout on first use
            bare_forward(model, xs[0], accelerator)
        before = bare_forwards(model, layouts, range(len(batches) // 2), accelerator)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the library's one-line summary, off the tables
            manifest = store.export(model, pre, samples, train.classes, spec, seed, tmp / "targets", accelerator,
                                    teacher, num_workers=args.workers, progress=False)
        exp_s = time.perf_counter() - t0
        after = bare_forwards(model, layouts, range(len(batches) // 2, len(batches)), accelerator)
        n_nchw = sum(len(b) for b in layouts["nchw"].values())
        del layouts
        fwd_s, nchw_s = before["to_tensor"] + after["to_tensor"], before["nchw"] + after["nchw"]
        loop = manifest["export"]
        ratio, ratio_nchw = fwd_s / exp_s, (n_views / exp_s) / (n_nchw / nchw_s)
        sections.append(("1. Export throughput vs the bare teacher forward", table(
            ["measurement", "views", "seconds", "views/s"],
            ["bare teacher forward, pre-rendered `to_tensor` output (channels-last memory)", n_views,
             f"{fwd_s:.1f}", f"{n_views / fwd_s:.1f}"],
            ["bare teacher forward, the same views made NCHW-contiguous (as a DataLoader worker collates them)",
             n_nchw, f"{nchw_s:.1f}", f"{n_nchw / nchw_s:.1f}"],
            [f"`targets.export` end to end, {args.workers} DataLoader worker(s)", n_views, f"{exp_s:.1f}",
             f"{n_views / exp_s:.1f}"],
            ["export loop alone, as the manifest reports it (`export.views_per_sec`)",
             loop["rows_exported_now"], f"{loop['seconds']:.1f}", f"{loop['views_per_sec']:.1f}"],
            ["teacher forward inside the export loop (`export.forward_views_per_sec`)",
             loop["rows_exported_now"], f"{loop['rows_exported_now'] / loop['forward_views_per_sec']:.1f}",
             f"{loop['forward_views_per_sec']:.1f}"],
        ) + "\n\n" + table(
            ["ratio", "value", "target", "result"],
            ["export end to end / bare forward (pre-rendered `to_tensor` output)", f"{ratio:.3f}",
             f"≥ {EXPORT_TARGET}", "PASS" if ratio >= EXPORT_TARGET else "FAIL"],
            ["export end to end / bare forward (NCHW-contiguous)", f"{ratio_nchw:.3f}", f"≥ {EXPORT_TARGET}",
             "PASS" if ratio_nchw >= EXPORT_TARGET else "FAIL"],
            ["export loop / its own forward (same moment, so immune to other jobs' load)",
             f"{loop['views_per_sec'] / loop['forward_views_per_sec']:.3f}", "—", "—"],
        ) + f"\n\nBatches of {spec.batch_size} samples × {spec.views + 1} views = {len(batches[0])} views, "
            "`inference_mode` + `accelerator.autocast()` (fp32 on CPU) in every row. End to end = the "
            "`targets.export` call: render in the workers, forward, write and hash the shard, manifest, "
            "diagnostics. The bare forwards alternate layouts batch by batch (NCHW on every second batch), half of "
            "the batches before the export and half after it."))

        # 2. size on disk
        reader = store.TargetStore(tmp / "targets")
        n_rows = reader.num_samples * reader.rows_per_sample
        shard_bytes = reader.nbytes()
        dir_bytes = sum(p.stat().st_size for p in (tmp / "targets").iterdir())
        sections.append(("2. Store size on disk", table(
            ["classes", "logits", "rows (samples × views)", "logit bytes/view", "shard bytes/view", "shards",
             "store incl. manifest and sidecars"],
            [reader.num_classes, f"{reader.storage} {manifest['logits']['dtype']}",
             f"{n_rows} ({reader.num_samples} × {reader.rows_per_sample})", 2 * reader.num_classes,
             f"{shard_bytes / n_rows:.1f}", f"{shard_bytes / 2**20:.3f} MiB", f"{dir_bytes / 2**20:.3f} MiB"],
        )))

        # 3. random-row reads vs one student step
        per_batch = read_seconds(reader, args.read_batches)
        step = student_step_seconds()
        share = 100 * per_batch / step
        sections.append(("3. Random-row reads vs one student training step", table(
            ["read", "rows/s", "s/batch", "student step s (resnet18, 128 × 32 px, fwd + bwd + SGD)",
             "read / step", "target", "result"],
            [f"`TargetStore.rows`, 128 random (sample, view), {args.read_batches} batches",
             f"{128 / per_batch:,.0f}", f"{per_batch:.2e}", f"{step:.3f}", f"{share:.3f} %",
             f"≤ {READ_TARGET:.0f} %", "PASS" if share <= READ_TARGET else "FAIL"],
        )))

        # 4. top-k error: the card's own 1000-class ImageNet head on the same Fashion-MNIST views
        n_topk = min(args.topk_samples, len(train))
        imagenet = [f"imagenet-{i}" for i in range(1000)]
        model_k, pre_k, teacher_k = build_teacher(recipe, imagenet, tmp / "teacher-1000")
        with contextlib.redirect_stdout(sys.stderr):
            store.export(model_k, pre_k, store.Samples(train.subset(np.arange(n_topk))), imagenet, spec, seed,
                         tmp / "targets-1000", accelerator, teacher_k, num_workers=args.workers, progress=False)
        store_k = store.TargetStore(tmp / "targets-1000")
        every = np.arange(n_topk).repeat(store_k.rows_per_sample)
        full = store_k.rows(every, np.tile(np.arange(store_k.rows_per_sample), n_topk))["logits"]
        rows = []
        for k in TOPK:
            e, kept = topk_errors(full, k), store.logits_spec(dataclasses.replace(spec, logits="topk", topk=k), 1000)
            index_bytes = np.dtype(kept["index_dtype"]).itemsize
            for name in ("old", "new"):
                # old: k values + indices + lse; new: + tail_lse, tail_mean, logit_mean, logit_std (float32 each)
                extra = 4 if name == "old" else 16
                rows.append([k, name, k * (2 + index_bytes) + extra, f"{e['tail']:.4f}",
                             *(f"{e[name, t][0]:.4f}" for t in TEMPERATURES), f"{e[name, 4.0][1]:.3f}",
                             f"{e[name, 4.0][2]:.3f}"])
        sections.append(("4. Top-k storage error (efficientnet-lite0 with its 1000-class ImageNet head)", table(
            ["k", "reconstruction", "logit bytes/view (full: 2000 + 8)", "mean tail mass T=1", "KL mean T=1",
             "KL mean T=4", "KL max T=4", "tail mass T=4, reconstructed / true"], *rows,
        ) + f"\n\n{len(full)} rows ({n_topk} samples × {store_k.rows_per_sample} views) read from a "
            "`targets.logits: full` float16 store; KL(full ‖ reconstruction) in nats, softmax(logits / T) on both "
            "sides. old: store format 1 (an even tail at 1 - Σ exp(float16 top-k - log-sum-exp of all K)); new: "
            "`reconstruct_topk` from the tail's own log-sum-exp and mean (format 2): an even tail whose mass at "
            "temperature T is exact at T = 1 and interpolated in 1/T between the tail's mean and its log-sum-exp."))

    print("# distill soft-target export benchmark\n")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {load_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end\n")
    print(f"command: `python {' '.join(['benchmarks/export.py', *sys.argv[1:]])}`\n")
    print(f"teacher: efficientnet-lite0 card (timm tf_efficientnet_lite0, ImageNet weights, a fresh 10-class head) "
          f"at {args.input_size} px, NOT fine-tuned (speed does not depend on it); Fashion-MNIST {len(samples)} "
          f"training images × ({args.views} random + 1 center) views; teacher batch {spec.batch_size} samples; "
          f"export DataLoader workers: {args.workers}\n")
    for title, text in sections:
        print(f"## {title}\n\n{text}\n")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
