"""Model folders: save_model / load_model (model.safetensors + model.json, sha256) and the eval transform a folder keeps.

model.json describes the folder enough to rebuild the model offline and evaluate it as it was evaluated:
the source's own description (`Source.describe`), the classes, `preprocess` (input size, crop fraction,
interpolation, mean/std), `eval_augment` (the albumentations eval list, or null for the default eval
transform), the weights' sha256 and parameter count, and the caller's `extra`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from distill.data import Preprocess
from distill.errors import DistillError
from distill.models.common import FORMAT_VERSION, INFO_FILE, MODEL_FILE, first_line
from distill.models.params import count_params
from distill.models.sources import SOURCES


def save_model(model: nn.Module, pre: Preprocess, out_dir, classes: list[str], extra: dict | None = None,
               eval_augment: list | None = None) -> dict:
    """Write out_dir/model.safetensors + model.json, enough to rebuild the model offline.

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
    tmp_weights, tmp_info = out / f".{MODEL_FILE}.tmp", out / f".{INFO_FILE}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    info.update(num_classes=num_classes, classes=list(classes), preprocess=dataclasses.asdict(pre),
                eval_augment=eval_augment, sha256=sha256_file(tmp_weights), params=count_params(model),
                extra=extra or {})
    tmp_info.write_text(json.dumps(info, indent=2, default=json_default))
    os.replace(tmp_weights, out / MODEL_FILE)
    os.replace(tmp_info, out / INFO_FILE)
    return info


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
        state = load_file(str(weights))
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
