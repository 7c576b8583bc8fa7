"""Entry: the noisy-label audit, training samples whose given label the teacher confidently contradicts.

    distill audit runs/<name> [--top 50] [--min-confidence 0.5] [--out runs/<name>/audit.csv]
    python -m distill.audit runs/<name> [...]

The teacher's prediction for training sample i is, in order of preference:
- out-of-fold: row i of `teacher/oof.safetensors` (tensor `logits` [N_train, K], tensor `fold` [N_train]),
  made by a fold model that never trained on sample i;
- in-sample: the center-view logits of the soft-target store (`targets/`). That teacher was trained on
  these very labels, so a wrong label it has memorised agrees with it and is not found: the audit then
  under-reports label noise, and says so.

Scoring is confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 70): per-class thresholds, then a margin ranking; see
`distill.confident_learning.suspects`.

Writes the ranked suspects as CSV (--out), a JSON summary next to it, an image grid of the top cases as
<out>.png and to TensorBoard (tb/audit), and prints a summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np

from distill.confident_learning import class_thresholds, estimated_errors, suspects, teacher_stats
from distill.errors import DistillError, exit_on_error
from distill.runs import write_json, write_text

OOF_FILE = "oof.safetensors"
OUT_OF_FOLD, IN_SAMPLE = "out-of-fold", "in-sample"
COLUMNS = ("rank", "index", "path", "given_label", "teacher_label", "teacher_confidence",
           "given_label_probability", "score", "source")
IN_SAMPLE_WARNING = ("in-sample predictions: the teacher was trained on these very labels, so a wrong label it "
                     "has memorised agrees with it and is not found; this audit under-reports label noise "
                     "(out-of-fold predictions in teacher/oof.safetensors, from a k-fold teacher, do not)")
THUMBNAIL = 96  # pixels of the longer side in the grid: enough to judge a label, small for huge photos
CHUNK = 4096  # samples per read of the store: memory stays flat for ImageNet-sized training sets


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill audit", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory (runs/<name>) with a trained teacher")
    p.add_argument("--top", type=int, default=50, help="suspects shown in the image grid (default 50)")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="a suspect's teacher must give its own label at least this probability (default 0.5)")
    p.add_argument("--out", help="the CSV to write (default <run>/audit.csv)")
    return p.parse_args(argv)


# --- the teacher's predictions ---------------------------------------------------------------
def load_run(run_dir: Path):
    """(recipe, train split, val split) of a run directory, or an error saying it is not one."""
    from distill.data import load_splits
    from distill.recipe import load_recipe

    if not run_dir.is_dir():
        raise DistillError(f"{run_dir}: no such run directory; give runs/<name> of a recipe run with distill run")
    if not (run_dir / "config.yaml").is_file():
        raise DistillError(f"{run_dir}: not a run directory (no config.yaml); give runs/<name>, written by "
                           "distill run or distill teach")
    recipe = load_recipe(run_dir / "config.yaml")
    from distill import results
    results.check(run_dir / "teacher")  # its oof logits and store are a finished teacher's, or nothing to audit
    train, val = load_splits(recipe.data)
    return recipe, train, val


def oof_predictions(path: Path, n: int, classes: list[str]) -> tuple[Iterator[np.ndarray], str]:
    """Out-of-fold logits, CHUNK samples at a time, from a k-fold teacher's file checked against the split."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
            shape = f.get_slice("logits").get_shape() if "logits" in names else None
            dtype = f.get_slice("logits").get_dtype() if "logits" in names else None
            folds = len(np.unique(f.get_tensor("fold"))) if "fold" in names else None
    except (OSError, SafetensorError) as e:
        raise DistillError(f"{path}: unreadable ({e}); re-run the k-fold teacher stage, or remove the file to "
                           "audit with the in-sample teacher") from None
    if shape != [n, len(classes)] or dtype not in ("F16", "F32", "F64"):
        found = "no tensor 'logits'" if shape is None else f"logits of shape {shape} and dtype {dtype}"
        raise DistillError(f"{path}: {found}, but the training split has {n} samples of {len(classes)} classes "
                           "(float32 logits expected); re-run the k-fold teacher stage for this recipe")

    def chunks():
        with safe_open(str(path), framework="numpy") as f:
            logits = f.get_slice("logits")
            for lo in range(0, n, CHUNK):
                yield logits[lo:min(n, lo + CHUNK)]

    return chunks(), f"{OUT_OF_FOLD} ({f'{folds}-fold teacher, ' if folds else ''}{path})"


