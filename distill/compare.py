"""Entry: one comparison table of the teacher and every student of one or more run directories.

    python -m distill.compare runs/<recipe> [more run dirs ...] [--no-speed] [--no-tta] [--out DIR]
    distill compare runs/<recipe> [...]

Writes comparison.{md,csv}, an accuracy-vs-latency plot, and TensorBoard (tb/compare: the table as text, one
hparams entry per model, the plot and the confusion matrices as images) into --out, by default into the run
directory when there is one run. A table of several runs is only printed without --out: it never replaces a
run's own table. A teacher or student whose stage is under way or was interrupted is left out with one line.
When the first run's recipe has `tta.enabled: true`, each model also gets a `<role>+tta` row: its accuracy
with test-time augmentation on its run's validation set, and its latency and throughput with TTA.
A model deployed with `distill deploy` (a deploy/deploy.json of its current weights) also gets the ONNX Runtime
latency and throughput `distill deploy` measured (`ort_*` columns; `-` otherwise).
The trials of `distill sweep` are students too; the `sweep` column marks them, the best one `best of N`.
The recipe's other `log.trackers` (W&B, MLflow) get the table (and the plot) as a run named `compare`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from distill import results, trackers
from distill.compare_report import COLUMNS, markdown, plot, to_tensorboard
from distill.deploy import deployed_speed
from distill.errors import DistillError, exit_on_error
from distill.models import load_for_eval, load_model
from distill.recipe import Recipe, TTAConfig, load_recipe
from distill.runs import write_text
from distill.tta import num_views, tta_logits


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (runs/<recipe>)")
    p.add_argument("--no-speed", action="store_true", help="skip measuring latency and throughput")
    p.add_argument("--no-tta", action="store_true", help="no <model>+tta rows, even when the recipe enables tta")
    p.add_argument("--out", type=Path, help="write the table, plot and TensorBoard here (default: the run's own "
                   "directory with one run; with several runs nothing is written without --out)")
    return p.parse_args(argv)


def find_models(run_dir: Path) -> list[tuple[str, Path]]:
    """(role, model dir) of the teacher and each student that finished: its metrics.json describes the weights
    on disk. A folder whose stage is under way or was interrupted is left out, with one line saying so."""
    candidates = [("teacher", run_dir / "teacher")]
    for d in sorted((run_dir / "students").glob("*/")):
        candidates += [(d.name, d), (f"{d.name}+fixres", d / "fixres")]
    found = []
    for role, d in candidates:
        why = results.problem(d)
        if why is not None:
            print(f"warning: {role} left out: {why}", file=sys.stderr)
        elif (d / "metrics.json").is_file():
            found.append((role, d))
            # an ensemble teacher: each member too (k-fold teachers, models trained elsewhere)
            for member in json.loads((d / "metrics.json").read_text()).get("members", []) if role == "teacher" else []:
                found.append((f"teacher:{member['name']}", d / member["dir"]))
    return found


@torch.inference_mode()
def measure_speed(model_dir: Path, repeats: int = 20, tta: TTAConfig | None = None) -> tuple[float, float]:
    """Latency (ms) at batch 1 and throughput (images/s) at batch 64 on this machine, float32; with `tta`, of
    the whole TTA prediction (every view's forward pass).

    The best of `repeats` timings after warm-up: other work on the machine only ever adds time, so the
    minimum is the stable estimate of what the model itself costs.
    """
    model, pre, _ = load_model(model_dir)
    model.eval()
    results = []
    for batch, n in ((1, repeats), (64, max(5, repeats // 2))):
        x = torch.randn(batch, 3, pre.input_size, pre.input_size).contiguous(memory_format=torch.channels_last)
        for _ in range(3):  # warm-up: oneDNN picks and caches its kernels on the first calls
            tta_logits(model, x, tta)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            tta_logits(model, x, tta)
            times.append(time.perf_counter() - start)
        results.append(min(times))
    return results[0] * 1000, 64 / results[1]


def row_for(run_dir: Path, role: str, model_dir: Path, speed: bool) -> dict:
    m = json.loads((model_dir / "metrics.json").read_text())
    if role.startswith("teacher:"):  # an ensemble member: its metrics on this run's validation split
        ensemble = json.loads((run_dir / "teacher" / "metrics.json").read_text())
        m = {**m, **next(x for x in ensemble["members"] if f"teacher:{x['name']}" == role)}
    latency, throughput = measure_speed(model_dir) if speed else (None, None)
    ort_latency, ort_throughput = deployed_speed(model_dir)  # measured by `distill deploy`, if it ran
    mix = m.get("mix") or {}
    mix_text = "+".join(k.split("_")[0] for k in ("mixup_alpha", "cutmix_alpha") if mix.get(k)) or "-"
    student = not role.startswith("teacher")
    distilled = student and m.get("kd_loss") not in (None, "none")
    return {
        "run": run_dir.name, "model": m.get("model"), "role": role,
        "resolution": m.get("resolution") or m.get("input_size"), "top1": m["top1"], "macro_f1": m["macro_f1"],
        "nll": m["nll"], "ece": m["ece"], "params_m": m["params"] / 1e6, "latency_ms_b1": latency,
        "images_per_sec_b64": throughput, "ort_latency_ms_b1": ort_latency, "ort_images_per_sec_b32": ort_throughput,
        "tta_views": 1, "train_minutes": m["wall_seconds"] / 60,
        "kd": m.get("kd_loss", "-") if student else "-", "temperature": m.get("temperature") if distilled else None,
        "kd_weight": m.get("kd_weight") if distilled else None, "label_smoothing": m.get("label_smoothing"),
        "mix": mix_text, "ls_decision": m.get("ls_decision", "-") if student else "-",
        "_confusion": m.get("confusion_matrix"), "_classes": m.get("classes"),
        "_reason": m.get("ls_reason") if not m.get("fixres") else None, "_fixres": m.get("fixres"),
        "_folds": m.get("folds") if role == "teacher" else None, "sweep": sweep_mark(run_dir, role),
    }


def sweep_mark(run_dir: Path, role: str) -> str | None:
    """`best of N` for the best of the N complete trials of a `distill sweep` (sweep/<student>.json), `trial <n>`
    for the others; None for a model that is no complete trial."""
    for path in sorted((run_dir / "sweep").glob("*.json")):
        sweep = json.loads(path.read_text())
        for t in sweep["trials"]:
            if t["state"] == "COMPLETE" and t["dir"] == role:
                best = sweep["best"] is not None and sweep["best"]["number"] == t["number"]
                return f"best of {sweep['complete']}" if best else f"trial {t['number']}"
    return None


def tta_section(run_dir: Path) -> TTAConfig | None:
    """The run's `tta:` section when its recipe (config.yaml) enables it, else None."""
    recipe = run_recipe(run_dir)
    return recipe.tta if recipe is not None and recipe.tta.enabled else None


def run_recipe(run_dir: Path) -> Recipe | None:
    path = run_dir / "config.yaml"
    return load_recipe(path) if path.is_file() else None


def tta_row(row: dict, model_dir: Path, split, tta: TTAConfig, speed: bool, batch_size: int = 64) -> dict:
    """The `<role>+tta` row of the model whose plain row is `row`: accuracy with TTA on `split` (its run's
    validation split, on which its metrics.json was measured, through the eval transform its folder names),
    latency and throughput with TTA; training and distillation columns are the plain row's.
    """
    from distill.evaluate import classification_metrics
    from distill.predict import predict_split

    model, pre, info, transform = load_for_eval(model_dir)
    if len(split.classes) != info["num_classes"]:
        raise DistillError(f"{model_dir}: the model has {info['num_classes']} classes, its run's validation set "
                           f"{len(split.classes)}; was config.yaml replaced? Re-run the run, or pass --no-tta")
    logits, labels = predict_split(model, pre, split, tta, batch_size, transform=transform)
    m = classification_metrics(logits, labels, info["num_classes"])
    latency, throughput = measure_speed(model_dir, tta=tta) if speed else (None, None)
    return {**row, "role": f"{row['role']}+tta", "top1": m["top1"], "macro_f1": m["macro_f1"], "nll": m["nll"],
            "ece": m["ece"], "latency_ms_b1": latency, "images_per_sec_b64": throughput,
            "ort_latency_ms_b1": None, "ort_images_per_sec_b32": None,  # the deployed graph has no TTA
            "tta_views": num_views(tta), "_confusion": m["confusion_matrix"], "_reason": None, "_fixres": None}


def with_tta_rows(run_dir: Path, rows: list[dict], models: list[tuple[str, Path]], tta: TTAConfig,
                  speed: bool) -> list[dict]:
    """`rows` (one per model of `run_dir`) with each model's `+tta` row after its own."""
    from distill.data import load_splits

    recipe = run_recipe(run_dir)
    if recipe is None:
        print(f"warning: {run_dir}: no config.yaml, so no validation set to measure TTA on; no +tta rows",
              file=sys.stderr)
        return rows
    split = load_splits(recipe.data)[1]
    out = []
    for row, (role, model_dir) in zip(rows, models):
        print(f"tta: {run_dir.name}/{role}: {len(split)} val images x {num_views(tta)} views", flush=True)
        out += [row, tta_row(row, model_dir, split, tta, speed)]
    return out


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    run_dirs = [Path(r) for r in args.runs]
    for d in run_dirs:
        if not d.is_dir():
            raise DistillError(f"{d}: no such run directory; give runs/<recipe name>")
    tta = None if args.no_tta else tta_section(run_dirs[0])
    rows = []
    for d in run_dirs:
        models = find_models(d)
        if not models:
            print(f"warning: {d}: no finished teacher or student (no metrics.json)", file=sys.stderr)
        run_rows = [row_for(d, role, model_dir, not args.no_speed) for role, model_dir in models]
        rows += with_tta_rows(d, run_rows, models, tta, not args.no_speed) if tta and models else run_rows
    if not rows:
        raise DistillError(f"{', '.join(map(str, run_dirs))}: nothing to compare; run distill teach / learn first")
    table = markdown(rows)
    out = args.out if args.out is not None else run_dirs[0] if len(run_dirs) == 1 else None
    if out is None:  # a cross-run table never replaces a run's own (which `distill run` wrote with its speeds)
        print(table)
        print(f"not written: a table of {len(run_dirs)} runs goes where --out says (e.g. --out comparisons/"
              f"{'-vs-'.join(d.name for d in run_dirs)})")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "comparison.md", table)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "comparison.csv", buf.getvalue())
    figure = None
    if not args.no_speed:
        figure = plot(rows)
        figure.savefig(out / "accuracy_vs_latency.png")
    to_tensorboard(rows, table, out / "tb" / "compare", figure)
    recipe = run_recipe(out)  # its log.trackers beyond TensorBoard get the table too, as a run named `compare`
    if recipe is not None:
        for name in trackers.log_comparison(out, trackers.selected(recipe), COLUMNS, rows, table, figure):
            print(f"logged to {name}: the table, as run `compare` of project {out.name}")
    print(table)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'tb' / 'compare'}")


if __name__ == "__main__":
    main()
