"""Benchmark: labels-only baseline vs cached KD (in-batch mixing, or the store's exact mixing) vs online KD vs an
unlabeled transfer set (Fashion-MNIST).

    python benchmarks/students.py --quick     # a smoke run: 2 seeds, short schedules, a small transfer set
    python benchmarks/students.py [--labeled 5000] [--unlabeled N] [--seeds 3] [--teacher-epochs 15] \
        [--student-epochs 20] [--views 8] [--variants baseline,cached,...] [--teacher-from DIR] [--out DIR] \
        [--report-only]

One teacher: the efficientnet-lite0 card (real ImageNet weights, offline) fine-tuned at 96 px on a stratified
labeled subset of the training images (or a saved teacher folder, --teacher-from). Two runs share it, and so two
stores of the same views (crop box, flip and the replayed `targets.augment`) that differ only in how they mix:

    inbatch/   a store without targets.mix; its students CutMix their own batches (mixing the cached targets
               with the same λ: an approximation)
               baseline   `kd: none`, the labeled images only
               cached     KD from the store, labeled images only (`kd.use_unlabeled: false`)
               online     KD with the teacher run on the student's own mixed batch; it measures the KL from its
                          exact target to the in-batch mixture of cached targets (`mix_approx_kl`)
    exact/     a store with targets.mix (the same CutMix parameters): each stored view is mixed with a partner
               view and the teacher labelled the mixed image; its students do not mix again
               exact      KD from the store, labeled images only
               transfer   the same, with the unlabeled transfer set too (`data.unlabeled: rest`, KD term only)

Every student has the same model, schedule, views and augmentation (the stores' `targets.augment`), and CutMix
with the same α and probability, in-batch or in the store. Every stage evaluates only after its last epoch (no
checkpoint is picked on test images); the stages validate on `data.subset` test images, so every model is scored
again here on all 10,000 test images. The students of a seed run back to back (seed-major), so a load change on
the machine hits every variant alike.

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
VARIANTS = ("baseline", "cached", "online", "exact", "transfer")
RUN_OF = {"baseline": "inbatch", "cached": "inbatch", "online": "inbatch", "exact": "exact", "transfer": "exact"}
BASELINE_RATIO, ONLINE_RATIO, TEACHER_MARGIN, GAP_TARGET = 0.95, 3.0, 0.03, 0.90
QUICK = {"labeled": 2000, "unlabeled": 2000, "seeds": 2, "teacher_epochs": 2, "student_epochs": 3, "views": 2}
# the students' replayed augmentation (both stores): light, as Fashion-MNIST garments are upright and centred
AUGMENT = [{"name": "Affine", "rotate": [-10, 10], "translate_percent": [-0.06, 0.06], "scale": [0.9, 1.1],
            "p": 0.5}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labeled", type=int, default=5000, help="stratified labeled training images")
    p.add_argument("--unlabeled", type=int, default=10000,
                   help="unlabeled transfer-set images (the training images the subset left out; 0: no transfer)")
    p.add_argument("--seeds", type=int, default=3, help="students per variant, seeds 0..N-1")
    p.add_argument("--teacher-epochs", type=int, default=15, help="teacher fine-tuning epochs")
    p.add_argument("--teacher-from", type=Path, help="a saved teacher folder (model.json) to use instead of "
                   "fine-tuning one; it must have been trained on the same --labeled subset")
    p.add_argument("--student-epochs", type=int, default=20, help="epochs of every student")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (baseline is always run)")
    p.add_argument("--teacher-size", type=int, default=96, help="teacher input size (px)")
    p.add_argument("--student", default="timm:mobilenetv3_small_050", help="student model")
    p.add_argument("--student-size", type=int, default=28, help="student input size (px)")
    p.add_argument("--views", type=int, default=8, help="random views per image in each store (+1 center view)")
    p.add_argument("--no-augment", action="store_true", help="crop box and flip only (no targets.augment)")
    p.add_argument("--temperature", type=float, default=4.0, help="requested KD temperature (the LS policy may lower it)")
    p.add_argument("--ls-policy", default="auto", choices=("auto", "warn", "off"),
                   help="kd.ls_policy: auto distils a label-smoothed teacher at T=1 (this one is fine-tuned without smoothing)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="loss = (1 - w) CE + w KD")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha for every student (0: off)")
    p.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha for every student (0: off)")
    p.add_argument("--mix-prob", type=float, default=0.5, help="chance that a batch (in-batch) or a view (exact) is mixed")
    p.add_argument("--quick", action="store_true",
                   help="the defaults become " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    p.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory, deleted)")
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


def make_recipes(args, out: Path) -> dict[str, dict]:
    """The benchmark's two recipes, {run name: recipe}: one teacher, a store each, seeds × variants students."""
    mix = {"mixup_alpha": args.mixup, "cutmix_alpha": args.cutmix, "prob": args.mix_prob}
    student = {
        "model": args.student, "resolution": args.student_size, "crop_pct": 1.0, "epochs": args.student_epochs,
        "eval_every": args.student_epochs, "batch_size": 128, "mixed_precision": "no",
        "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5.0e-4, "warmup_epochs": 1},
    }
    kd = {"loss": "kl", "temperature": args.temperature, "weight": args.kd_weight, "ls_policy": args.ls_policy}
    variants = {
        "baseline": {"kd": {"loss": "none"}, "mix": mix},
        "cached": {"kd": {**kd, "targets": "cached", "use_unlabeled": False}, "mix": mix},
        "online": {"kd": {**kd, "targets": "online", "use_unlabeled": False}, "mix": mix},
        "exact": {"kd": {**kd, "targets": "cached", "use_unlabeled": False}},
        "transfer": {"kd": {**kd, "targets": "cached", "use_unlabeled": True}},
    }
    teacher = {
        "card": "efficientnet-lite0", "input_size": args.teacher_size, "crop_pct": 1.0,
        "epochs": args.teacher_epochs, "eval_every": args.teacher_epochs, "batch_size": 64,
        "label_smoothing": 0.0, "mixed_precision": "no",
        "optim": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.02, "warmup_epochs": 0.3},
        # a light crop: a 28 px garment cut to a quarter of its area is often another class
        "augment": {"train": [{"name": "RandomResizedCrop", "size": ["input_size", "input_size"],
                               "scale": [0.5, 1.0]}, {"name": "HorizontalFlip", "p": 0.5}]},
    }
    targets = {"views": args.views, "scale": [0.5, 1.0], "augment": [] if args.no_augment else AUGMENT}
    recipes = {}
    for run in ("inbatch", "exact"):
        chosen = [v for v in args.variants if RUN_OF[v] == run]
        if not chosen:
            continue
        data = {"source": "fashion-mnist", "subset": args.labeled}
        if "transfer" in chosen:  # else the store need not hold (nor the teacher label) any unlabeled image
            data.update(unlabeled="rest", unlabeled_subset=args.unlabeled)
        # seed-major order: each seed's variants run back to back, so a load change on the machine hits all alike
        students = [{"name": f"{v}-s{seed}", "seed": seed, **student, **variants[v]}
                    for seed in range(args.seeds) for v in chosen]
        recipes[run] = {
            "name": run, "seed": 0, "output_dir": str(out), "data": data, "teacher": teacher,
            "targets": {**targets, **({"mix": mix} if run == "exact" else {})},
            "students": students, "log": {"progress": False, "tensorboard": False},
        }
    return recipes


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


