"""MixUp / CutMix / FMix on a batch of images and on any per-sample target (one-hot, smoothed, or teacher
probabilities)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam

from distill.recipe import MixConfig


@dataclass(frozen=True)
class MixParams:
    """One batch's draw: each sample i is mixed with sample B-1-i (timm's flip pairing)."""

    lam: float  # weight of the sample's own image and target
    box: tuple[int, int, int, int] | None = None  # CutMix (y0, y1, x0, x1) pasted from the partner
    # FMix: bool [H, W], True where the sample keeps its own pixel; lam is its mean
    mask: torch.Tensor | None = dataclasses.field(default=None, compare=False)


def mix_enabled(cfg: MixConfig) -> bool:
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.fmix_alpha > 0)


def mix_mode(cfg: MixConfig, rng: np.random.Generator) -> str:
    """The mode of a mixed batch: "mixup", "cutmix" or "fmix".

    `switch_prob` is the chance of leaving MixUp for a region mode (CutMix or FMix) when MixUp and one is on
    (timm's rule for MixUp + CutMix); between CutMix and FMix, when both are on, an equal chance. A mode alone
    is always used. With FMix off, the draws are those of MixUp/CutMix before FMix existed.
    """
    regions = [mode for mode, alpha in (("cutmix", cfg.cutmix_alpha), ("fmix", cfg.fmix_alpha)) if alpha > 0]
    if not regions or (cfg.mixup_alpha > 0 and rng.random() >= cfg.switch_prob):
        return "mixup"
    return regions[0] if len(regions) == 1 else regions[int(rng.integers(2))]


def sample_mix(cfg: MixConfig, image_hw: tuple[int, int], rng: np.random.Generator) -> MixParams | None:
    """Draw whether and how to mix one batch; None means leave it alone.

    With CutMix and FMix, λ is the share of the sample's own pixels actually kept, so targets match the pixels.
    """
    if not mix_enabled(cfg) or rng.random() >= cfg.prob:
        return None
    mode = mix_mode(cfg, rng)
    if mode == "cutmix":
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        # timm draws the box with numpy's global RNG; seed it from ours so a run is reproducible
        np.random.seed(int(rng.integers(2**31)))
        box, lam = cutmix_bbox_and_lam((1, 1) + tuple(image_hw), lam, correct_lam=True)
        return MixParams(lam=float(lam), box=tuple(int(v) for v in box))
    if mode == "fmix":
        mask = fmix_mask(float(rng.beta(cfg.fmix_alpha, cfg.fmix_alpha)), tuple(image_hw), cfg.fmix_decay_power,
                         rng)
        return MixParams(lam=float(mask.float().mean()), mask=mask)
    return MixParams(lam=float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)))


def fmix_mask(lam: float, hw: tuple[int, int], decay_power: float, rng: np.random.Generator) -> torch.Tensor:
    """FMix's binary mask (Harris et al. 2020, ecs-vlc/FMix `sample_mask` without `max_soft`): bool [H, W],
    True on the round(λ·H·W) pixels where a random low-frequency image is largest.

        g = Re(IDFT(Z)),  Z[f] = (a_f + i·b_f) / max(|f|, 1/max(H, W))^δ,  a_f, b_f ~ N(0, 1)

    over the frequencies f = (f_y, f_x) of an H×W real DFT; the larger the decay power δ, the smoother g and
    the fewer, larger the mask's blobs. Ties in g (none in practice) go to the lower pixel index.
    """
    h, w = hw
    freqs = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power
    spectrum = scale * (rng.standard_normal(freqs.shape) + 1j * rng.standard_normal(freqs.shape))
    g = np.fft.irfft2(spectrum, s=(h, w))
    keep = np.zeros(h * w, dtype=bool)
    keep[np.argsort(-g.reshape(-1), kind="stable")[:round(lam * h * w)]] = True
    return torch.from_numpy(keep.reshape(h, w))


def mix_images(x: torch.Tensor, p: MixParams | None) -> torch.Tensor:
    """MixUp: λ·x + (1-λ)·x_flip; CutMix: x with the partner's box pasted in; FMix: the partner's pixels where
    the mask is False."""
    if p is None:
        return x
    if p.mask is not None:
        return torch.where(p.mask.to(x.device), x, x.flip(0))
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
    """The same draw for another resolution (online KD: the teacher's size): the CutMix box scaled; the FMix mask
    resized nearest-neighbour (each teacher pixel takes the student pixel it falls in), its λ the kept share at
    the new size, which rounding can move by a few pixels' worth."""
    if p is None or (p.box is None and p.mask is None) or tuple(from_hw) == tuple(to_hw):
        return p
    if p.mask is not None:
        mask = F.interpolate(p.mask[None, None].float(), size=tuple(to_hw), mode="nearest")[0, 0] > 0.5
        return MixParams(lam=float(mask.float().mean()), mask=mask)
    (fh, fw), (th, tw) = from_hw, to_hw
    y0, y1, x0, x1 = p.box
    return MixParams(lam=p.lam, box=(round(y0 * th / fh), round(y1 * th / fh), round(x0 * tw / fw),
                                     round(x1 * tw / fw)))
