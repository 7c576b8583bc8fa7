"""Benchmark: the data path on real-size JPEG photos, per CPU core, against timm's standard training loader.

    python benchmarks/loader.py [--quick] [--photos DIR] [--count N]

On the photo set of benchmarks/photos.py (made when absent: JPEG photos of 500x375 to 1600x1200 from
scikit-image's photos), every loader runs in this one process on one thread (torch, OpenCV), so images/s is
per core:

- (a) timm: `timm.data.create_dataset` + `create_loader` (PIL decode, RandomResizedCrop, flip, normalise; no
  colour jitter, so it does what the student path does; its default colour jitter 0.4 is a row of its own);
- (b) the student's replay path (`store.ReplayDataset`: a stored view's crop box, the student's input): full
  decode; scaled decode (`data.decode_scaled`, JPEG DCT scaling); the decoded-image cache (`data.cache`); and
  batched decode with crop and resize as tensor ops (`data.decode: device`, here on the CPU);
- (c) the teacher's export path (`store.TeacherViews`: every view of an image at the teacher's 224 px, its
  decode and rendering without the forward), with full and scaled decoding;
- then a resnet10t student step (forward, backward, AdamW; one thread) at 112 and 224 px against each loader's
  time per batch, which says whether data or compute limits a 2-core machine that gives each one core; and
  cached-KD steps against labels-only steps reading the same cache, through one DataLoader worker.

Targets (2 CPU cores): the student path >= 3x timm's per core on photos of 500x375 and larger; cached-KD steps at
224 px no slower than labels-only ones on the same cache. The last line is `student/timm per-core ratio: X.XX`
(the best student path against timm's loader). Always exits 0; the targets print PASS/FAIL.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import make_photos
from student_step import step_time

from distill import store
from distill.data import Preprocess, load_splits
from distill.recipe import DataConfig, TargetsConfig
from distill.store.views import TeacherViews

RATIO_TARGET, KD_TARGET = 3.0, 0.95  # student/timm per core; KD steps / labels-only steps (no slower, 5 % noise)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer photos and images per measurement (about 2 min)")
    p.add_argument("--photos", type=Path, help="the photo set (default: a temporary one, made here)")
    p.add_argument("--count", type=int, help="photos to make (default 600; --quick 200)")
    p.add_argument("--images", type=int, help="images per measurement (default 300; --quick 96)")
    return p.parse_args()


def pre_at(size: int) -> Preprocess:
    return Preprocess(input_size=size, mean=MEAN, std=STD, interpolation="bilinear", crop_pct=0.875)


def rate(get, n: int) -> float:
    """Images per second of `get(i)` for i < n, after one warm-up call."""
    get(0)
    start = time.perf_counter()
    for i in range(n):
        get(i)
    return n / (time.perf_counter() - start)


def timm_rate(root: Path, size: int, n: int, jitter: float = 0.0) -> float:
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(root), split="train", is_training=True)
    loader = create_loader(ds, input_size=(3, size, size), batch_size=1, is_training=True, num_workers=0,
                           use_prefetcher=False, device=torch.device("cpu"), color_jitter=jitter, mean=MEAN, std=STD,
                           persistent_workers=False)
    assert loader.dataset is ds and ds.transform is not None  # create_loader gave the dataset timm's transform
    order = np.random.default_rng(0).permutation(len(ds))
    # ds[i]: open and decode the file (PIL, full size), then timm's transform: crop, flip, tensor, normalise
    return rate(lambda i: ds[int(order[i % len(ds)])], n)


def data_config(photos: Path, **extra) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(photos), val_fraction=0.1, **extra)


def build_store(photos: Path, out: Path, views: int = 4):
    """A store of `views` random views per photo from a tiny teacher (the data path is what is measured)."""
    from accelerate import Accelerator

    train, _ = load_splits(data_config(photos))
    samples = store.Samples(train)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(48, len(train.classes)))
    store.export(model, pre_at(32), samples, train.classes, TargetsConfig(views=views, logits="full"), 0, out,
                 Accelerator(cpu=True), {"sha256": "loader-benchmark"}, progress=False)
    return store.TargetStore(out), train.classes


def replay_variants(photos: Path, targets) -> dict:
    """name -> DataConfig of each student path measured (those this version of distill has)."""
    fields = {f for f in DataConfig.__dataclass_fields__}
    variants = {"replay, full decode": data_config(photos, **({"decode_scaled": False} if "decode_scaled" in fields
                                                             else {}))}
    if "decode_scaled" in fields:
        variants["replay, scaled decode"] = data_config(photos, decode_scaled=True)
    if "cache" in fields:  # max side 448: 2 x the largest model size measured, what data.cache: auto would choose
        variants["replay, cache (jpeg)"] = data_config(photos, cache=448, cache_format="jpeg")
        variants["replay, cache (raw)"] = data_config(photos, cache=448, cache_format="raw")
    return variants


def replay_dataset(cfg: DataConfig, targets, size: int, cache_dir: Path):
    import dataclasses

    if getattr(cfg, "cache", None):
        cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
    train, _ = load_splits(cfg)
    if getattr(cfg, "cache", None):
        from distill.data.cache import attach_cache

        attach_cache(cfg, train)
    return store.ReplayDataset(targets, store.Samples(train), pre_at(size), view="random", seed=0)


def device_rate(photos: Path, targets, size: int, n: int, batch: int = 32) -> float:
    """`data.decode: device`, run on the CPU: the workers' part (a row and the file's bytes) and the batched
    decode, crop and resize as tensor ops (`distill.data.device_decode`), per image."""
    from distill.data import device_decode

    replay = replay_dataset(data_config(photos, decode="device"), targets, size, photos)
    encoded = device_decode.EncodedReplay(replay)
    pre = pre_at(size)

    def one_batch(b):
        items = [encoded[(b * batch + j) % len(encoded)] for j in range(batch)]
        return device_decode.pixels(device_decode.collate(items)[0], pre, torch.device("cpu"))

    one_batch(0)
    batches = max(1, n // batch)
    start = time.perf_counter()
    for b in range(batches):
        one_batch(b)
    return batches * batch / (time.perf_counter() - start)


def export_variants(photos: Path) -> dict:
    fields = set(DataConfig.__dataclass_fields__)
    if "decode_scaled" not in fields:
        return {"export, teacher views (5 per image), full decode": data_config(photos)}
    return {"export, teacher views (5 per image), full decode": data_config(photos, decode_scaled=False),
            "export, teacher views (5 per image), scaled decode": data_config(photos, decode_scaled=True)}


def export_rate(cfg: DataConfig, size: int, n: int, views: int = 4) -> float:
    """Images per second of the export's data side (`store.TeacherViews`: decode once, render the V + 1 views at
    the teacher's size, normalise), without the teacher's forward."""
    train, _ = load_splits(cfg)
    samples = store.Samples(train)
    ds = TeacherViews(samples, TargetsConfig(views=views), 0, pre_at(size), 0, len(samples))
    return rate(lambda i: ds[i % len(ds)], n)


def student_step_seconds(size: int, batch: int = 32, steps: int = 3) -> float:
    """A resnet10t step (forward, backward, AdamW; the median of `steps`), as benchmarks/student_step.py times it."""
    return step_time("resnet10t", size, batch, steps, torch.device("cpu"), channels_last=False,
                     compile_model=False)["step s"]


def kd_against_labels(ds, size: int, batches: int) -> dict:
    """Steps per second of a resnet10t student on `ds` (one DataLoader worker, one compute thread): labels only,
    then cached KD (`kd.student_loss` on the stored logits), reading the same data."""
    import timm

    from distill.kd import batch_target, student_loss
    from distill.recipe import KDConfig

    out = {}
    for name, kd in (("labels only", KDConfig(loss="none")), ("cached KD", KDConfig(loss="kl", temperature=4.0))):
        torch.manual_seed(0)
        model = timm.create_model("resnet10t", num_classes=len(ds.store.manifest["classes"])).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=1, drop_last=True,
                                             generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        next(it)  # the worker's start-up
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            target, _ = batch_target(batch, None, None, kd, 4.0, None)
            parts = student_loss(model(batch[0]), batch[1], target, kd, 4.0, model.num_classes, 0.0, None)
            parts["loss"].backward()
            opt.step()
            opt.zero_grad()
        out[name] = batches / (time.perf_counter() - start)
    return out


def main():
    args = parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    count = args.count or (200 if args.quick else 600)
    n = args.images or (96 if args.quick else 300)
    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    photos = args.photos or work / "photos"
    make_photos(photos, count, seed=0)
    sizes = sorted({Image_size(p) for p in list(photos.rglob("*.jpg"))[:50]})
    print(f"# Data path on photos, per core\n\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; {count} JPEG photos "
          f"({min(sizes)[0]}x{min(sizes)[1]} to {max(sizes)[0]}x{max(sizes)[1]}), {n} images per measurement, "
          "one thread\n")

    for path in photos.rglob("*.jpg"):  # every loader then reads the files from the page cache
        path.read_bytes()
    targets, _ = build_store(photos, work / "targets")
    rows = []
    for size in (112, 224):
        # the better of two passes: the ratio is then against timm at its best
        rows.append(("timm create_loader (RRC, flip)", size, max(timm_rate(photos, size, n) for _ in range(2))))
        if size == 224:
            rows.append(("timm create_loader + colour jitter 0.4", size, timm_rate(photos, size, n, jitter=0.4)))
        for name, cfg in replay_variants(photos, targets).items():
            ds = replay_dataset(cfg, targets, size, work / "cache")
            rows.append((name, size, rate(lambda i, ds=ds: ds[i % len(ds)], n)))
        rows.append(("replay, decode on the device (here the CPU)", size, device_rate(photos, targets, size, n)))
    for name, cfg in export_variants(photos).items():  # (c) the teacher's side: every view of an image at 224 px
        rows.append((name, 224, export_rate(cfg, 224, n)))
    print("| loader | px | images/s per core | vs timm |\n|---|---|---|---|")
    base = {size: r for name, size, r in rows if name.startswith("timm create_loader (")}
    for name, size, r in rows:
        print(f"| {name} | {size} | {r:.1f} | {r / base[size]:.2f}x |")
    best = max(r / base[size] for name, size, r in rows if name.startswith("replay"))

    print("\n## What limits a resnet10t student step (batch 32; one core for data, one for compute)\n")
    print("| px | compute, images/s | loader | data, images/s per core | limit |\n|---|---|---|---|---|")
    for size in (112, 224):
        compute = 32 / student_step_seconds(size)
        for name, at, r in rows:
            if at == size and not name.startswith("export"):
                print(f"| {size} | {compute:.0f} | {name} | {r:.0f} | {'data' if r < compute else 'compute'} |")

    variants = replay_variants(photos, targets)
    kd_cfg = variants.get("replay, cache (jpeg)") or next(iter(variants.values()))
    steps = kd_against_labels(replay_dataset(kd_cfg, targets, 224, work / "cache"), 224, 4 if args.quick else 12)
    ratio = steps["cached KD"] / steps["labels only"]
    print(f"\n## Cached KD against labels only at 224 px, the same data ({'cache' if getattr(kd_cfg, 'cache', None) else 'files'})\n")
    print(f"labels only {steps['labels only']:.3f} steps/s, cached KD {steps['cached KD']:.3f} steps/s: "
          f"{ratio:.2f}x ({'PASS' if ratio >= KD_TARGET else 'FAIL'}, target no slower: >= {KD_TARGET})")
    print(f"student path against timm per core: {best:.2f}x ({'PASS' if best >= RATIO_TARGET else 'FAIL'}, "
          f"target >= {RATIO_TARGET}); load average {os.getloadavg()[0]:.2f}")
    print(f"\nstudent/timm per-core ratio: {best:.2f}")


def Image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


if __name__ == "__main__":
    main()
