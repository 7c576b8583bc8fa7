"""Decode only what is needed: the smallest size a JPEG may be decoded at for the crops a caller will take of it.

libjpeg(-turbo) can decode a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT domain, which costs about that
fraction of a full decode and acts as an anti-aliasing box filter. A caller says what it needs as `need` =
(width, height), the smallest decoded size its crops still read at full resolution; PIL's `Image.draft` then picks
the largest reduction that keeps the image at least that size. Other formats decode at full size.

The crops are given as fractions of the image's (height, width) (store/views.py's PARAM_COLUMNS, a transform's
resize), so the same crop of a smaller decode shows the same part of the picture.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import albumentations as A
import numpy as np
from PIL import Image

# PIL's names of the formats libjpeg decodes (MPO: a camera's JPEG with a second, preview image)
JPEG_FORMATS = ("JPEG", "MPO")
Need = tuple[int, int]  # (width, height), as PIL sizes are


def draft(img: Image.Image, need: Need | None) -> int:
    """Ask libjpeg to decode `img` (opened, not yet loaded) at the largest of 1/2, 1/4, 1/8 that keeps it at
    least `need` (width, height); the reduction chosen (1: full size, also for every format but JPEG)."""
    if need is None or img.format not in JPEG_FORMATS:
        return 1
    width = img.size[0]
    img.draft("RGB", (max(1, int(need[0])), max(1, int(need[1]))))  # mode "RGB": no colour change, only the scale
    return max(1, round(width / img.size[0]))


def box_pixels(lo: float, hi: float, n: int) -> tuple[int, int]:
    """A box side's fractions [lo, hi) as pixel rows (or columns) of an image n pixels along that side, at least
    one. Boxes are stored as i / n in float32; rounding back gives the very same pixel rows."""
    a, b = round(float(lo) * n), round(float(hi) * n)
    return a, max(b, a + 1)


def need_for(params_rows: Iterable[np.ndarray], size: int | Iterable[int], height: int | None = None,
             width: int | None = None) -> Need:
    """(width, height) a decode must have so that every crop box in `params_rows` (PARAM_COLUMNS y0, x0, y1, x1,
    flip, as fractions) is still at least `size` pixels on each side: ceil(size / the box's side fraction). With
    several models (online distillation: student and teacher) `size` is their sizes and the largest counts. With
    the image's full `height` and `width` the need is capped at them (a crop that upsamples needs the full image)."""
    size = size if isinstance(size, (int, np.integer)) else max(size)
    rows = np.atleast_2d(np.asarray(list(params_rows) if not isinstance(params_rows, np.ndarray) else params_rows,
                                    dtype=np.float64))
    # the smallest box side of all rows; a degenerate box (zero side) needs the full image
    frac_h = max(float((rows[:, 2] - rows[:, 0]).min()), 1e-6)
    frac_w = max(float((rows[:, 3] - rows[:, 1]).min()), 1e-6)
    need_w, need_h = math.ceil(size / frac_w - 1e-6), math.ceil(size / frac_h - 1e-6)
    if width is not None:
        need_w = min(need_w, width)
    if height is not None:
        need_h = min(need_h, height)
    return need_w, need_h


def rrc_fractions(scale: tuple[float, float], ratio: tuple[float, float], height: int,
                  width: int) -> tuple[float, float]:
    """The smallest (height, width) fractions of a box torchvision's / albumentations' RandomResizedCrop can draw
    on an image of this size: area fraction s in `scale`, aspect a in `ratio`, so width fraction sqrt(s·a·H/W) and
    height fraction sqrt(s·H·W/a)/H, smallest at s = scale[0] and the ratio's ends; the fallback box (the whole
    image clamped to the ratio range) is larger or counted too."""
    s, (r0, r1) = scale[0], ratio
    frac_w = min(1.0, math.sqrt(s * r0 * height / width))
    frac_h = min(1.0, math.sqrt(s * width / (height * r1)))
    in_ratio = width / height
    if in_ratio < r0:  # fallback: full width, height width / r0
        frac_h = min(frac_h, width / r0 / height)
    elif in_ratio > r1:  # fallback: full height, width height · r1
        frac_w = min(frac_w, height * r1 / width)
    return frac_h, frac_w


def transform_need(transform) -> Need | Callable[[int, int], Need] | None:
    """What a `data.transforms.Transform` needs of the image, read off its first transform: a resize of the
    shorter side to r (SmallestMaxSize, the default eval) needs (r, r); a resize to (h, w) needs (w, h); a
    RandomResizedCrop of scale (s0, s1) needs, per image size, its smallest possible box at the crop's size (a
    function of (height, width)). None (full size) for anything else: a transform before the resize sees the
    image's pixels (a pixel-sized crop, a rotation's border), so it must see them all."""
    compose = getattr(transform, "compose", transform)
    first = next(iter(getattr(compose, "transforms", ())), None)
    if isinstance(first, A.SmallestMaxSize) and isinstance(first.max_size, (int, np.integer)):
        return int(first.max_size), int(first.max_size)
    if isinstance(first, A.Resize):
        return int(first.width), int(first.height)
    if isinstance(first, A.RandomResizedCrop):  # a partial, not a closure: the dataset pickles for loader workers
        return partial(_rrc_need, tuple(first.size), tuple(first.scale), tuple(first.ratio))
    return None


def _rrc_need(size: tuple[int, int], scale, ratio, height: int, width: int) -> Need:
    frac_h, frac_w = rrc_fractions(scale, ratio, height, width)
    return min(width, math.ceil(size[1] / frac_w)), min(height, math.ceil(size[0] / frac_h))
