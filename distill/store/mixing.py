"""Exact MixUp / CutMix in the store (`targets.mix`): each random view's partner view, λ and CutMix box, drawn from
(seed, sample, view), and the mixing of two rendered views at any model's size.

The teacher labels the mixed image at export, so a student replaying the row gets the teacher's output on its own
mixed input instead of λ·p(own) + (1 − λ)·p(partner), which is only an approximation (`kd.batch_target` measures
it). A row's mixing is stored as two columns (store/__init__.py): `partner` (sample, view; -1 for an unmixed row)
and `mix` (λ, then the CutMix box y0, x0, y1, x1 in normalised coordinates, all 0 for MixUp).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from distill.mix import mix_enabled

MIX_COLUMNS = ("lam", "y0", "x0", "y1", "x1")
NO_PARTNER = -1
UNMIXED = np.array([1.0, 0.0, 0.0, 0.0, 0.0], np.float32)
_STREAM = 0x6D6978  # "mix": a generator of its own, apart from the crop box's and the augmentation's


def draw_mix(cfg, seed: int, sample: int, view: int, num_labeled: int, num_samples: int, views: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """One random view's mixing: (partner (sample, view) int64 [2], MIX_COLUMNS float32 [5]).

    Drawn from (seed, sample, view) alone, like the crop box, so teacher and students agree without talking.
    A labeled sample is mixed with a labeled one (so a labels-only student keeps a label term on every row), an
    unlabeled one with any. CutMix follows timm's `rand_bbox` in normalised coordinates and λ is corrected to the
    area actually kept; each model recomputes it at its own size (`mix_views`), where the box is rounded to pixels.
    """
    rng = np.random.default_rng([seed, sample, view, _STREAM])
    if not mix_enabled(cfg) or rng.random() >= cfg.prob:
        return np.full(2, NO_PARTNER, np.int64), UNMIXED.copy()
    pool = num_labeled if sample < num_labeled else num_samples
    partner = np.array([rng.integers(pool), rng.integers(views)], np.int64)
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob)
    if not use_cutmix:
        return partner, np.array([rng.beta(cfg.mixup_alpha, cfg.mixup_alpha), 0, 0, 0, 0], np.float32)
    cut = math.sqrt(1.0 - rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
    cy, cx = rng.uniform(size=2)
    y0, y1 = np.clip([cy - cut / 2, cy + cut / 2], 0.0, 1.0)
    x0, x1 = np.clip([cx - cut / 2, cx + cut / 2], 0.0, 1.0)
    return partner, np.array([1.0 - (y1 - y0) * (x1 - x0), y0, x0, y1, x1], np.float32)


def is_cutmix(mix: np.ndarray) -> bool:
    return bool(mix[3] > mix[1] and mix[4] > mix[2])


def box_pixels(mix: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """The CutMix box at a model's size: (y0, y1, x0, x1) in pixels, the same rounding for every model."""
    return (round(float(mix[1]) * height), round(float(mix[3]) * height),
            round(float(mix[2]) * width), round(float(mix[4]) * width))


def mix_views(own: torch.Tensor, partner: torch.Tensor, mix: np.ndarray) -> tuple[torch.Tensor, float]:
    """(the mixed view, λ at this size) of two normalised views [3, H, W] of one model.

    MixUp: λ·own + (1 − λ)·partner; the normalisation is affine, so mixing normalised views equals normalising
    the mixed pixels, for any model's mean/std. CutMix: the partner's box pasted into own, and λ the share of
    own's pixels actually kept at this size (the label term mixes the labels with it).
    """
    if not is_cutmix(mix):
        lam = float(mix[0])
        return own.mul(lam).add_(partner, alpha=1.0 - lam), lam
    h, w = own.shape[-2:]
    y0, y1, x0, x1 = box_pixels(mix, h, w)
    out = own.clone()
    out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def store_mixes(spec) -> bool:
    """Whether a targets spec mixes its views (`targets.mix` on; a spec without the key does not)."""
    cfg = getattr(spec, "mix", None)
    return cfg is not None and mix_enabled(cfg)


def mix_spec(spec) -> dict | None:
    """The store's view_spec entry for `targets.mix` of a targets spec (None when off, so the fingerprint of an
    unmixed store stays)."""
    if not store_mixes(spec):
        return None
    cfg = spec.mix
    return {"mixup_alpha": cfg.mixup_alpha, "cutmix_alpha": cfg.cutmix_alpha, "prob": cfg.prob,
            "switch_prob": cfg.switch_prob, "sampler": "pair-v1", "columns": {"partner": ["sample", "view"],
                                                                            "mix": list(MIX_COLUMNS)}}
