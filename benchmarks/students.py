"""Benchmark: labels-only baseline vs cached KD vs online KD vs cached KD with an unlabeled transfer set (Fashion-MNIST).

    python benchmarks/students.py --quick     # 8.6 min on 2 idle CPU cores (5000 labeled, 3000 unlabeled, 2 seeds)
    python benchmarks/students.py [--labeled 5000] [--unlabeled N] [--seeds 3] [--teacher-epochs 10] \
        [--student-epochs 20] [--transfer-epochs E] [--variants baseline,cached,...] [--out DIR] [--report-only]

The defaults are the issue's numbers (5,000 labeled, all 55,000 others unlabeled, 3 seeds): ≈ 1.5-2 h on 2 CPU
cores by the speeds --quick measures, most of it the transfer students' 60,000-image epochs.

One recipe, written to DIR/students.yaml (DIR: --out, else a temporary directory): the efficientnet-lite0 card
(real ImageNet weights, offline) fine-tuned at 64 px on a stratified labeled subset of the training images, and
its soft-target store over those images plus an unlabeled transfer set (`data.unlabeled: rest`, the training
images the subset left out). `distill teach` runs once; `distill learn` then trains, for every seed, one student
per variant (resnet10t at 28 px, the same schedule and CutMix) that differ only in what they learn from:

    baseline   `kd: none`, the labeled images only
    cached     KD from the store, labeled images only (`kd.use_unlabeled: false`)
    online     KD with the teacher run on the student's own (mixed) batch, labeled images only
    transfer   KD from the store, labeled + unlabeled images (the unlabeled ones get the KD term only)

One store serves all four: its dataset fingerprint covers the unlabeled images, so it is built with them and the
students that must not see them say `kd.use_unlabeled: false` (the baseline never does). Without the transfer
variant the store holds the labeled images only. The stages validate on
`data.subset` test images (the subset caps both splits), so every model is evaluated again here on the full
10,000-image test set; every stage evaluates only after its last epoch, so no checkpoint is picked on test images.

Prints markdown tables (command line and machine first); targets are reported as PASS/FAIL. Exits 0, or 1 when
a stage fails (its log is in DIR).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("baseline", "cached", "online", "transfer")
RATIO_TARGET, TEACHER_MARGIN, GAP_TARGET = 0.95, 0.02, 0.80
QUICK = {"labeled": 5000, "unlabeled": 3000, "seeds": 2, "teacher_epochs": 3, "student_epochs": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labeled", type=int, default=5000, help="stratified labeled training images")
    p.add_argument("--unlabeled", type=int, default=None,
                   help="unlabeled transfer-set images (default: all the rest of the 60,000; 0: no transfer variant)")
    p.add_argument("--seeds", type=int, default=3, help="students per variant, seeds 0..N-1")
    p.add_argument("--teacher-epochs", type=int, default=10, help="teacher fine-tuning epochs")
    p.add_argument("--student-epochs", type=int, default=20, help="epochs of every student but the transfer one")
    p.add_argument("--transfer-epochs", type=int, default=None,
                   help="epochs of the transfer variant (default: --student-epochs; an epoch = every labeled and "
                        "unlabeled image once)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (baseline is always run)")
    p.add_argument("--teacher-size", type=int, default=64, help="teacher input size (px)")
    p.add_argument("--student", default="timm:resnet10t", help="student model")
    p.add_argument("--student-size", type=int, default=28, help="student input size (px)")
    p.add_argument("--views", type=int, default=4, help="random views per image in the store (+1 center view)")
    p.add_argument("--temperature", type=float, default=4.0, help="requested KD temperature (the LS policy may lower it)")
    p.add_argument("--ls-policy", default="auto", choices=("auto", "warn", "off"),
                   help="kd.ls_policy: auto distils a label-smoothed teacher at T=1 (this one is fine-tuned without smoothing)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="loss = (1 - w) CE + w KD")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha for every student (0: off)")
    p.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha for every student (0: off)")
    p.add_argument("--mix-prob", type=float, default=0.5, help="chance that a batch is mixed")
    p.add_argument("--quick", action="store_true",
                   help="the defaults become " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--out", type=Path, help="keep the run here (default: a temporary directory, deleted)")
    p.add_argument("--report-only", action="store_true", help="only print the tables of a finished --out")
    args = p.parse_args(argv)
    if args.quick:  # new defaults, so flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    if args.report_only and not args.out:
        p.error("--report-only needs --out")
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    if variants - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(variants - set(VARIANTS)))}; expected some of {', '.join(VARIANTS)}")
    if args.unlabeled == 0:
        variants.discard("transfer")
    args.variants = [v for v in VARIANTS if v in variants or v == "baseline"]
    return args


def make_recipe(args, out: Path) -> dict:
    """The benchmark's one recipe: teacher, store (with the transfer set) and seeds × variants students."""
    student = {
        "model": args.student, "resolution": args.student_size, "crop_pct": 1.0, "epochs": args.student_epochs,
        "eval_every": args.student_epochs, "batch_size": 128, "mixed_precision": "no",
        "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5.0e-4, "warmup_epochs": 1},
        "mix": {"mixup_alpha": args.mixup, "cutmix_alpha": args.cutmix, "prob": args.mix_prob},
    }
    kd = {"loss": "kl", "temperature": args.temperature, "weight": args.kd_weight, "ls_policy": args.ls_policy}
    transfer_epochs = args.transfer_epochs or args.student_epochs
    variants = {
        "baseline": {"kd": {"loss": "none"}},
        "cached": {"kd": {**kd, "targets": "cached", "use_unlabeled": False}},
        "online": {"kd": {**kd, "targets": "online", "use_unlabeled": False}},
        "transfer": {"kd": {**kd, "targets": "cached", "use_unlabeled": True}, "epochs": transfer_epochs,
                     "eval_every": transfer_epochs},
    }
    variants = {v: extra for v, extra in variants.items() if v in args.variants}
    # seed-major order: each seed's variants run back to back, so a load change on the machine hits all alike
    students = [{"name": f"{v}-s{seed}", "seed": seed, **student, **extra}
                for seed in range(args.seeds) for v, extra in variants.items()]
    data = {"source": "fashion-mnist", "subset": args.labeled}
    if "transfer" in args.variants:  # else the store need not hold (nor the teacher export) any unlabeled image
        data["unlabeled"] = "rest"
        if args.unlabeled is not None:
            data["unlabeled_subset"] = args.unlabeled
    return {
        "name": "students", "seed": 0, "output_dir": str(out), "data": data,
        "teacher": {
            "card": "efficientnet-lite0", "input_size": args.teacher_size, "crop_pct": 1.0,
            "epochs": args.teacher_epochs, "eval_every": args.teacher_epochs, "batch_size": 64,
            "label_smoothing": 0.0, "mixed_precision": "no",
            "optim": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.02, "warmup_epochs": 0.3},
            # a light crop: a 28 px garment cut to a quarter of its area is often another class
            "augment": {"train": [{"name": "RandomResizedCrop", "size": ["input_size", "input_size"],
                                   "scale": [0.5, 1.0]}, {"name": "HorizontalFlip", "p": 0.5}]},
        },
        "targets": {"views": args.views, "scale": [0.5, 1.0]},
        "students": students,
        "log": {"progress": False, "tensorboard": False},
    }


