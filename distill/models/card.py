"""README.md of a model folder: a Hugging Face model card (YAML front matter, then markdown) from the run's records.

`save_model` writes it with what the model is; `record.write_metrics` rewrites it with how it scored, so the
card is never older than metrics.json. Everything comes from files already in the run directory: the
folder's model.json and metrics.json, the run's config.yaml (the data), the soft-target store's manifest
(the teacher a student was distilled from: model and weights sha256, the store's fingerprint) and the
labels-only baseline's metrics.json (a student of the same run with `kd.loss: none`). A fact that is not
there is left out, never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

SCORES = ("top1", "top5", "macro_f1", "nll", "ece")  # as distill.record.SCORES (not imported: record imports us)
RUN_LEVELS = 3  # teacher/, students/<name>/, students/<name>/fixres/, teacher/fold-<f>/ sit 1-3 levels down
# data sources whose images are a Hugging Face dataset, for the card's `datasets:`
HUB_DATASETS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}
LIBRARY = {"timm": "timm", "hf": "transformers"}  # model.json `source` -> the library that loads the folder


def write_card(model_dir, info: dict | None = None, metrics: dict | None = None, siblings: bool = True):
    """Write model_dir/README.md; `info` is model.json (read from the folder when None), `metrics` the
    metrics.json record (None: not evaluated yet). Returns the path, or None for a folder without a model.json
    (a metrics.json written elsewhere). The labels-only baseline's metrics also refresh the other students' cards,
    whose comparison they complete."""
    from distill.runs import write_text

    d = Path(model_dir)
    if info is None:
        try:
            info = json.loads((d / "model.json").read_text())
        except (OSError, ValueError):
            return None
    run = _run_dir(d)
    write_text(d / "README.md", card_text(d, info, metrics, run))
    if siblings and run is not None and (metrics or {}).get("kd_loss") == "none":
        for other in _student_dirs(run):
            if other.resolve() != d.resolve() and (other / "metrics.json").is_file():
                write_card(other, metrics=_read(other / "metrics.json"), siblings=False)
    return d / "README.md"


def card_text(d: Path, info: dict, metrics: dict | None, run: Path | None) -> str:
    extra, m = info.get("extra") or {}, metrics or {}
    recipe = _read_yaml(run / "config.yaml") if run else {}
    store = _read(run / "targets" / "manifest.json") if run else {}
    student = extra.get("student") or m.get("student")
    role = ("FixRes student" if extra.get("fixres") else "student") if student else (
        "ensemble teacher" if info.get("source") == "ensemble" else
        "teacher" if "trained_with_label_smoothing" in extra else "model")
    model = info.get("model") or info.get("name") or info.get("source")
    title = f"{role} `{str(student).removesuffix('+fixres')}`" if student else role
    title = f"{title} of run `{recipe['name']}`" if recipe.get("name") else title
    pre = info.get("preprocess") or {}
    sections = [
        f"# {title[0].upper()}{title[1:]}: {model}",
        _what(info, role, pre),
        _teacher(store) if student else _exported(info, store),
        _kd(m) if student else "",
        _scores(d, m, run, student),
        _data(recipe.get("data") or {}, m),
        _usage(info, pre),
    ]
    return _front_matter(info, m, recipe, role) + "\n\n".join(s for s in sections if s) + "\n"


def _front_matter(info: dict, m: dict, recipe: dict, role: str) -> str:
    library = LIBRARY.get(info.get("source"))
    front = {}
    if library:
        front["library_name"] = library
    front["pipeline_tag"] = "image-classification"
    front["tags"] = ["image-classification", *([library] if library else []), "knowledge-distillation", "distill"]
    licence = _licence(recipe, role)
    if licence:
        front["license"] = licence
    data = recipe.get("data") or {}
    dataset = data.get("dataset") or HUB_DATASETS.get(data.get("source"))
    if dataset:
        front["datasets"] = [dataset]
    if all(k in m for k in SCORES):
        front["metrics"] = ["accuracy", "f1"]
        front["model-index"] = [{"name": recipe.get("name") or str(info.get("model")), "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": dataset or str(data.get("source", "validation images")),
                        "type": dataset or str(data.get("source", "images"))},
            "metrics": [{"type": "accuracy", "name": "top-1 accuracy (validation)", "value": round(m["top1"], 4)},
                        {"type": "f1", "name": "macro F1 (validation)", "value": round(m["macro_f1"], 4)}]}]}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"


def _what(info: dict, role: str, pre: dict) -> str:
    classes = info.get("classes") or []
    shown = ", ".join(map(str, classes[:20])) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
    library = (f" (timm `{info['name']}`)" if info.get("source") == "timm" else
               f" (transformers `{info['hf_class']}`)" if info.get("hf_class") else "")
    lines = [f"An image classifier, the {role} of a knowledge-distillation run of distill.", "",
             f"- architecture: `{info.get('model') or info.get('name')}`{library}",
             f"- parameters: {info['params']:,}" if isinstance(info.get("params"), int) else None,
             f"- resolution: {pre.get('input_size')} px (eval: shorter side to input_size / crop_pct "
             f"{pre.get('crop_pct')}, centre crop, {pre.get('interpolation')}; mean {_floats(pre.get('mean'))}, "
             f"std {_floats(pre.get('std'))})" if pre else None,
             f"- classes ({len(classes)}): {shown}",
             f"- weights sha256: `{info.get('sha256')}`"]
    if info.get("source") == "ensemble":
        lines.append(f"- members ({info.get('combine')} combined): "
                     + ", ".join(f"`{m}`" for m in info.get("members", [])))
    return "\n".join(line for line in lines if line is not None)


def _teacher(store: dict) -> str:
    t = store.get("teacher") or {}
    if not t:
        return "## Teacher\n\nNo soft-target store beside this run: the teacher is not recorded here."
    top1 = _num((store.get("diagnostics") or {}).get("top1_center"))
    return (f"## Teacher\n\nDistilled from `{t.get('model')}` (weights sha256 `{t.get('sha256')}`, "
            f"{t.get('input_size')} px) through the soft-target store `{store.get('fingerprint')}` "
            f"({store.get('num_samples')} images x {store.get('rows_per_sample')} views; the teacher's top-1 on "
            f"the centre views: {top1}).")


def _exported(info: dict, store: dict) -> str:
    t = store.get("teacher") or {}
    if t.get("sha256") != info.get("sha256"):
        return ""
    return (f"## Soft targets\n\nThis run's soft-target store `{store.get('fingerprint')}` holds this model's "
            f"outputs for {store.get('num_samples')} images x {store.get('rows_per_sample')} views.")


def _kd(m: dict) -> str:
    if not m:
        return ""
    if m.get("kd_loss") == "none":
        head = "Labels only (`kd.loss: none`): the run's baseline, trained without the teacher."
    else:
        head = (f"Loss `{m.get('kd_loss')}`, temperature T = {m.get('temperature')}, KD weight "
                f"{m.get('kd_weight')} (loss = (1 - weight) · CE + weight · KD), targets `{m.get('kd_targets')}`"
                + (", logit standardisation" if m.get("kd_standardize") else "") + ".")
    lines = ["## Distillation", "", head, ""]
    if m.get("ls_decision") is not None:
        lines += [f"Label-smoothing policy: `{m.get('ls_decision')}`: {m.get('ls_reason')}", ""]
    if m.get("train_resolution"):
        fixres = f"trained at {m['train_resolution']} px, then fine-tuned and tested at {m.get('resolution')} px"
        lines += [f"FixRes: {fixres}.", ""]
    mix = m.get("mix") or {}
    extras = [f"label smoothing {m.get('label_smoothing')}",
              f"MixUp α {mix['mixup_alpha']}" if mix.get("mixup_alpha") else None,
              f"CutMix α {mix['cutmix_alpha']}" if mix.get("cutmix_alpha") else None,
              f"EMA decay {m['ema']}" if m.get("ema") else None]
    lines.append("Training: " + ", ".join(e for e in extras if e) + ".")
    return "\n".join(lines)


def _scores(d: Path, m: dict, run: Path | None, student) -> str:
    if not m:
        return "## Metrics\n\nNot evaluated yet (metrics.json is written when the stage completes)."
    base_name, base = _baseline(d, run) if student and m.get("kd_loss") != "none" else (None, {})
    header = f"| metric | this model ({_res(m)}) |" + (f" labels-only `{base_name}` ({_res(base)}) |" if base else "")
    rows = [header, "|---|---|" + ("---|" if base else "")]
    for k in SCORES:
        rows.append(f"| {k} | {_num(m.get(k))} |" + (f" {_num(base.get(k))} |" if base else ""))
    note = "" if base or not student or m.get("kd_loss") == "none" else (
        "\n\nNo labels-only baseline in this run (a student with `kd.loss: none`) to compare with.")
    when = (f" (best epoch {m['best_epoch']} of {m.get('epochs')}, selected by {m.get('select_by')})"
            if m.get("best_epoch") is not None else "")
    images = f"{m['num_images']} validation images" if m.get("num_images") else "the validation images"
    return f"## Metrics\n\nOn {images}{when}:\n\n" + "\n".join(rows) + note


def _data(data: dict, m: dict) -> str:
    if not data:
        return ""
    where = data.get("dataset") or data.get("root")
    parts = [f"source `{data.get('source')}`" + (f" ({where})" if where else "")]
    if data.get("subset"):
        parts.append(f"subset of {data['subset']} images per split")
    if m.get("train_images"):
        parts.append(f"{m['train_images']} training images")
    if data.get("unlabeled"):
        parts.append(f"unlabeled images: {data['unlabeled']}")
    return "## Data\n\n" + "; ".join(parts) + "."


def _usage(info: dict, pre: dict) -> str:
    source, here = info.get("source"), "path/to/this/folder"
    timm_code = f"""```python
import timm

model = timm.create_model("local-dir:{here}", pretrained=True).eval()  # "hf-hub:<repo id>" after distill push
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
```"""
    pipeline_code = f"""```python
from transformers import pipeline

classify = pipeline("image-classification", model="{here}")  # or "<repo id>" after distill push
classify("image.png")
```"""
    parts = ["## How to load", timm_code if source == "timm" else "",
             pipeline_code if source in LIBRARY else "",
             f"```bash\ndistill predict {here} images/ --out preds.csv\n```"]
    if source in LIBRARY:
        parts.append(f"timm and transformers resize with PIL, distill with OpenCV: at crop_pct 1.0 on images "
                     f"already {pre.get('input_size')} px the inputs are identical, otherwise the probabilities "
                     "can differ slightly.")
    if source in LIBRARY and info.get("eval_augment"):
        parts.append("distill evaluates this model with its own eval transform (model.json `eval_augment`), which "
                     "timm's and transformers' resize and centre crop do not reproduce.")
    return "\n\n".join(p for p in parts if p)


def _baseline(d: Path, run: Path | None) -> tuple[str | None, dict]:
    """(name, metrics) of the run's labels-only student, at the same stage (its FixRes for a FixRes model)."""
    fixres = d.name == "fixres"
    for other in _student_dirs(run) if run else ():
        if other.name == "fixres" or other.resolve() in (d.resolve(), d.parent.resolve()):
            continue
        m = _read(other / "metrics.json")
        if m.get("kd_loss") == "none":
            staged = _read(other / "fixres" / "metrics.json") if fixres else {}
            return (f"{other.name}/fixres", staged) if staged else (other.name, m)
    return None, {}


