"""The layer Grad-CAM reads (`Target`) as each model source chooses it; the Grad-CAM itself is distill.explain."""
from __future__ import annotations

import dataclasses

from torch import nn

from distill.errors import DistillError


@dataclasses.dataclass(frozen=True)
class Target:
    """The layer Grad-CAM reads: the module, its name in the model, and how its output is laid out."""

    module: nn.Module
    name: str
    layout: str  # "NCHW" | "NHWC" | "tokens" (B x N x C: prefix tokens, then the patch grid row by row)
    patch: tuple[int, int] | None = None  # tokens: the patch size, which gives the grid for an input size
    map_size: tuple[int, int] | None = None  # (h, w) of the map at the input size `find_target` was given


def cannot(what: str, model: nn.Module, why: str) -> DistillError:
    name = getattr(model, "distill_spec", {}).get("model") or type(model).__name__
    return DistillError(f"{what}: Grad-CAM cannot explain {name}: {why}")


def pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
