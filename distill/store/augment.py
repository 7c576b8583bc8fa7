"""Replayable augmentation (`targets.augment`): parameters drawn per view from its seed, applied at any resolution.

Albumentations draws many of its parameters in pixels of the image it is given (blur kernels, hole sizes,
translations), so the teacher at 224 px and a student at 64 px would see different views. Here each transform's
parameters are drawn from a generator seeded by the view's own seed, in units that do not depend on the size
(degrees, factors, fractions of the side), and then applied deterministically to the rendered view, whatever its
size. Specs are written like `teacher.augment.train` entries: `{name: Rotate, limit: 30, p: 0.5}`.

REPLAYABLE maps a name to (draw, apply): draw(rng, spec) → the parameters, apply(image, params) → the image
(uint8 H x W x 3 RGB). Adding a transform is a pair of functions, its parameters' defaults in PARAMS and an
entry in each dict.
"""
from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from distill.errors import DistillError

NO_AUGMENT = -1  # the seed of a view without augmentation (the center view, or a store without targets.augment)
_STREAM = 0x5EED  # a stream of its own beside the crop box's: (seed, sample, view) draws the box unchanged


def view_seed(seed: int, sample: int, view: int) -> int:
    """The augmentation seed of a random view, drawn from (seed, sample, view) alone, like its crop box."""
    return int(np.random.default_rng([seed, sample, view, _STREAM]).integers(2**62))


# --- parameter helpers: a bad value raises _Bad(key, why) -------------------------------------------------------
class _Bad(ValueError):
    def __init__(self, key: str, why: str):
        super().__init__(why)
        self.key = key


def _number(spec, key, lo=-math.inf, hi=math.inf) -> float:
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _Bad(key, f"expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _range(spec, key, scalar, lo=-math.inf, hi=math.inf) -> tuple[float, float]:
    """[a, b], or a number turned into a range by `scalar` (x → (-x, x), (1 - x, 1 + x) or (x, x))."""
    v = spec[key]
    if isinstance(v, (list, tuple)) and len(v) == 2:
        a, b = (_number({key: x}, key) for x in v)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        a, b = scalar(float(v))
    else:
        raise _Bad(key, f"expected a number or [low, high], got {v!r}")
    if not lo <= a <= b <= hi:
        raise _Bad(key, f"expected low <= high within [{lo}, {hi}], got {v!r}")
    return a, b


def _sym(x):
    return (-abs(x), abs(x))


def _fixed(x):
    return (x, x)


def _fill(spec, key="fill") -> tuple[float, float, float]:
    v = spec[key]
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(values) not in (1, 3) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 255
                                        for x in values):
        raise _Bad(key, f"expected a value in [0, 255] or 3 of them (RGB), got {v!r}")
    return tuple(float(x) for x in values * (3 if len(values) == 1 else 1))


def _fraction_range(spec, key) -> tuple[float, float]:
    v = spec[key]
    if isinstance(v, (list, tuple)) and any(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
        raise _Bad(key, f"{v!r} is in pixels; give fractions of the side in (0, 1], e.g. [0.1, 0.2]")
    return _range(spec, key, _fixed, 1e-6, 1.0)


# --- the transforms ---------------------------------------------------------------------------------------------
def _draw_affine(rng, spec):
    angle = rng.uniform(*_range(spec, "rotate", _fixed))
    scale = rng.uniform(*_range(spec, "scale", _fixed, 1e-3))
    tx = rng.uniform(*_range(spec, "translate_percent", _fixed, -1, 1))
    ty = rng.uniform(*_range(spec, "translate_percent", _fixed, -1, 1))
    return {"angle": angle, "scale": scale, "tx": tx, "ty": ty, "fill": _fill(spec)}


def _draw_rotate(rng, spec):
    return {"angle": rng.uniform(*_range(spec, "limit", _sym)), "scale": 1.0, "tx": 0.0, "ty": 0.0,
            "fill": _fill(spec)}


def _apply_affine(image, q):
    h, w = image.shape[:2]
    # about the image's centre in continuous coordinates, translation in fractions of the side: the same
    # geometric map at every size
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), q["angle"], q["scale"])
    m[:, 2] += (q["tx"] * w, q["ty"] * h)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=q["fill"])


def _factor(x):  # torchvision's reading of a number: a factor in [1 - x, 1 + x]
    return (max(0.0, 1 - x), 1 + x)


def _draw_color_jitter(rng, spec):
    factor = _factor
    return {"order": [int(i) for i in rng.permutation(4)],
            "brightness": rng.uniform(*_range(spec, "brightness", factor, 0)),
            "contrast": rng.uniform(*_range(spec, "contrast", factor, 0)),
            "saturation": rng.uniform(*_range(spec, "saturation", factor, 0)),
            "hue": rng.uniform(*_range(spec, "hue", _sym, -0.5, 0.5))}