def _student_dirs(run: Path) -> list[Path]:
    students = sorted(p for p in (run / "students").glob("*") if p.is_dir())
    return students + [p / "fixres" for p in students if (p / "fixres").is_dir()]


def _run_dir(d: Path) -> Path | None:
    """The run directory a model folder is in: the nearest ancestor with the run's config.yaml and its
    teacher/ or students/ (a student folder keeps a copy of the recipe too)."""
    for parent in list(d.resolve().parents)[:RUN_LEVELS]:
        if (parent / "config.yaml").is_file() and ((parent / "teacher").is_dir() or (parent / "students").is_dir()):
            return parent
    return None


def _licence(recipe: dict, role: str) -> str | None:
    """A teacher's licence, from its card when it has one; other models' licences are not known here."""
    card = (recipe.get("teacher") or {}).get("card")
    if role != "teacher" or not card:
        return None
    from distill.errors import DistillError
    from distill.recipe.cards import load_card

    try:
        return load_card(card).get("licence")
    except (DistillError, OSError):  # a card renamed or removed since the run: the licence is then unknown
        return None


def _res(m: dict) -> str:
    size = m.get("resolution") or m.get("input_size")
    return f"{size} px" if size else "validation"


def _floats(values) -> str:
    return ", ".join(f"{v:g}" for v in values or ())


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a" if v is None else str(v)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_yaml(path: Path) -> dict:
    try:
        out = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return out if isinstance(out, dict) else {}
