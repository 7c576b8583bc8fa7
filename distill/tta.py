"""Test-time augmentation: the views of a normalised batch (zoomed in/out at the same size, mirrored) and the log
of their mean softmax probability."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.recipe import TTAConfig


def is_plain(cfg: TTAConfig | None) -> bool:
    """True when `cfg` asks for no view but the image itself (None, or only scale 1 and no flip)."""
    return cfg is None or (not cfg.hflip and all(s == 1 for s in cfg.scales))


def num_views(cfg: TTAConfig | None) -> int:
    """How many forward passes `tta_logits` makes per image: the cost factor of TTA."""
    return 1 if is_plain(cfg) else len(cfg.scales) * (2 if cfg.hflip else 1)


def zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` (B x 3 x H x W) zoomed by `scale` about its centre, at the same H x W: a scale > 1 resizes up and
    center-crops, a scale < 1 resizes down and pads."""
    h, w = x.shape[-2:]
    # an even size change keeps the crop or the padding the same on both sides, so zoom commutes with a
    # mirror and TTA with hflip gives exactly the same prediction for an image and its mirror
    size = (h + 2 * round((scale - 1) * h / 2), w + 2 * round((scale - 1) * w / 2))
    if size == (h, w):
        return x
    # bilinear, not the model's bicubic: the pixels were already resized once and bicubic would overshoot
    # again; antialias so a zoomed-out view does not alias
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    dh, dw = abs(size[0] - h) // 2, abs(size[1] - w) // 2
    if scale > 1:
        return y[..., dh:dh + h, dw:dw + w]
    # reflect, not zeros: zero is the mean colour after normalisation, and a flat frame with a hard edge is
    # something training never showed (its crops always fill the image); reflection continues the image's
    # own content, so the border looks like image. Scales >= 0.5 keep the padding smaller than the image.
    return F.pad(y, (dw, dw, dh, dh), mode="reflect")


def views(x: torch.Tensor, scales, hflip: bool) -> list[torch.Tensor]:
    """The TTA views of a normalised batch: `x` at each scale (scale 1 is `x` itself), each followed by its
    mirror when `hflip`; every view has the shape of `x`."""
    out = []
    for s in scales:
        v = x if s == 1 else zoom(x, s)
        out.append(v)
        if hflip:
            out.append(v.flip(-1))
    return out


def tta_logits(model, x: torch.Tensor, cfg: TTAConfig | None) -> torch.Tensor:
    """`log mean_v softmax(model(v))` over the views v of `x` (float32, B x K); exactly `model(x)` when
    `is_plain(cfg)`. `cfg.enabled` is not looked at: the caller decides whether to use TTA.

    The probabilities are averaged, not the logits, and their log returned, so that softmax of the result is
    the ensemble's probability and NLL / ECE stay meaningful. One view per forward pass: memory stays that of
    the plain batch, and time is `num_views(cfg)` times the plain forward.
    """
    if is_plain(cfg):
        return model(x)
    log_probs = torch.stack([model(v).float().log_softmax(-1) for v in views(x, cfg.scales, cfg.hflip)])
    return log_probs.logsumexp(0) - math.log(len(log_probs))
