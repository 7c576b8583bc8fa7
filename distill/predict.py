"""Entry: a saved model's predictions for images as CSV (`distill predict`).

    distill predict <model dir> <images> --out preds.csv [--tta] [--tta-scales 1.0,1.15] [--no-hflip]
                    [--batch-size 64] [--labels]

<images>: a folder (every image under it, recursively, sorted; the CSV names them relative to the folder), a CSV
with a `path` column (paths relative to the CSV; kept as written) and optionally a `label` column, or one image.
The prediction CSV: `path,[label,]prediction,confidence,prob_<class>...`, one row per image, in input order.
`distill diff` (distill.diff) shows where two such CSVs disagree.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from distill import results
from distill.errors import DistillError, exit_on_error
from distill.recipe import Recipe, TTAConfig, load_recipe

# torch, timm and albumentations take seconds to import: the predict side imports them (distill.data,
# distill.models, distill.runs, distill.tta) where it needs them, so --help is instant.

# a model dir is the run dir's teacher/, students/<name>/ or students/<name>/fixres/: the recipe is at most
# three levels up, and looking no further keeps an unrelated config.yaml higher up from being read as one
RECIPE_LEVELS = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill predict", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory written by distill (runs/<name>/teacher, "
                                 "runs/<name>/students/<student>[/fixres])")
    p.add_argument("images", help="an image folder, a CSV with a 'path' column, or one image file")
    p.add_argument("--out", required=True, help="the prediction CSV to write")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation with the run's tta: section (defaults outside a run)")
    p.add_argument("--tta-scales", help="comma-separated zoom scales in [0.5, 2], e.g. 1.0,1.15 (implies --tta)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="add mirrored views (implies --tta; default: the tta: section's hflip)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--labels", action="store_true",
                   help="the images have labels (class folders, or a CSV 'label' column): print top1 / macro_f1")
    return p.parse_args(argv)


# --- inputs -------------------------------------------------------------------
@dataclass
class Images:
    paths: list[str]  # to read
    names: list[str]  # as written in the prediction CSV
    labels: list[int] | None  # class indices of the model, with --labels


def find_images(source: str, classes: list[str], with_labels: bool = False) -> Images:
    """The images `source` names (see the module docstring), with the model's class index of each label."""
    from distill.data import IMAGE_EXTENSIONS, image_files

    path = Path(source).expanduser()
    if path.is_dir():
        paths = image_files(path)
        if not paths:
            raise DistillError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below; "
                               "give a folder of images, a CSV with a 'path' column, or an image file")
        names = [Path(p).relative_to(path).as_posix() for p in paths]
        labels = None
        if with_labels:
            if any("/" not in n for n in names):
                loose = next(n for n in names if "/" not in n)
                raise DistillError(f"--labels: {path / loose} is not in a class folder; give a folder of class "
                                   "folders (<folder>/<class>/<image>), or drop --labels")
            labels = [_class_index(n.split("/", 1)[0], classes, f"{path}: class folder") for n in names]
        return Images(paths, names, labels)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_image_csv(path, classes, with_labels)
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        if with_labels:
            raise DistillError(f"--labels: {path} is one image without a label; give a folder of class folders or "
                               "a CSV with a 'label' column, or drop --labels")
        return Images([str(path)], [source], None)
    if path.is_file():
        raise DistillError(f"{path}: neither a CSV nor an image ({', '.join(IMAGE_EXTENSIONS)}); give an image "
                           "folder, a CSV with a 'path' column, or an image file")
    raise DistillError(f"{path}: no such file or folder; give an image folder, a CSV with a 'path' column, "
                       "or an image file")


def _read_image_csv(path: Path, classes: list[str], with_labels: bool) -> Images:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM into the header
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column in ("path", *(("label",) if with_labels else ())):
            if column not in columns:
                raise DistillError(f"{path}: no column {column!r}; its columns are: {', '.join(columns) or '(none)'}")
        rows = [(reader.line_num, (row["path"] or "").strip(), (row.get("label") or "").strip()) for row in reader]
    if not rows:
        raise DistillError(f"{path}: no rows; add one image per row")
    paths, names, labels = [], [], []
    for line, image, label in rows:
        if not image or (with_labels and not label):
            raise DistillError(f"{path}: line {line}: empty {'path' if not image else 'label'!r} column; fill it "
                               "or drop the row")
        full = path.parent / Path(image).expanduser()  # an absolute path stays absolute
        if not full.is_file():
            raise DistillError(f"{path}: line {line}: image {image!r} not found ({full}); paths are relative to "
                               "the CSV's folder")
        paths.append(str(full))
        names.append(image)
        if with_labels:
            labels.append(_class_index(label, classes, f"{path}: line {line}: label"))
    return Images(paths, names, labels if with_labels else None)


def _class_index(name: str, classes: list[str], where: str) -> int:
    if name in classes:
        return classes.index(name)
    # '07' and '7' are the same class, as in data.source csv
    if name.lstrip("-").isdigit() and str(int(name)) in classes:
        return classes.index(str(int(name)))
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    raise DistillError(f"{where} {name!r} is not a class of the model ({shown}); fix it, or drop --labels")