def report(args, out: Path, recipes: dict, full: dict, timings: dict, loads: tuple[float, float]) -> str:
    import torch

    first = next(iter(recipes.values()))
    teacher = json.loads((out / first["name"] / "teacher" / "metrics.json").read_text())
    manifests = {run: json.loads((out / run / "targets" / "manifest.json").read_text()) for run in recipes}
    # the students that finished (a run stopped early reports the seeds it has; the header says how many)
    runs = {v: [(r, s["name"]) for r in recipes for s in recipes[r]["students"] if s["name"].startswith(f"{v}-s")
                and (out / r / "students" / s["name"] / "metrics.json").is_file()] for v in VARIANTS}
    variants = [v for v in VARIANTS if runs[v]]
    metrics = {(r, n): json.loads((out / r / "students" / n / "metrics.json").read_text())
               for v in variants for r, n in runs[v]}
    teacher_top1 = full[f"{first['name']}/teacher"]["top1"]
    n_test = full[f"{first['name']}/teacher"]["num_images"]
    top1 = {v: [full[f"{r}/students/{n}"]["top1"] for r, n in runs[v]] for v in variants}
    speed = {v: [metrics[key]["train_images_per_sec"] for key in runs[v]] for v in variants}

    lines = [("# distill students benchmark: baseline vs cached KD (in-batch / exact mixing) vs online KD vs transfer "
             "set (Fashion-MNIST)\n")]
    lines.append(f"command: `python benchmarks/students.py {' '.join(sys.argv[1:])}`\n")
    lines.append(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                 f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
                 f"load average {loads[0]:.2f} at start, {loads[1]:.2f} at end\n")
    lines.append(f"runs: {out}" + (" (temporary, deleted)" if not args.out else "") + "\n")
    m0 = next(iter(manifests.values()))
    unlabeled = max(m["num_samples"] - m["num_labeled"] for m in manifests.values())
    lines.append(f"data: {m0['num_labeled']} labeled training images (stratified), {unlabeled} unlabeled for the "
                 f"transfer variant; accuracy on all {n_test} test images; seeds finished per variant: "
                 + ", ".join(f"{v} {len(runs[v])}" for v in variants) + "\n")
    s0 = first["students"][0]
    views = first["targets"]
    lines.append(f"students: {s0['model']} at {s0['resolution']} px, {s0['epochs']} epochs, batch {s0['batch_size']}, "
                 f"SGD lr {s0['optim']['lr']}; CutMix α {args.cutmix} / MixUp α {args.mixup} with p {args.mix_prob} "
                 f"(in-batch for baseline, cached and online; in the store for exact and transfer); KD {args.kd_weight}"
                 f" · T² KL at requested T {args.temperature} (LS policy {args.ls_policy}); stores of {views['views']}"
                 f" random views + 1 center, crop scale {views['scale']}, targets.augment "
                 f"{json.dumps(views['augment']) if views['augment'] else 'none'}\n")

    lines.append("## Stages\n")
    rows = [["teach", seconds(timings, "teach"), (f"teacher: {teacher['epochs']} epochs at "
             f"{teacher['train_images_per_sec']:.0f} img/s, then the {first['name']} store")]]
    for run, m in manifests.items():
        e = m.get("export") or {}
        rows.append([f"store {run}", seconds(timings, f"export-{run}"),
                     f"{m['num_samples']} images × {m['rows_per_sample']} views"
                     + (f", {e['views_per_sec']:.0f} views/s" if "views_per_sec" in e else "")
                     + (", exact mixing" if "mix" in m["view_spec"] else "")])
    rows.append(["learn", seconds(timings, "learn"), f"{sum(len(r) for r in runs.values())} students"])
    rows.append(["full-test evaluation", seconds(timings, "eval"), f"{len(full)} models × {n_test} images"])
    lines.append(table(["stage", "wall s", "what"], *rows))
    lines.append("")

    lines.append("## Accuracy and speed\n")
    about = f"{teacher['model']} ({teacher.get('card')}) at {teacher['input_size']} px, LS {teacher['label_smoothing']}"
    rows = [["teacher", about, "-", m0["num_labeled"], f"{teacher_top1:.4f}", "-",
             f"{teacher['train_images_per_sec']:.0f}", f"{teacher['wall_seconds']:.0f}", "-"]]
    for v in variants:
        m = metrics[runs[v][0]]
        how = "labels only" if v == "baseline" else \
            f"{m['kd_targets']}, w={m['kd_weight']:g}, T={m['temperature']:g} (LS policy: {m['ls_decision']})"
        mu, sd = mean_std(top1[v])
        su, ss = mean_std(speed[v])
        kl = [metrics[k]["mix_approx_kl"] for k in runs[v] if metrics[k].get("mix_approx_kl") is not None]
        rows.append([f"{v} ({RUN_OF[v]})", how, len(runs[v]), m["train_images"], f"{mu:.4f} ± {sd:.4f}",
                     " ".join(f"{t:.4f}" for t in top1[v]), f"{su:.0f} ± {ss:.0f}",
                     f"{np.mean([metrics[k]['wall_seconds'] for k in runs[v]]):.0f}",
                     f"{np.mean(kl):.4f}" if kl else "-"])
    lines.append(table(["model (store)", "distillation", "seeds", "train images", "top-1 mean ± std", "top-1 per seed",
                        "train img/s mean ± std", "wall s (mean)", "cached-mix KL"], *rows))
    lines.append("\nstd: sample std over seeds. train img/s: the student stage's own training-loop throughput "
                 "(`train_images_per_sec`: data, teacher for online, step). cached-mix KL: KL(online ‖ the in-batch "
                 "mixture of cached targets) on the online students' mixed batches.\n")

    lines.append("## Targets\n")
    checks = []
    base_mu, _base_sd = mean_std(top1["baseline"])
    margin = teacher_top1 - max(top1["baseline"])
    checks.append(["teacher − best baseline student", f"{100 * margin:+.2f} points",
                   f"≥ {100 * TEACHER_MARGIN:.0f} points", pass_fail(margin >= TEACHER_MARGIN)])

    def pooled(a, b):
        return float(np.sqrt((mean_std(top1[a])[1] ** 2 + mean_std(top1[b])[1] ** 2) / 2))

    for v in [v for v in ("cached", "online", "exact") if v in variants]:
        gain, sd2 = np.mean(top1[v]) - base_mu, 2 * pooled(v, "baseline")
        checks.append([f"{v} − baseline top-1", f"{100 * gain:+.2f} points (2 std = {100 * sd2:.2f})",
                       "> 2 std" if v == "exact" else "-",
                       pass_fail(len(top1[v]) > 1 and gain > sd2) if v == "exact" else "-"])
    if "exact" in variants and "online" in variants:
        behind, sd1 = np.mean(top1["online"]) - np.mean(top1["exact"]), pooled("exact", "online")
        checks.append(["online − exact top-1", f"{100 * behind:+.2f} points (1 std = {100 * sd1:.2f})",
                       "≤ 1 std", pass_fail(behind <= sd1)])
    if "exact" in variants:
        ratio = np.mean(speed["exact"]) / np.mean(speed["baseline"])
        checks.append(["throughput exact / baseline", f"{ratio:.3f}", f"≥ {BASELINE_RATIO}",
                       pass_fail(ratio >= BASELINE_RATIO)])
        if "online" in variants:
            ratio = np.mean(speed["exact"]) / np.mean(speed["online"])
            checks.append(["throughput exact / online", f"{ratio:.2f}", f"≥ {ONLINE_RATIO:g}",
                           pass_fail(ratio >= ONLINE_RATIO)])
    if "cached" in variants:
        ratio = np.mean(speed["cached"]) / np.mean(speed["baseline"])
        checks.append(["throughput cached / baseline", f"{ratio:.3f}", "-", "-"])
    gap = teacher_top1 - base_mu
    for v in variants[1:]:
        closed = (np.mean(top1[v]) - base_mu) / gap if gap > 0 else float("nan")
        target = f"≥ {GAP_TARGET:.0%}" if v == "transfer" else "-"
        result = pass_fail(gap > 0 and closed >= GAP_TARGET) if v == "transfer" else "-"
        checks.append([f"teacher–baseline gap closed by {v}", f"{closed:.0%}", target, result])
    lines.append(table(["check", "value", "target", "result"], *checks))
    lines.append("\n2 std: twice the pooled seed std √((s_a² + s_b²) / 2); with one seed there is no std and the "
                 "check fails. Gap closed: (student − baseline) / (teacher − baseline), mean top-1 on the full test "
                 "set.")
    return "\n".join(lines)


