"""Views of a sample: draw a view's crop box, flip and augmentation seed, render its pixels for any model, the teacher's
view dataset."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data import INTERPOLATIONS, Preprocess
from distill.data.decode import box_pixels, need_for
from distill.store.augment import NO_AUGMENT, augment, check_augment, view_seed
from distill.store.mixing import NO_PARTNER, UNMIXED, draw_mix, mix_views, store_mixes

if TYPE_CHECKING:
    from distill.store.samples import Samples

PARAM_COLUMNS = ("y0", "x0", "y1", "x1", "flip")


def draw_view(spec, seed: int, sample: int, view: int, height: int, width: int) -> np.ndarray:
    """One random view's parameters (PARAM_COLUMNS): torchvision's RandomResizedCrop box, then a flip.

    The generator is seeded by (seed, sample, view) alone, so the draw does not depend on batching,
    workers or processes, and an interrupted export redraws exactly the same views.
    """
    rng = np.random.default_rng([seed, sample, view])
    area = height * width
    log_ratio = np.log(spec.ratio)
    for _ in range(10):
        target = area * rng.uniform(*spec.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            break
    else:  # torchvision's fallback: the whole image, clamped to the ratio range
        h, w, y, x = _center_box(height, width, 1.0, spec.ratio)
    flip = float(rng.random() < spec.hflip)
    return np.array([y / height, x / width, (y + h) / height, (x + w) / width, flip], dtype=np.float32)


def center_view(spec, height: int, width: int) -> np.ndarray:
    """The deterministic test view: `center_crop_pct` of the shorter side, centred, no flip."""
    h, w, y, x = _center_box(height, width, spec.center_crop_pct, None)
    return np.array([y / height, x / width, (y + h) / height, (x + w) / width, 0.0], dtype=np.float32)


def _center_box(height, width, pct, ratio):
    if ratio is not None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            h, w = height, width
    else:
        h = w = max(1, round(min(height, width) * pct))
    return h, w, (height - h) // 2, (width - w) // 2


def view_params(spec, seed: int, sample: int, height: int, width: int) -> np.ndarray:
    """All rows of one sample: `spec.views` random views, then the center view. [views + 1, 5]"""
    rows = [draw_view(spec, seed, sample, v, height, width) for v in range(spec.views)]
    return np.stack(rows + [center_view(spec, height, width)])


def view_seeds(spec, seed: int, sample: int) -> np.ndarray:
    """Each row's augmentation seed (`targets.augment`): drawn from (seed, sample, view) for the random views,
    NO_AUGMENT for the center view and for every view when there is no augmentation. int64 [views + 1]"""
    replayed = bool(getattr(spec, "augment", None))
    return np.array([view_seed(seed, sample, v) if replayed else NO_AUGMENT for v in range(spec.views)]
                    + [NO_AUGMENT], dtype=np.int64)


def render(image: np.ndarray, params: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """The view's pixels for a model of input `size`: crop the box, resize, flip. uint8 [size, size, 3]."""
    height, width = image.shape[:2]
    y0, y1 = box_pixels(params[0], params[2], height)
    x0, x1 = box_pixels(params[1], params[3], width)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    out = cv2.resize(crop, (size, size), interpolation=INTERPOLATIONS[interpolation])
    return out[:, ::-1] if params[4] >= 0.5 else out


def to_tensor(images: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W] normalised with the model's own mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div_(255.0)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class TeacherViews(Dataset):
    """Sample i → its views as the teacher sees them [V + 1, 3, S, S], their parameters, their augmentation
    seeds, its label, and with `targets.mix` each view's partner (sample, view) [V + 1, 2] and mixing
    [V + 1, 5] (store/mixing.py; the views are then the mixed images)."""

    def __init__(self, samples: Samples, spec, seed: int, pre: Preprocess, first: int, last: int):
        self.samples, self.spec, self.seed, self.pre = samples, spec, seed, pre
        self.first, self.last = first, last
        self.augment = check_augment(getattr(spec, "augment", None))
        self.mix = getattr(spec, "mix", None)

    def __len__(self) -> int:
        return self.last - self.first

    def view(self, i: int, v: int | None = None):
        """Sample i's views (all, or view v) as the teacher sees them, unmixed: float32 [n, 3, S, S], params, seeds.

        The boxes are drawn on the image's full size (its header), so they are the same however it is decoded;
        the decode then needs only what all V + 1 views need at the teacher's size (data.decode_scaled), the same
        whether the sample is rendered as itself or as a partner."""
        if self.samples.scalable(i):
            height, width = self.samples.size(i)
            params = view_params(self.spec, self.seed, i, height, width)
            image = self.samples.load(i, need_for(params, self.pre.input_size, height, width))
        else:  # an in-memory image, or one whose size costs a decode (hf): load it whole
            image = self.samples.load(i)
            params = view_params(self.spec, self.seed, i, *image.shape[:2])
        seeds = view_seeds(self.spec, self.seed, i)
        if v is not None:
            params, seeds = params[v:v + 1], seeds[v:v + 1]
        pixels = np.stack([augment(render(image, p, self.pre.input_size, self.pre.interpolation), self.augment, s)
                           for p, s in zip(params, seeds)])
        return to_tensor(pixels, self.pre), params, seeds

    def __getitem__(self, j: int):
        i = self.first + j
        x, params, seeds = self.view(i)
        label = int(self.samples.labels[i])
        partners = np.full((len(x), 2), NO_PARTNER, np.int64)
        mixes = np.tile(UNMIXED, (len(x), 1))
        if store_mixes(self.spec):
            for v in range(self.spec.views):  # the center view (last) is never mixed
                partners[v], mixes[v] = draw_mix(self.mix, self.seed, i, v, self.samples.num_labeled,
                                                 len(self.samples), self.spec.views)
                if partners[v, 0] != NO_PARTNER:
                    other = self.view(int(partners[v, 0]), int(partners[v, 1]))[0][0]
                    x[v] = mix_views(x[v], other, mixes[v])[0]
        return (x, torch.from_numpy(params), torch.from_numpy(seeds), label, torch.from_numpy(partners),
                torch.from_numpy(mixes))