def find_recipe(model_dir: Path) -> Recipe | None:
    """The recipe of the run a model dir lies in: the nearest config.yaml at or above it (None outside a run)."""
    d = Path(model_dir).resolve()
    for folder in [d, *d.parents][:RECIPE_LEVELS + 1]:
        if (folder / "config.yaml").is_file():
            return load_recipe(folder / "config.yaml")
    return None


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or not all(0.5 <= s <= 2 for s in scales):
        raise DistillError(f"--tta-scales: expected comma-separated scales in [0.5, 2], e.g. 1.0,1.15; got {text!r}")
    return scales


def tta_config(args, recipe: Recipe | None) -> TTAConfig | None:
    """The TTA to use: the run's tta: section (the defaults outside a run) with the flags on top; None without."""
    if not (args.tta or args.tta_scales or args.hflip is not None):
        return None
    base = recipe.tta if recipe is not None else TTAConfig()
    return TTAConfig(enabled=True, hflip=base.hflip if args.hflip is None else args.hflip,
                     scales=parse_scales(args.tta_scales) if args.tta_scales else list(base.scales))


def describe_tta(cfg: TTAConfig | None) -> str:
    from distill.tta import is_plain, num_views

    if is_plain(cfg):
        return "no TTA"
    return f"TTA {num_views(cfg)} views: scales {', '.join(f'{s:g}' for s in cfg.scales)}{' + hflip' if cfg.hflip else ''}"


# --- predicting -----------------------------------------------------------------
def predict_split(model, pre, split, tta: TTAConfig | None = None, batch_size: int = 64, augment: list | None = None,
                  transform=None):
    """(float32 logits, labels) of every image of a `distill.data.Split`, in order, with the model's eval
    transform: `transform` (as `distill.models.load_for_eval` gives it), else built from `augment` (a recipe's
    eval list; None: the default). Under TTA the logits are the log of the mean probability over the views."""
    import torch
    from torch.utils.data import DataLoader

    from distill.data import ImageDataset, build_transform
    from distill.tta import tta_logits

    model.eval()
    if transform is None:
        transform = build_transform(augment, "eval", pre)
    loader = DataLoader(ImageDataset(split, transform), batch_size=batch_size)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            logits.append(tta_logits(model, x, tta).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def prediction_csv(names: list[str], probs, classes: list[str], labels: list[int] | None) -> str:
    """The prediction CSV text: one row per image, `prob_<class>` columns in the model's class order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *(["label"] if labels is not None else []), "prediction", "confidence",
                     *(f"prob_{c}" for c in classes)])
    conf, pred = probs.max(-1)
    for i, name in enumerate(names):
        writer.writerow([name, *([classes[labels[i]]] if labels is not None else []), classes[pred[i]],
                         f"{conf[i]:.6g}", *(f"{p:.6g}" for p in probs[i].tolist())])
    return buf.getvalue()


@exit_on_error
def main(argv=None):
    args = parse_args(argv)  # before the heavy imports, so --help is instant
    import torch

    from distill.data import UNLABELED, Split
    from distill.runs import write_text

    if args.batch_size < 1:
        raise DistillError(f"--batch-size: expected at least 1, got {args.batch_size}")
    model_dir = Path(args.model)
    # the model with the eval transform it was evaluated with (its folder says which)
    model, pre, info, transform = load_model_dir(model_dir)
    classes = list(info["classes"])
    images = find_images(args.images, classes, args.labels)
    wants_recipe = args.tta or args.tta_scales or args.hflip is not None
    recipe = find_recipe(model_dir) if wants_recipe else None
    tta = tta_config(args, recipe)
    labels = images.labels if images.labels is not None else [UNLABELED] * len(images.paths)
    split = Split(classes, labels, paths=images.paths, name=str(args.images))

    start = time.perf_counter()
    logits, _ = predict_split(model, pre, split, tta, args.batch_size, transform=transform)
    seconds = time.perf_counter() - start
    probs = logits.softmax(-1)
    write_text(Path(args.out), prediction_csv(images.names, probs, classes, images.labels))
    print(f"predicted {len(images.paths)} images with {model_dir} ({describe_tta(tta)}) in {seconds:.1f} s, "
          f"{len(images.paths) / max(seconds, 1e-9):.1f} images/s")
    if images.labels is not None:
        from distill.evaluate import classification_metrics

        m = classification_metrics(logits, torch.tensor(images.labels), len(classes))
        print(f"top1 {m['top1']:.4f}  macro_f1 {m['macro_f1']:.4f}  nll {m['nll']:.4f} "
              f"on {len(images.labels)} labelled images")
    print(f"written: {args.out}")


def load_model_dir(model_dir: Path):
    """(model, preprocess, model.json, eval transform) of a saved model (`distill.models.load_for_eval`)."""
    from distill.models import load_for_eval

    if not model_dir.is_dir():
        raise DistillError(f"{model_dir}: no such model directory; give runs/<name>/teacher or "
                           "runs/<name>/students/<student>")
    results.check(model_dir)  # a stage under way or interrupted: its weights are not a finished result
    return load_for_eval(model_dir)


if __name__ == "__main__":
    main()
