"""Benchmark: teacher fine-tune, export and student steps at 224 px in bf16, on a GPU, as one markdown table.

    python benchmarks/gpu.py [--photos DIR] [--images 512] [--steps 20] [--batch 64] [--workers 8]
    python benchmarks/gpu.py --device cpu --tiny      # tiny models, under a minute (tests/test_gpu_bench.py)

Needs distill installed (`pip install -e .`: torch with CUDA, torchvision, timm, accelerate) and scikit-image for the
photo set (benchmarks/photos.py `make_photos`, written into --photos when absent); no hub: every model is
random-init from timm's own config (`pretrained: false`), so HF_HUB_OFFLINE=1 holds.

Rows, images per second after --warmup steps, each with the peak GPU memory of its stage:
- teacher fine-tune, ViT-B/16, BEiT-B/16, DeiT-B/16: forward, cross-entropy, backward, AdamW, through an
  ImageDataset of the photos with the teacher's default train augmentation (teach.py's data path);
- export: `distill.store.export` itself over the photos (views/s), and its ratio to a bare forward of the same
  teacher on batches of the same size already on the device;
- students resnet50, mobilenetv3_large_100, efficientnet_b0: labels only, cached KD (the first teacher's store),
  online KD (the first teacher in the loop): ReplayDataset batches into learn.py's step (`kd.batch_target`,
  `kd.student_loss`, accelerate's backward), a minimal loop of learn's, without its checkpoints and logging.
With --decode device the students read their batches through `data.decode: device` (distill.data.device_decode).
Everything runs under one accelerate Accelerator with mixed_precision bf16. Exits 1 when a stage fails (its row
says why), so a CI job sees it; --fail-stage NAME makes the stages of that name fail, to test that.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/photos.py
from photos import make_photos

from distill import store
from distill.data import ImageDataset, build_transform, device_decode, load_splits
from distill.kd import batch_target, student_loss
from distill.models import build_model, save_model
from distill.recipe import DataConfig, KDConfig, StudentConfig, TargetsConfig, TeacherConfig

TEACHERS = {"ViT-B/16": "vit_base_patch16_224", "BEiT-B/16": "beit_base_patch16_224",
            "DeiT-B/16": "deit_base_patch16_224"}
STUDENTS = ("resnet50", "mobilenetv3_large_100", "efficientnet_b0")
# --tiny: the same timm architectures at 32 px, the transformers 2 blocks of width 64
TINY_TEACHER = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32, "patch_size": 8}
STAGES = ("fine-tune", "export", "labels-only", "cached-KD", "online-KD")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models at 32 px, few images and steps (a smoke test)")
    p.add_argument("--photos", help="the photo folder (made by benchmarks/photos.py when absent); default: a temp dir")
    p.add_argument("--images", type=int, default=512, help="photos to make and use")
    p.add_argument("--batch", type=int, default=64, help="images per training step")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=3, help="steps before the timing starts")
    p.add_argument("--views", type=int, default=2, help="random views per image in the exported store")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--decode", choices=("cpu", "device"), default="cpu", help="the students' data.decode")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--students", nargs="+", default=list(STUDENTS))
    p.add_argument("--fail-stage", choices=STAGES, help="make this stage fail (tests the exit status)")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.batch, args.steps, args.warmup, args.workers = 12, 4, 2, 1, 0
    return args


class Stage:
    """One row: times `steps` calls after `warmup`, and the peak device memory of the whole stage."""

    def __init__(self, args, accelerator):
        self.args, self.device = args, accelerator.device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> str:
        if self.device.type != "cuda":
            return "n/a (CPU)"
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"

    def rate(self, step, batches) -> float:
        """Images/s of `step(batch)` over the batches after the warm-up (each returns its image count)."""
        batches = iter(batches)
        for _ in range(self.args.warmup):
            step(next(batches))
        self.sync()
        started, images = time.perf_counter(), 0
        for _ in range(self.args.steps):
            images += step(next(batches))
        self.sync()
        return images / (time.perf_counter() - started)


def forever(loader):
    while True:
        yield from loader


def teacher_config(name: str, tiny: bool) -> TeacherConfig:
    return TeacherConfig(model=f"timm:{name}", pretrained=False, input_size=32 if tiny else None,
                         timm_kwargs=TINY_TEACHER if tiny else {})


def fine_tune(args, accelerator, stage, cfg, train) -> tuple[float, str]:
    """teach.py's step on the teacher's train transform: images/s."""
    model, pre = build_model(cfg, len(train.classes), classes=train.classes)
    data = ImageDataset(train, build_transform(None, "train", pre), seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    def step(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(y)

    rate = stage.rate(step, forever(loader))
    accelerator.free_memory()
    return rate, ""


def export(args, accelerator, stage, cfg, train, work: Path) -> tuple[float, str, Path]:
    """`store.export` over every photo × (views + 1): views/s, and the ratio to a bare forward of the same teacher."""
    model, pre = build_model(cfg, len(train.classes), classes=train.classes)
    info = save_model(model, pre, work / "teacher", train.classes)
    model = model.to(accelerator.device)
    spec = TargetsConfig(views=args.views, batch_size=max(1, args.batch // (args.views + 1)), logits="full")
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its one-line summary, off the table
        manifest = store.export(model, pre, store.Samples(train), train.classes, spec, 0, work / "targets",
                                accelerator, store.teacher_record(info), num_workers=args.workers, progress=False)
    stage.sync()
    views = manifest["num_samples"] * manifest["rows_per_sample"]
    rate = views / (time.perf_counter() - started)
    x = torch.randn(spec.batch_size * (args.views + 1), 3, pre.input_size, pre.input_size, device=accelerator.device)
    x = x.contiguous(memory_format=torch.channels_last)  # as export hands its batches to the teacher

    def forward(_):
        with torch.inference_mode(), accelerator.autocast():
            model(x)
        return len(x)

    bare = stage.rate(forward, itertools.repeat(None))
    return rate, f"{rate / bare:.2f} of a bare forward ({bare:.1f} img/s)", work


def student(args, accelerator, stage, name, kind, train, teacher_dir: Path) -> tuple[float, str]:
    """learn.py's step (batch_target, student_loss, backward, AdamW) on ReplayDataset batches: images/s."""
    loss = {"labels-only": "none"}.get(kind, "kl")
    kd = KDConfig(loss=loss, targets="online" if kind == "online-KD" else "cached")
    cfg = StudentConfig(name=name, model=f"timm:{name}", resolution=32 if args.tiny else 224, kd=kd)
    reader = store.TargetStore(teacher_dir / "targets")
    model, pre = build_model(cfg, len(train.classes), where="students.0", classes=train.classes)
    teacher = teacher_pre = None
    if kd.targets == "online":
        from distill.models import load_model

        teacher, teacher_pre, _ = load_model(teacher_dir / "teacher")
        teacher = teacher.eval().requires_grad_(False).to(accelerator.device)  # frozen, as kd.online_teacher
    data = store.ReplayDataset(reader, store.Samples(train), pre, seed=0, teacher_pre=teacher_pre)
    collate = None
    if args.decode == "device" and teacher is None:
        data, collate = device_decode.EncodedReplay(data), device_decode.collate
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    k = len(train.classes)

    def step(batch):
        x, y = batch[0], batch[1]
        if isinstance(x, device_decode.Encoded):
            x = device_decode.pixels(x, pre, accelerator.device)
        target, _ = batch_target(batch, None, teacher, kd, kd.temperature, accelerator)
        parts = student_loss(model(x), y, target, kd, kd.temperature, k, 0.0, None)
        accelerator.backward(parts["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return len(y)

    rate = stage.rate(step, forever(loader))
    accelerator.free_memory()
    return rate, ""


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision="bf16")
    stage = Stage(args, accelerator)
    rows, failed = [], []

    def run(kind: str, model: str, what, *a):
        stage.start()
        try:
            if args.fail_stage == kind:
                raise RuntimeError(f"--fail-stage {kind}")
            rate, note, *_ = what(*a)
            rows.append((kind, model, f"{rate:.1f}", note, stage.peak()))
        except Exception as e:  # noqa: BLE001 - a failed stage is a row and the exit status, not the end
            failed.append(kind)
            rows.append((kind, model, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", stage.peak()))

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        photos = make_photos(args.photos or tmp / "photos", args.images, seed=0)
        train, _ = load_splits(DataConfig(source="imagefolder", root=str(photos)))
        stores = {}
        for label, name in ((t, TEACHERS[t]) for t in args.teachers):
            cfg = teacher_config(name, args.tiny)
            run("fine-tune", label, fine_tune, args, accelerator, stage, cfg, train)
            run("export", label, export, args, accelerator, stage, cfg, train, tmp / name)
            if (tmp / name / "targets" / store.MANIFEST).is_file():
                stores.setdefault("first", tmp / name)
        first = stores.get("first", tmp / "missing")
        for name in args.students:
            for kind in ("labels-only", "cached-KD", "online-KD"):
                run(kind, name, student, args, accelerator, stage, name, kind, train, first)

    size = 32 if args.tiny else 224
    print(f"\n{accelerator.device} ({torch.cuda.get_device_name() if accelerator.device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, bf16, {size} px, batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup}, {len(train)} photos, {args.workers} workers, students decode on {args.decode}; "
          f"load average {load:.2f} → {os.getloadavg()[0]:.2f}{'; --tiny: tiny models' if args.tiny else ''}\n")
    print("| stage | model | images/s | note | peak GPU memory |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if failed:
        print(f"\nfailed: {', '.join(sorted(set(failed)))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
