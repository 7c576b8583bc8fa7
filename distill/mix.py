"""MixUp / CutMix on a batch of images and on any per-sample target (one-hot, smoothed, or teacher probabilities)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam

from distill.recipe import MixConfig


@dataclass(frozen=True)
class MixParams:
    """One batch's draw: each sample i is mixed with sample B-1-i (timm's flip pairing)."""

    lam: float  # weight of the sample's own image and target
    box: tuple[int, int, int, int] | None = None  # CutMix (y0, y1, x0, x1) pasted from the partner


def mix_enabled(cfg: MixConfig) -> bool:
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


def sample_mix(cfg: MixConfig, image_hw: tuple[int, int], rng: np.random.Generator) -> MixParams | None:
    """Draw whether and how to mix one batch; None means leave it alone.

    With CutMix, λ is corrected to the pasted area actually kept, so targets match the pixels.
    """
    if not mix_enabled(cfg) or rng.random() >= cfg.prob:
        return None
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob)
    if use_cutmix:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        # timm draws the box with numpy's global RNG; seed it from ours so a run is reproducible
        np.random.seed(int(rng.integers(2**31)))
        box, lam = cutmix_bbox_and_lam((1, 1) + tuple(image_hw), lam, correct_lam=True)
        return MixParams(lam=float(lam), box=tuple(int(v) for v in box))
    return MixParams(lam=float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)))


def mix_images(x: torch.Tensor, p: MixParams | None) -> torch.Tensor:
    """MixUp: λ·x + (1-λ)·x_flip; CutMix: x with the partner's box pasted in."""
    if p is None:
        return x
    if p.box is None:
        return x.mul(p.lam).add_(x.flip(0), alpha=1.0 - p.lam)
    y0, y1, x0, x1 = p.box
    x = x.clone()
    x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    return x


def mix_targets(t: torch.Tensor, p: MixParams | None) -> torch.Tensor:
    """λ·t + (1-λ)·t_flip: exact for label distributions, an approximation for teacher outputs."""
    if p is None:
        return t
    return t * p.lam + t.flip(0) * (1.0 - p.lam)


def rescale(p: MixParams | None, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> MixParams | None:
    """The same draw for another resolution: the CutMix box scaled (online KD: the teacher's size)."""
    if p is None or p.box is None:
        return p
    (fh, fw), (th, tw) = from_hw, to_hw
    y0, y1, x0, x1 = p.box
    return MixParams(lam=p.lam, box=(round(y0 * th / fh), round(y1 * th / fh), round(x0 * tw / fw),
                                     round(x1 * tw / fw)))