def main():
    args = parse_args()
    loads = [os.getloadavg()[0]]  # other jobs on the machine move every speed here; the report shows how busy it was
    tmp = None
    if args.out:
        out = args.out.resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="distill-students-")
        out = Path(tmp)
    timings = {}
    try:
        if not args.report_only:
            recipes = make_recipes(args, out)
            for run in recipes:
                if (out / run).exists():
                    sys.exit(f"error: --out: {out / run} already holds a run; give another --out, or --report-only "
                             "to print its tables")
            out.mkdir(parents=True, exist_ok=True)
            paths = {}
            for run, recipe in recipes.items():
                paths[run] = out / f"{run}.yaml"
                paths[run].write_text(yaml.safe_dump(recipe, sort_keys=False))
            distill = [sys.executable, "-m", "distill.cli"]  # run from ROOT: this checkout's code, installed or not
            first = next(iter(recipes))
            if args.teacher_from:  # a saved teacher: copied into each run, which exports its own store from it
                shutil.copytree(args.teacher_from, out / first / "teacher")
                timings[f"export-{first}"] = stage(f"export {first}", [*distill, "teach", str(paths[first]),
                                                                       "--export-only"], out / f"export-{first}.log")
            else:
                timings["teach"] = stage("teach", [*distill, "teach", str(paths[first])], out / "teach.log")
            for run in list(recipes)[1:]:
                shutil.copytree(out / first / "teacher", out / run / "teacher", ignore=shutil.ignore_patterns("last"))
                timings[f"export-{run}"] = stage(f"export {run}", [*distill, "teach", str(paths[run]), "--export-only"],
                                                 out / f"export-{run}.log")
            start = time.perf_counter()
            for seed in range(args.seeds):  # seed-major across both runs
                for run, recipe in recipes.items():
                    names = [s["name"] for s in recipe["students"] if s["seed"] == seed]
                    stage(f"learn {run} seed {seed}", [*distill, "learn", str(paths[run])]
                          + [a for n in names for a in ("--student", n)], out / f"learn-{run}-s{seed}.log")
            timings["learn"] = time.perf_counter() - start
        recipes = {p.stem: yaml.safe_load(p.read_text()) for run in ("inbatch", "exact")
                   for p in [out / f"{run}.yaml"] if p.is_file()}
        first = next(iter(recipes))
        start = time.perf_counter()
        names = [f"{first}/teacher"] + [f"{r}/students/{s['name']}" for r in recipes for s in recipes[r]["students"]
                                        if (out / r / "students" / s["name"] / "metrics.json").is_file()]
        full = evaluate_on_full_test(out, names)
        timings["eval"] = time.perf_counter() - start
        print(report(args, out, recipes, full, timings, (loads[0], os.getloadavg()[0])))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
