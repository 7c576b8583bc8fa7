"""Build the teacher or student a recipe section names: its source's model, local weights, the recipe's preprocessing.

Every model built here takes normalised float pixels (B, 3, H, W) and returns plain logits (B, K).

`pretrained`:
- `true`: the library's own download (hub cache; offline only if already cached); the
  classifier head is replaced for the recipe's classes.
- `false`: random init.
- a path: a `.safetensors` / `.pth` / `.pt` / `.bin` file or a directory written by
  `save_model`; `pkg:<module>` names weights shipped inside an installed Python package
  (see distill.models.weights).
"""
from __future__ import annotations

import dataclasses

from torch import nn

from distill.data import Preprocess
from distill.models.sources import SOURCES, source_named
from distill.models.weights import load_local


def build_model(cfg, num_classes: int, where: str = "teacher",
                classes: list[str] | None = None) -> tuple[nn.Module, Preprocess]:
    """Build the model a TeacherConfig / StudentConfig names, for `num_classes` classes.

    `where` is the recipe path of `cfg` ("teacher", "students.0") so errors name the key.
    Returns the model (train mode, nothing frozen) and how it wants its pixels: the model's
    own preprocessing, overridden by any of the recipe's input_size/mean/std/interpolation/crop_pct.
    """
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    source, ident = source_named(cfg.model, where)
    model, pre = source.build(ident, cfg, num_classes, where, classes)
    if isinstance(cfg.pretrained, str):
        load_local(model, cfg.pretrained, num_classes, where, classes)
    model.distill_spec["model"] = cfg.model
    return model, _override(pre, cfg)


def check_model_name(spec: str, where: str) -> None:
    """Fail fast on a spec its source already knows is wrong, e.g. a `timm:` name timm does not know
    (`distill run` checks every model before training). A spec of no known source passes: build_model says."""
    prefix, _, ident = spec.partition(":")
    if prefix in SOURCES:
        SOURCES[prefix].check(ident, where)


def _override(pre: Preprocess, cfg) -> Preprocess:
    """The recipe's preprocessing fields win over what the model says about itself."""
    changes = {}
    if getattr(cfg, "resolution", None) is not None:  # a student's training resolution
        changes["input_size"] = cfg.resolution
    for name in ("input_size", "interpolation", "crop_pct"):
        if getattr(cfg, name, None) is not None:
            changes[name] = getattr(cfg, name)
    for name in ("mean", "std"):
        if getattr(cfg, name, None) is not None:
            changes[name] = tuple(float(v) for v in getattr(cfg, name))
    return dataclasses.replace(pre, **changes)