def store_predictions(run_dir: Path, recipe, train, val) -> tuple[Iterator[np.ndarray], str, str]:
    """Logits, CHUNK samples at a time: the store's center view of each training sample (the teacher's test
    view), after checking that the store was built from the data the recipe gives now; and their source,
    in-sample unless the store was exported out-of-fold (targets.oof)."""
    from distill.data import load_unlabeled
    from distill.store import Samples, TargetStore, dataset_fingerprint

    store = TargetStore(run_dir / "targets")
    unlabeled = load_unlabeled(recipe.data, train, val) if recipe.data.unlabeled else None
    fingerprint = dataset_fingerprint(Samples(train, unlabeled), train.classes)
    if store.manifest["dataset"]["fingerprint"] != fingerprint:
        # sample i of the store must be image i of the split, or every path in the CSV would be wrong
        raise DistillError(f"{run_dir / 'targets'}: built from other data than {run_dir / 'config.yaml'} now "
                           "gives (images, labels or their order changed since); run distill run again to "
                           "retrain on the current data, then audit")
    center, n = store.manifest["center_view"], len(train)
    chunks = (store.rows(np.arange(lo, min(n, lo + CHUNK)), center)["logits"] for lo in range(0, n, CHUNK))
    source = OUT_OF_FOLD if store.manifest["logits"].get("source") == OUT_OF_FOLD else IN_SAMPLE
    return chunks, source, f"{source} (center views of {run_dir / 'targets'})"


def predictions(run_dir: Path, recipe, train, val) -> tuple[Iterator[np.ndarray], str, str]:
    """(logits in chunks of samples, source, what it is): the k-fold teacher's out-of-fold file when it exists,
    else the soft-target store."""
    oof = run_dir / "teacher" / OOF_FILE
    if oof.is_file():
        chunks, about = oof_predictions(oof, len(train), train.classes)
        return chunks, OUT_OF_FOLD, about
    if (run_dir / "targets" / "manifest.json").is_file():
        return store_predictions(run_dir, recipe, train, val)
    raise DistillError(f"{run_dir}: no teacher predictions (neither teacher/{OOF_FILE} nor targets/manifest.json); "
                       f"run distill run {run_dir / 'config.yaml'} (or distill teach) first")