def _gray(x):  # ITU-R 601 luma, as torchvision and cv2
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def _apply_color_jitter(image, q):
    x = image.astype(np.float32)
    for i in q["order"]:
        if i == 0:
            x = x * q["brightness"]
        elif i == 1:
            x = x * q["contrast"] + float(_gray(x).mean()) * (1 - q["contrast"])
        elif i == 2:
            x = x * q["saturation"] + _gray(x) * (1 - q["saturation"])
        elif q["hue"] != 0:
            hsv = cv2.cvtColor(np.ascontiguousarray(x / 255.0, dtype=np.float32), cv2.COLOR_RGB2HSV)
            hsv[..., 0] = np.mod(hsv[..., 0] + q["hue"] * 360.0, 360.0)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
        x = np.clip(x, 0, 255)
    return _to_uint8(x)


def _draw_brightness_contrast(rng, spec):
    if not isinstance(spec["brightness_by_max"], bool):
        raise _Bad("brightness_by_max", f"expected true or false, got {spec['brightness_by_max']!r}")
    return {"alpha": 1 + rng.uniform(*_range(spec, "contrast_limit", _sym)),
            "beta": rng.uniform(*_range(spec, "brightness_limit", _sym)), "by_max": spec["brightness_by_max"]}


def _apply_brightness_contrast(image, q):
    x = image.astype(np.float32)
    return _to_uint8(x * q["alpha"] + q["beta"] * (255.0 if q["by_max"] else float(x.mean())))


def _draw_hsv(rng, spec):
    return {"hue": rng.uniform(*_range(spec, "hue_shift_limit", _sym, -180, 180)),
            "sat": rng.uniform(*_range(spec, "sat_shift_limit", _sym, -255, 255)),
            "val": rng.uniform(*_range(spec, "val_shift_limit", _sym, -255, 255))}


def _apply_hsv(image, q):
    # OpenCV's uint8 HSV (hue 0..179 in 2-degree steps, saturation and value 0..255), as albumentations shifts it
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(np.rint(hsv[..., 0] + q["hue"]), 180)
    hsv[..., 1:] = hsv[..., 1:] + (q["sat"], q["val"])
    return cv2.cvtColor(_to_uint8(hsv), cv2.COLOR_HSV2RGB)


def _apply_gray(image, q):
    return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def _draw_blur(rng, spec):
    return {"sigma_frac": rng.uniform(*_range(spec, "sigma_frac", _fixed, 0, 0.5))}


def _apply_blur(image, q):
    sigma = q["sigma_frac"] * min(image.shape[:2])  # a fraction of the side: the same blur at every size
    if sigma < 1e-3:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _draw_coarse_dropout(rng, spec):
    n = spec["num_holes_range"]
    if not (isinstance(n, (list, tuple)) and len(n) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in n) and 0 <= n[0] <= n[1]):
        raise _Bad("num_holes_range", f"expected [low, high] hole counts, got {n!r}")
    hh, ww = _fraction_range(spec, "hole_height_range"), _fraction_range(spec, "hole_width_range")
    holes = []
    for _ in range(int(rng.integers(n[0], n[1] + 1))):
        h, w = rng.uniform(*hh), rng.uniform(*ww)
        holes.append((rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w))
    return {"holes": holes, "fill": _fill(spec)}


def _draw_erasing(rng, spec):
    scale = _range(spec, "scale", _fixed, 1e-6, 1.0)
    log_ratio = np.log(_range(spec, "ratio", _fixed, 1e-3))
    holes = []
    for _ in range(10):  # torchvision's RandomErasing: area and log-uniform aspect, up to 10 tries
        area, ratio = rng.uniform(*scale), math.exp(rng.uniform(*log_ratio))
        h, w = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if h < 1 and w < 1:
            holes.append((rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w))
            break
    return {"holes": holes, "fill": _fill(spec)}


def _apply_holes(image, q):
    out, (height, width) = image.copy(), image.shape[:2]
    for y, x, h, w in q["holes"]:
        y0, x0 = round(y * height), round(x * width)
        out[y0:max(round((y + h) * height), y0 + 1), x0:max(round((x + w) * width), x0 + 1)] = q["fill"]
    return out


