"""Transforms: a model's input description (Preprocess) and the albumentations pipelines built from augment specs."""
from __future__ import annotations

import difflib
import inspect
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pydantic
import torch
from albumentations.pytorch import ToTensorV2

from distill.data.images import to_rgb
from distill.errors import DistillError


@dataclass(frozen=True)
class Preprocess:
    """How one model wants its pixels: the size it sees, its normalisation, its resize."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # nearest | bilinear | bicubic | area
    crop_pct: float = 0.875  # eval: resize to input_size / crop_pct, then center-crop input_size


INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR,
                  "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
# Written like a recipe's augment lists, placeholders and all, so defaults and user specs take one path.
DEFAULT_AUGMENT: dict[str, list[dict[str, Any]]] = {
    # scale (0.25, 1) instead of timm's ImageNet (0.08, 1): on 28 px images an 8% crop is ~8x8 pixels,
    # too little of the object to keep its label; distillation also rewards views the teacher can read.
    "train": [
        {"name": "RandomResizedCrop", "size": ["input_size", "input_size"], "scale": [0.25, 1.0]},
        {"name": "HorizontalFlip", "p": 0.5},
    ],
    "eval": [
        {"name": "SmallestMaxSize", "max_size": "resize_size"},
        {"name": "CenterCrop", "height": "input_size", "width": "input_size"},
    ],
}
_APPENDED = ("Normalize", "ToTensorV2")


class Transform:
    """An albumentations pipeline as a callable: H x W [x C] uint8 image → float32 tensor 3 x H x W."""

    def __init__(self, compose: A.Compose):
        self.compose = compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.compose(image=to_rgb(image))["image"]

    def set_seed(self, seed: int | Sequence[int]) -> None:
        """Draw every random decision of the pipeline from one generator seeded by `seed`.

        Not albumentations' `set_random_seed`: it gives every transform its own generator with the *same* seed,
        so their decisions are correlated (a flip with p=0.5 after a crop follows the crop's first draw; two
        flips always agree). One shared stream keeps them independent.
        """
        generator = np.random.default_rng(seed)
        py_random = random.Random(int(generator.integers(2**63)))
        stack = [self.compose]
        while stack:
            node = stack.pop()
            node.random_generator, node.py_random = generator, py_random
            stack.extend(getattr(node, "transforms", ()))

    def __repr__(self) -> str:
        return f"Transform({self.compose!r})"


def build_transform(
        specs: list[dict[str, Any]] | None,
        stage: str,
        pre: Preprocess,
        where: str | None = None,
        seed: int | None = None,
) -> Transform:
    """The pipeline for one model and stage ("train" | "eval"); `specs` None means the stage's default.

    Each spec is `{name: <albumentations class>, **params}`. A param value "input_size" or
    "resize_size" (also inside lists) becomes the model's size; a transform that resizes uses the
    model's interpolation unless the spec sets one (names like "bicubic" are accepted). Normalize
    with the model's mean/std and ToTensorV2 are always appended. `where` is the recipe key of
    `specs`, for error messages.
    """
    if stage not in DEFAULT_AUGMENT:
        raise ValueError(f"stage must be one of {list(DEFAULT_AUGMENT)}, got {stage!r}")
    where = where or f"augment.{stage}"
    sizes = {"input_size": pre.input_size, "resize_size": int(pre.input_size / pre.crop_pct)}
    transforms = [
        _build_one(spec, f"{where}.{i}", sizes, INTERPOLATIONS[pre.interpolation])
        for i, spec in enumerate(DEFAULT_AUGMENT[stage] if specs is None else specs)
    ]
    transforms += [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]
    transform = Transform(A.Compose(transforms))
    if seed is not None:
        transform.set_seed(seed)
    return transform


def _build_one(spec: Any, key: str, sizes: dict[str, int], interpolation: int) -> A.BasicTransform:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise DistillError(f"{key}: expected a mapping with 'name: <albumentations class>', got {spec!r}")
    name = spec["name"]
    if name in _APPENDED:
        raise DistillError(f"{key}.name: {name} is appended automatically with each model's own mean/std; "
                           "remove it")
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        known = [n for n, c in vars(A).items() if isinstance(c, type) and issubclass(c, A.BasicTransform)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see albumentations.ai/docs)"
        raise DistillError(f"{key}.name: no albumentations transform {name!r}{hint}")
    params = {k: _substitute(v, sizes) for k, v in spec.items() if k != "name"}
    for param in ("interpolation", "mask_interpolation"):
        if isinstance(params.get(param), str) and params[param] in INTERPOLATIONS:
            params[param] = INTERPOLATIONS[params[param]]
    if "interpolation" in inspect.signature(cls).parameters:
        params.setdefault("interpolation", interpolation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            transform = cls(**params)
        except (TypeError, ValueError) as e:
            raise DistillError(_param_error(e, key, name)) from None
    for w in caught:
        # albumentations only warns about unknown params; a typo must not silently do nothing
        if "are not valid for transform" in str(w.message):
            raise DistillError(f"{key}: {name}: {w.message}; check the parameter names")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return transform


def _substitute(value: Any, sizes: dict[str, int]) -> Any:
    if isinstance(value, str):
        return sizes.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_substitute(v, sizes) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, sizes) for k, v in value.items()}
    return value


def _param_error(e: Exception, key: str, name: str) -> str:
    # albumentations re-raises pydantic's multi-line report as a ValueError; keep its first error
    cause = e.__cause__ or e.__context__
    if isinstance(cause, pydantic.ValidationError):
        errors = cause.errors()
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{key}.{loc}: {name}: {first['msg']}{more}" if loc else f"{key}: {name}: {first['msg']}{more}"
    return f"{key}: {name}: {str(e).splitlines()[0]}"