# --- outputs -----------------------------------------------------------------------------
def audit_rows(index, scores, stats, train, source: str) -> list[dict]:
    names = train.classes
    return [{"rank": r + 1, "index": int(i), "path": train.describe(int(i)),
             "given_label": names[train.labels[i]], "teacher_label": names[stats["teacher"][i]],
             "teacher_confidence": round(float(stats["p_teacher"][i]), 4),
             "given_label_probability": round(float(stats["p_given"][i]), 4),
             "score": round(float(s), 4), "source": source}
            for r, (i, s) in enumerate(zip(index, scores))]


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def pair_counts(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(given, teacher, count) of the suspects, most frequent first: the off-diagonal of the confident joint."""
    counts = Counter((r["given_label"], r["teacher_label"]) for r in rows)
    return [(g, t, c) for (g, t), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def summary(rows: list[dict], n: int, estimate: float, source: str, about: str, min_confidence: float,
            shown: int = 10) -> str:
    lines = [f"audit: {n} training samples, teacher predictions {about}"]
    if source == IN_SAMPLE:
        lines.append(f"warning: {IN_SAMPLE_WARNING}")
    lines.append(f"suspects: {len(rows)} ({len(rows) / max(n, 1):.1%}) whose label the teacher contradicts "
                 f"above its class threshold and with confidence >= {min_confidence:g}; confident learning "
                 f"estimates {estimate:.0f} wrong labels in all")
    if rows:
        lines.append("given -> teacher: " + ", ".join(f"{g} -> {t}: {c}" for g, t, c in pair_counts(rows)[:10]))
        lines.append("top suspects:")
        lines += [f"  {r['rank']:>3}. {r['path']}  given {r['given_label']}, teacher {r['teacher_label']} "
                  f"{r['teacher_confidence']:.2f} (score {r['score']:.2f})" for r in rows[:shown]]
    return "\n".join(lines)


def thumbnail(image: np.ndarray) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    scale = THUMBNAIL / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def grid_figure(rows: list[dict], total: int, train, source: str, columns: int = 10):
    """The top suspects (`total` in all) as a grid of thumbnails, each captioned "given X / teacher Y 0.97"."""
    from matplotlib.figure import Figure

    columns = max(1, min(columns, len(rows)))
    grid_rows = max(1, -(-len(rows) // columns))
    fig = Figure(figsize=(1.7 * columns, 2.0 * grid_rows + 0.5), dpi=100)
    title = f"noisy-label audit: top {len(rows)} of {total} suspects ({source} teacher)"
    fig.suptitle(title if total else f"noisy-label audit: no suspects ({source} teacher)", fontsize=10)
    for k, r in enumerate(rows):
        ax = fig.add_subplot(grid_rows, columns, k + 1)
        ax.imshow(thumbnail(train.load(r["index"])))
        ax.set_title(f"#{r['rank']} given {r['given_label']} /\nteacher {r['teacher_label']} "
                     f"{r['teacher_confidence']:.2f}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def to_tensorboard(out_dir: Path, figure, text: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir))
    writer.add_text("audit/summary", "```\n" + text + "\n```")  # fenced: TensorBoard renders text as markdown
    writer.add_figure("audit/top_suspects", figure)
    writer.close()


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    if args.top < 0:
        raise DistillError(f"--top: {args.top}; give a number of images >= 0")
    if not 0 <= args.min_confidence <= 1:
        raise DistillError(f"--min-confidence: {args.min_confidence}; give a probability in [0, 1]")
    run_dir = Path(args.run)
    out = Path(args.out) if args.out else run_dir / "audit.csv"
    recipe, train, val = load_run(run_dir)
    chunks, source, about = predictions(run_dir, recipe, train, val)

    stats = teacher_stats(chunks, train.labels)
    thresholds = class_thresholds(stats["p_given"], train.labels, len(train.classes))
    index, scores = suspects(stats["p_given"], stats["teacher"], stats["p_teacher"], train.labels, thresholds,
                             args.min_confidence)
    estimate = estimated_errors(stats["teacher"], stats["p_teacher"], train.labels, thresholds, len(train.classes))
    rows = audit_rows(index, scores, stats, train, source)
    text = summary(rows, len(train), estimate, source, about, args.min_confidence)

    figure = grid_figure(rows[:args.top], len(rows), train, source)  # reads images: may fail, so before writing
    write_csv(out, rows)
    write_json(out.with_suffix(".json"), {
        "source": source, "predictions": about, "warning": IN_SAMPLE_WARNING if source == IN_SAMPLE else None,
        "method": "confident learning (Northcutt et al. 2021): per-class thresholds, ranked by margin p_teacher - "
                  "p_given", "min_confidence": args.min_confidence, "num_audited": len(train),
        "num_suspects": len(rows), "estimated_wrong_labels": round(estimate, 1), "thresholds": dict(zip(train.classes, thresholds.round(4).tolist())),
        "pairs": [{"given": g, "teacher": t, "count": c} for g, t, c in pair_counts(rows)]})
    figure.savefig(out.with_suffix(".png"))
    to_tensorboard(run_dir / "tb" / "audit", figure, text)
    print(text)
    print(f"written: {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}, {run_dir / 'tb' / 'audit'}")


if __name__ == "__main__":
    main()