def _to_uint8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# name → (draw, apply); PARAMS: each one's parameters and defaults (albumentations' own where it has them)
REPLAYABLE = {
    "Rotate": (_draw_rotate, _apply_affine),
    "Affine": (_draw_affine, _apply_affine),
    "ColorJitter": (_draw_color_jitter, _apply_color_jitter),
    "RandomBrightnessContrast": (_draw_brightness_contrast, _apply_brightness_contrast),
    "HueSaturationValue": (_draw_hsv, _apply_hsv),
    "ToGray": (lambda rng, spec: {}, _apply_gray),
    "GaussianBlur": (_draw_blur, _apply_blur),
    "CoarseDropout": (_draw_coarse_dropout, _apply_holes),
    "Erasing": (_draw_erasing, _apply_holes),
}
PARAMS: dict[str, dict[str, Any]] = {
    "Rotate": {"limit": [-90, 90], "fill": 0},
    "Affine": {"rotate": 0.0, "scale": 1.0, "translate_percent": 0.0, "fill": 0},
    "ColorJitter": {"brightness": [0.8, 1.2], "contrast": [0.8, 1.2], "saturation": [0.8, 1.2], "hue": [-0.5, 0.5]},
    "RandomBrightnessContrast": {"brightness_limit": [-0.2, 0.2], "contrast_limit": [-0.2, 0.2],
                                 "brightness_by_max": True},
    "HueSaturationValue": {"hue_shift_limit": [-20, 20], "sat_shift_limit": [-30, 30], "val_shift_limit": [-20, 20]},
    "ToGray": {},
    "GaussianBlur": {"sigma_frac": [0.005, 0.02]},
    "CoarseDropout": {"num_holes_range": [1, 2], "hole_height_range": [0.1, 0.2], "hole_width_range": [0.1, 0.2],
                      "fill": 0},
    "Erasing": {"scale": [0.02, 0.33], "ratio": [0.3, 3.3], "fill": 0},
}
# parameters albumentations takes in pixels: what to write instead
_PIXELS = {"translate_px": "translate_percent (a fraction of the side)",
           "blur_limit": "sigma_frac (sigma as a fraction of the side)",
           "sigma_limit": "sigma_frac (sigma as a fraction of the side)"}


def check_augment(specs, where: str = "targets.augment") -> list[dict[str, Any]]:
    """Validate `targets.augment` and return each spec with its defaults filled in; a DistillError names
    `<where>.<i>` and the supported transforms for anything that cannot be replayed at every resolution."""
    supported = f"replayable transforms: {', '.join(REPLAYABLE)}"
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise DistillError(f"{where}: expected a list of {{name: <transform>, ...}}, got {specs!r}; {supported}")
    out = []
    for i, spec in enumerate(specs):
        key = f"{where}.{i}"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise DistillError(f"{key}: expected a mapping with 'name: <transform>', got {spec!r}; {supported}")
        name = spec["name"]
        if name not in REPLAYABLE:
            raise DistillError(f"{key}.name: {name!r} cannot be replayed exactly at every resolution; {supported}")
        for param in spec:
            if param in _PIXELS:
                raise DistillError(f"{key}.{param}: {name}: sizes in pixels cannot be replayed at another "
                                   f"resolution; use {_PIXELS[param]}; {supported}")
            if param not in PARAMS[name] and param not in ("name", "p"):
                known = ", ".join(["p", *PARAMS[name]])
                raise DistillError(f"{key}.{param}: {name}: not a replayable parameter (it takes {known}); "
                                   f"{supported}")
        full = {"name": name, "p": 0.5, **PARAMS[name], **spec}
        try:
            _number(full, "p", 0, 1)
            REPLAYABLE[name][0](np.random.default_rng(0), full)
        except _Bad as e:
            raise DistillError(f"{key}.{e.key}: {name}: {e}; {supported}") from None
        out.append(full)
    return out


def draw(specs: list[dict[str, Any]], seed: int) -> list[tuple[str, dict[str, Any]] | None]:
    """Each transform's parameters for the view with this seed, or None where its `p` skips it. The same seed
    gives the same list in any process; nothing depends on an image."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        # the coin and the parameters are always drawn: a transform's p does not shift the ones after it
        coin, params = rng.random(), REPLAYABLE[spec["name"]][0](rng, spec)
        out.append((spec["name"], params) if coin < spec["p"] else None)
    return out


def augment(image: np.ndarray, specs: list[dict[str, Any]], seed: int) -> np.ndarray:
    """The rendered view (uint8 H x W x 3 RGB) with the view's augmentation; unchanged for NO_AUGMENT."""
    if not specs or seed < 0:
        return image
    for step in draw(specs, seed):
        if step is not None:
            name, params = step
            image = np.ascontiguousarray(REPLAYABLE[name][1](image, params))
    return image