def stage(name: str, cmd: list[str], log: Path) -> float:
    """Run one `distill` stage with its output in `log`; its wall seconds. Exit 1 (with the log's tail) on failure."""
    print(f"{name}: {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False,
                           env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        print(f"error: {name} failed (exit {r.returncode}); the end of {log}:\n"
              + "".join(log.read_text().splitlines(True)[-20:]), file=sys.stderr)
        sys.exit(1)
    print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds


def evaluate_on_full_test(run_dir: Path, names: list[str]) -> dict[str, dict]:
    """top-1 of each saved model (teacher, students/<name>) on all 10,000 Fashion-MNIST test images."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from distill.data import ImageDataset, build_transform, load_splits
    from distill.evaluate import evaluate
    from distill.models import load_model
    from distill.recipe import DataConfig

    _, test = load_splits(DataConfig(source="fashion-mnist"))
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision="no")
    results = {}
    for name in names:
        model, pre, _ = load_model(run_dir / name)
        loader = DataLoader(ImageDataset(test, build_transform(None, "eval", pre, where=name)), batch_size=256)
        m = evaluate(model.to(accelerator.device), accelerator.prepare(loader), accelerator, len(test.classes))
        results[name] = {"top1": m["top1"], "num_images": m["num_images"]}
    return results


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def table(header, *rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def seconds(timings: dict, key: str) -> str:
    return f"{timings[key]:.0f}" if key in timings else "-"  # --report-only: the stages ran earlier


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args, run_dir: Path, recipe: dict, full: dict, timings: dict, loads: tuple[float, float]) -> str:
    import torch

    students = [s["name"] for s in recipe["students"]]
    teacher = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    manifest = json.loads((run_dir / "targets" / "manifest.json").read_text())
    metrics = {n: json.loads((run_dir / "students" / n / "metrics.json").read_text()) for n in students}
    teacher_top1 = full["teacher"]["top1"]
    n_test = full["teacher"]["num_images"]
    variants = [v for v in VARIANTS if any(n.startswith(f"{v}-s") for n in students)]
    runs = {v: [n for n in students if n.startswith(f"{v}-s")] for v in variants}
    top1 = {v: [full[f"students/{n}"]["top1"] for n in runs[v]] for v in variants}
    speed = {v: [metrics[n]["train_images_per_sec"] for n in runs[v]] for v in variants}
    stats = manifest.get("export") or {}

    out = ["# distill students benchmark: baseline vs cached / online KD vs transfer set (Fashion-MNIST)\n"]
    out.append(f"command: `python benchmarks/students.py {' '.join(sys.argv[1:])}`\n")
    out.append(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
               f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
               f"load average {loads[0]:.2f} at start, {loads[1]:.2f} at end\n")
    out.append(f"run dir: {run_dir}" + (" (temporary, deleted)" if not args.out else "") + "\n")
    d = recipe["data"]
    out.append(f"data: {manifest['num_labeled']} labeled training images (stratified, "
               f"data.subset {d['subset']}), {manifest['num_samples'] - manifest['num_labeled']} unlabeled "
               f"(data.unlabeled {d.get('unlabeled')}, unlabeled_subset {d.get('unlabeled_subset')}); accuracy on "
               f"all {n_test} test images; {args.seeds} seed(s)\n")
    s0 = recipe["students"][0]
    mix = s0["mix"]
    out.append(f"students: {s0['model']} at {s0['resolution']} px, epochs {s0['epochs']} (transfer: "
               f"{metrics[runs[variants[-1]][0]]['epochs'] if 'transfer' in variants else '-'}), batch "
               f"{s0['batch_size']}, SGD lr {s0['optim']['lr']}, CutMix α {mix['cutmix_alpha']} / MixUp α "
               f"{mix['mixup_alpha']} with p {mix['prob']}, KD {args.kd_weight} · T² KL at requested T "
               f"{args.temperature} (LS policy {args.ls_policy})\n")

    out.append("## Stages\n")
    out.append(table(
        ["stage", "wall s", "what"],
        ["distill teach", seconds(timings, "teach"),
         f"teacher: {teacher['epochs']} epochs at {teacher['train_images_per_sec']:.0f} img/s, then the store "
         f"({manifest['num_samples']} images × {manifest['rows_per_sample']} views"
         + (f", {stats['views_per_sec']:.0f} views/s" if "views_per_sec" in stats else "") + ")"],
        ["distill learn", seconds(timings, "learn"), f"{len(students)} students"],
        ["full-test evaluation", seconds(timings, "eval"), f"{len(full)} models × {n_test} images"],
    ))
    out.append("")

    out.append("## Accuracy and speed\n")
    about = f"{teacher['model']} ({teacher.get('card')}) at {teacher['input_size']} px, LS {teacher['label_smoothing']}"
    rows = [["teacher", about, "-", manifest["num_labeled"], f"{teacher_top1:.4f}",
             "-", f"{teacher['train_images_per_sec']:.0f}", f"{teacher['wall_seconds']:.0f}", "-"]]
    for v in variants:
        m0 = metrics[runs[v][0]]
        kd = "labels only" if v == "baseline" else \
            f"{m0['kd_targets']}, w={m0['kd_weight']:g}, T={m0['temperature']:g} (asked {m0['temperature_requested']:g}, " \
            f"LS policy: {m0['ls_decision']})"
        mu, sd = mean_std(top1[v])
        su, ss = mean_std(speed[v])
        kl = [metrics[n]["mix_approx_kl"] for n in runs[v] if metrics[n].get("mix_approx_kl") is not None]
        rows.append([v, kd, len(runs[v]), m0["train_images"], f"{mu:.4f} ± {sd:.4f}",
                     " ".join(f"{t:.4f}" for t in top1[v]), f"{su:.0f} ± {ss:.0f}",
                     f"{np.mean([metrics[n]['wall_seconds'] for n in runs[v]]):.0f}",
                     f"{np.mean(kl):.4f}" if kl else "-"])
    out.append(table(["model", "distillation", "seeds", "train images", "top-1 mean ± std", "top-1 per seed",
                      "train img/s mean ± std", "wall s (mean)", "cached-mix KL"], *rows))
    out.append("\nstd: sample std over seeds. train img/s: the student stage's own training-loop throughput "
               "(`train_images_per_sec`, data + teacher for online + step). cached-mix KL: KL(online ‖ cached "
               "mixed target), batch mean, measured by the online students on their mixed batches.\n")

    out.append("## Targets\n")
    checks = []
    base_mu, base_sd = mean_std(top1["baseline"])
    if "cached" in variants:
        ratio = np.mean(speed["cached"]) / np.mean(speed["baseline"])
        checks.append(["throughput cached KD / baseline", f"{ratio:.3f}", f"≥ {RATIO_TARGET}",
                       pass_fail(ratio >= RATIO_TARGET)])
    margin = teacher_top1 - base_mu
    checks.append(["teacher − baseline top-1", f"{100 * margin:+.2f} points", f"≥ {100 * TEACHER_MARGIN:.0f} points",
                   pass_fail(margin >= TEACHER_MARGIN)])
    for v in variants[1:]:
        mu, sd = mean_std(top1[v])
        pooled = float(np.sqrt((sd**2 + base_sd**2) / 2))
        gain = mu - base_mu
        checks.append([f"{v} KD − baseline top-1 > 2 std", f"{100 * gain:+.2f} points (2 std = {200 * pooled:.2f})",
                       "> 2 std", pass_fail(len(top1[v]) > 1 and gain > 2 * pooled)])
    for v in variants[1:]:
        closed = (np.mean(top1[v]) - base_mu) / margin if margin > 0 else float("nan")
        target = f"≥ {GAP_TARGET:.0%}" if v == "transfer" else "-"
        result = pass_fail(margin > 0 and closed >= GAP_TARGET) if v == "transfer" else "-"
        checks.append([f"teacher–baseline gap closed by {v}", f"{closed:.0%}", target, result])
    out.append(table(["check", "value", "target", "result"], *checks))
    out.append("\n2 std: twice the pooled seed std √((s_kd² + s_base²) / 2); with one seed there is no std and the "
               "check fails. Gap closed: (student − baseline) / (teacher − baseline), mean top-1 on the full test set.")
    return "\n".join(out)


def main():
    args = parse_args()
    loads = [os.getloadavg()[0]]  # other jobs on the machine move every speed here; the report shows how busy it was
    tmp = None
    if args.out:
        out = args.out.resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="distill-students-")
        out = Path(tmp)
    run_dir, timings = out / "students", {}
    try:
        if not args.report_only:
            if run_dir.exists():
                sys.exit(f"error: --out: {run_dir} already holds a run; give another --out, or --report-only "
                         "to print its tables")
            out.mkdir(parents=True, exist_ok=True)
            recipe = out / "students.yaml"
            recipe.write_text(yaml.safe_dump(make_recipe(args, out), sort_keys=False))
            distill = [sys.executable, "-m", "distill.cli"]  # run from ROOT: this checkout's code, installed or not
            timings["teach"] = stage("teach", [*distill, "teach", str(recipe)], out / "teach.log")
            timings["learn"] = stage("learn", [*distill, "learn", str(recipe)], out / "learn.log")
        recipe = yaml.safe_load((out / "students.yaml").read_text())
        start = time.perf_counter()
        full = evaluate_on_full_test(run_dir, ["teacher"] + [f"students/{s['name']}" for s in recipe["students"]])
        timings["eval"] = time.perf_counter() - start
        print(report(args, run_dir, recipe, full, timings, (loads[0], os.getloadavg()[0])))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
