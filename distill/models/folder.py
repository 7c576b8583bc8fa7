"""Model folders: save_model / load_model (model.safetensors + model.json, sha256) and the eval transform a folder keeps.

model.json describes the folder enough to rebuild the model offline and evaluate it as it was evaluated:
the source's own description (`Source.describe`), the classes, `preprocess` (input size, crop fraction,
interpolation, mean/std), `eval_augment` (the albumentations eval list, or null for the default eval
transform), the weights' sha256 and parameter count, and the caller's `extra`.

The same folder is also what the ecosystem loads (`ECOSYSTEM`, per source): a timm model's folder has timm's
config.json beside weights under timm's own names, so `timm.create_model("local-dir:<dir>", pretrained=True)`
and transformers' TimmWrapper (`AutoModelForImageClassification`, `pipeline("image-classification")`) load
it; a transformers model's folder has its config.json and preprocessor_config.json and weights under the
transformers model's own names (no `hf.` of our wrapper), so `from_pretrained(<dir>)` loads it. README.md is
its model card (distill.models.card).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from distill.data import Preprocess
from distill.disk import writing
from distill.errors import DistillError
from distill.models.card import write_card
from distill.models.common import FORMAT_VERSION, INFO_FILE, MODEL_FILE, first_line
from distill.models.params import count_params
from distill.models.sources import SOURCES

_logger = logging.getLogger(__name__)


def save_model(model: nn.Module, pre: Preprocess, out_dir, classes: list[str], extra: dict | None = None,
               eval_augment: list | None = None) -> dict:
    """Write out_dir/model.safetensors + model.json, enough to rebuild the model offline, beside the config
    files timm / transformers load it with (`ECOSYSTEM`) and README.md (its model card, without metrics yet).

    Pass the unwrapped model (`accelerator.unwrap_model`). `eval_augment` is the albumentations eval list the
    model is evaluated with (a teacher's `teacher.augment.eval`); None: the default eval transform. Files are
    written under temporary names and renamed, model.json last, so a crash never leaves a directory that
    looks complete. Returns the model.json contents.
    """
    from safetensors.torch import save_file

    spec = getattr(model, "distill_spec", None)
    if spec is None:
        raise ValueError("save_model: the model was not built by distill.models.build_model / load_model")
    source = SOURCES[spec["source"]]
    num_classes = source.num_classes(model)
    if len(classes) != num_classes:
        raise ValueError(f"save_model: {len(classes)} class names for a {num_classes}-class model")
    info = {"format": FORMAT_VERSION, **spec, **source.describe(model, classes)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    files = {}  # the ecosystem's config files: name -> contents
    if spec["source"] in ECOSYSTEM:
        state, files = ECOSYSTEM[spec["source"]](model, state, pre, classes, info)
    tmp_weights, tmp_info = out / f".{MODEL_FILE}.tmp", out / f".{INFO_FILE}.tmp"
    # every file is written before the first rename (the renames need no space), so a disk that fills up
    # midway leaves the model saved before whole
    with writing(out / MODEL_FILE, tmp_weights, tmp_info, *(out / f".{name}.tmp" for name in files),
                 hint="any model saved there before is kept; free some space and run again"):
        save_file(state, str(tmp_weights), metadata={"format": "pt"})
        info.update(num_classes=num_classes, classes=list(classes), preprocess=dataclasses.asdict(pre),
                    eval_augment=eval_augment, sha256=sha256_file(tmp_weights), params=count_params(model),
                    extra=extra or {})
        for name, contents in files.items():
            (out / f".{name}.tmp").write_text(json.dumps(contents, indent=2, default=json_default))
        tmp_info.write_text(json.dumps(info, indent=2, default=json_default))
        write_card(out, info)  # what the model is; record.write_metrics adds how it scored
    os.replace(tmp_weights, out / MODEL_FILE)
    for name in files:
        os.replace(out / f".{name}.tmp", out / name)
    os.replace(tmp_info, out / INFO_FILE)
    return info


def _timm_folder(model: nn.Module, state: dict, pre: Preprocess, classes: list[str],
                 info: dict) -> tuple[dict, dict]:
    """timm's own config.json (timm's `save_config_for_hf`), with the folder's preprocessing as its
    pretrained_cfg and the classes as label_names; the state dict is timm's already."""
    import tempfile

    from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf writes

    data = {"input_size": (3, pre.input_size, pre.input_size), "mean": tuple(pre.mean), "std": tuple(pre.std),
            "interpolation": _TIMM_INTERPOLATION.get(pre.interpolation, pre.interpolation),
            "crop_pct": pre.crop_pct, "crop_mode": "center"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_config_for_hf(model, f"{tmp}/config.json", model_config={"label_names": list(classes)},
                               data_config=data)
        except (TypeError, ValueError, KeyError) as e:
            # e.g. a timm_kwargs value JSON cannot hold: the model is still saved for distill; only timm's
            # and transformers' loaders lose it, which must not end a training run
            _logger.warning("%s: no config.json for timm / transformers (%s)", info.get("model"), first_line(e))
            return state, {}
        config = json.loads(Path(f"{tmp}/config.json").read_text())
    # TimmWrapper passes num_classes itself (from the top-level num_classes) and fails on a second one;
    # timm's local-dir takes it from the same top-level entry
    config.get("model_args", {}).pop("num_classes", None)
    # these describe the checkpoint timm's default config names (ImageNet weights), not these weights
    for key in ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_filename"):
        config["pretrained_cfg"].pop(key, None)
    return state, {"config.json": config}


def _hf_folder(model: nn.Module, state: dict, pre: Preprocess, classes: list[str],
               info: dict) -> tuple[dict, dict]:
    """A transformers `save_pretrained` layout: config.json (with the classes as id2label), the transformers
    model's own tensor names, and a preprocessor_config.json that resizes and crops as distill evaluates."""
    state = {k.removeprefix(f"{HF_PREFIX}."): v for k, v in state.items()}
    config = {**info["hf_config"], "architectures": [info["hf_class"]]}
    resize = int(pre.input_size / pre.crop_pct)  # distill's eval: shorter side to this, centre crop input_size
    processor = {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
                 "do_resize": True, "size": {"shortest_edge": resize}, "resample": _PIL_RESAMPLE[pre.interpolation],
                 "do_center_crop": True, "crop_size": {"height": pre.input_size, "width": pre.input_size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(pre.mean), "image_std": list(pre.std)}
    return state, {"config.json": config, "preprocessor_config.json": processor}


# per model source: (model, state dict, preprocess, classes, model.json) -> (the state dict to save under the
# ecosystem's names, {config file name: contents}); a source without an entry keeps model.json only
ECOSYSTEM = {"timm": _timm_folder, "hf": _hf_folder}
HF_PREFIX = "hf"  # HFClassifier keeps the transformers model as `.hf`
_TIMM_INTERPOLATION = {"area": "box"}  # PIL's box filter is its area average
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "area": 4}


def load_model(model_dir) -> tuple[nn.Module, Preprocess, dict]:
    """Rebuild a model written by `save_model` (or an ensemble by `save_ensemble`), offline; returns
    (model, preprocess, model.json)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    info = read_info(d / INFO_FILE)
    if info["source"] == "ensemble":  # a folder of other folders, not a model source: no weights of its own
        from distill.models.ensemble import load_ensemble

        return load_ensemble(d, info)
    weights = d / MODEL_FILE
    if not weights.is_file():
        raise DistillError(f"{weights}: missing; {d} is incomplete, re-run the stage that wrote it")
    if sha256_file(weights) != info["sha256"]:
        raise DistillError(f"{weights}: sha256 does not match {INFO_FILE}; the file is damaged or was "
                           "replaced, re-run the stage that wrote it")
    try:
        model = _rebuild(info)
        state = _own_names(model, load_file(str(weights)))
        model.load_state_dict(state)
        pre = saved_preprocess(info)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DistillError(f"{d}: cannot rebuild the model from {INFO_FILE} ({first_line(e)})") from None
    return model, pre, info


def load_for_eval(model_dir) -> tuple[nn.Module, Preprocess, dict, object]:
    """(model in eval mode, preprocess, model.json, eval transform) of a saved model or ensemble, from its folder
    alone: the transform it was evaluated with, which takes an H x W x 3 uint8 image to a normalised tensor."""
    from distill.data import build_transform

    model, pre, info = load_model(model_dir)
    augment, where = eval_augment(model_dir, info)
    return model.eval(), pre, info, build_transform(augment, "eval", pre, where=where)


def eval_augment(model_dir, info: dict) -> tuple[list | None, str | None]:
    """(the eval augment list of a saved model, None for the default; the key to name in its errors).

    A folder written before model.json kept `eval_augment` is evaluated as it was then: a teacher (its run's
    teacher/, or a member or checkpoint folder inside it) with its recipe's `teacher.augment.eval`, found in
    the run's config.yaml; any other model with the default.
    """
    if "eval_augment" in info:
        return info["eval_augment"], f"{Path(model_dir) / INFO_FILE}: eval_augment"
    d = Path(model_dir).resolve()
    for folder in (d, d.parent):
        if folder.name == "teacher" and (folder.parent / "config.yaml").is_file():
            from distill.recipe import load_recipe

            return load_recipe(folder.parent / "config.yaml").teacher.augment.eval, None
    return None, None


def _rebuild(info: dict) -> nn.Module:
    if info["source"] not in SOURCES:
        raise ValueError(f"unknown source {info['source']!r}")
    model = SOURCES[info["source"]].rebuild(info)
    if "model" in info:
        model.distill_spec["model"] = info["model"]
    return model


def _own_names(model: nn.Module, state: dict) -> dict:
    """The saved tensors under the model's names: a transformers folder keeps the transformers model's names,
    without our wrapper's `hf.` (folders from before keep it)."""
    own = model.state_dict().keys()
    prefixed = {f"{HF_PREFIX}.{k}": v for k, v in state.items()}
    return prefixed if state.keys() != own and prefixed.keys() == own else state


def saved_preprocess(info: dict) -> Preprocess:
    return Preprocess(**{**info["preprocess"], "mean": tuple(info["preprocess"]["mean"]),
                         "std": tuple(info["preprocess"]["std"])})


def member_info(model_dir: Path, classes: list[str], key: str) -> dict:
    """The model.json of a would-be ensemble member, refused (naming `key`) unless it knows exactly `classes`."""
    info = read_model_info(model_dir, key)
    if info["classes"] != list(classes):
        raise DistillError(f"{key}: {model_dir} was trained on classes {info['classes'][:5]}…, this data has "
                           f"{list(classes)[:5]}…; ensemble models of the same classes")
    return info


def read_model_info(model_dir: Path, key: str | None = None) -> dict:
    """A model directory's model.json, checked; `key` (the recipe key that names the directory) leads the
    error message."""
    try:
        return read_info(Path(model_dir) / INFO_FILE)
    except DistillError as e:
        raise DistillError(f"{key}: {e}" if key else str(e)) from None


def read_info(path: Path) -> dict:
    if not path.is_file():
        raise DistillError(f"{path.parent}: not a distill model directory (no {INFO_FILE}); "
                           "give a directory written by distill, or re-run the stage that writes it")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{path}: unreadable ({first_line(e)}); re-run the stage that wrote it") from None
    if not isinstance(info, dict) or "source" not in info or "sha256" not in info:
        raise DistillError(f"{path}: not a distill model.json; re-run the stage that wrote it")
    return info


def json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"model.json: cannot store {type(obj).__name__}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
