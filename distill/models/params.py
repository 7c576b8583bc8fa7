"""Optimisation helpers: optimizer parameter groups (each source its own grouping) and the parameter count."""
from __future__ import annotations

from torch import nn

from distill.models.sources import source_of


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None,
                 where: str = "teacher") -> list[dict]:
    """Optimizer parameter groups: {"params", "weight_decay", "lr_scale"}.

    No weight decay on biases, norm weights, other 1-d parameters, position embeddings and
    class/distillation tokens. With `layer_decay`, block l of L gets lr_scale
    `layer_decay ** (L + 1 - l)`: embeddings are layer 0, block i is i + 1, the final norm,
    pooler and classifier L + 1 (scale 1). timm models use timm's own grouping. The lr of a
    group is `lr * lr_scale`; timm's schedulers apply `lr_scale` on every step, so set the
    optimizer's lr to the unscaled value.
    """
    # timm's grouping works on any nn.Module, so a model no source claims gets it too
    return source_of(model, default="timm").param_groups(model, weight_decay, layer_decay, where)
