"""The `timm:<name>` model source: build, rebuild from model.json, classifier head, param groups, Grad-CAM layer."""
from __future__ import annotations

import difflib

import torch
from torch import nn

from distill.data import Preprocess
from distill.errors import DistillError
from distill.models.cam import Target, cannot, pair
from distill.models.common import first_line


class TimmSource:
    """`timm:<name>`: `timm.create_model(name, num_classes=K, **timm_kwargs)`; the model is timm's own."""

    usage = "timm:<name>"

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return callable(getattr(model, "forward_features", None))

    @staticmethod
    def check(name: str, where: str) -> None:
        """Fail fast on a name timm does not know (`distill run` checks every model before training)."""
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
            raise DistillError(f"{where}.model: unknown timm model {name!r}{hint}")

    @staticmethod
    def build(name: str, cfg, num_classes: int, where: str, classes) -> tuple[nn.Module, Preprocess]:
        import timm
        import timm.data

        TimmSource.check(name, where)
        kwargs = dict(cfg.timm_kwargs)
        if getattr(cfg, "zero_init_last_bn", None) is not None:
            kwargs["zero_init_last"] = cfg.zero_init_last_bn
        try:
            model = timm.create_model(name, pretrained=cfg.pretrained is True, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise DistillError(f"{where}.timm_kwargs: {name} does not take these arguments ({e})") from None
        except OSError as e:
            raise DistillError(f"{where}.pretrained: cannot download timm weights for {name!r} "
                               f"({first_line(e)}); offline only weights already in the cache load. "
                               f"Give {where}.pretrained a local weights file, or false for random init") from None
        model.distill_spec = {"source": "timm", "name": name, "timm_kwargs": kwargs}
        d = timm.data.resolve_data_config({}, model=model)
        pre = Preprocess(input_size=int(d["input_size"][-1]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                         interpolation=_interpolation(d["interpolation"]), crop_pct=float(d["crop_pct"]))
        return model, pre

    @staticmethod
    def describe(model: nn.Module, classes: list[str]) -> dict:
        """What model.json needs beyond `distill_spec` to rebuild the model: nothing, the spec names it."""
        return {}

    @staticmethod
    def rebuild(info: dict) -> nn.Module:
        import timm

        model = timm.create_model(info["name"], pretrained=False, num_classes=info["num_classes"],
                                  **info["timm_kwargs"])
        model.distill_spec = {k: info[k] for k in ("source", "name", "timm_kwargs")}
        return model

    @staticmethod
    def num_classes(model: nn.Module) -> int:
        return int(model.num_classes)

    @staticmethod
    def head_keys(model: nn.Module, own: dict) -> set[str]:
        """State-dict keys of the classifier head(s), as timm's pretrained_cfg names them."""
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        prefixes = [f"{n}." for n in ((names,) if isinstance(names, str) else names)]
        return {k for k in own if k.startswith(tuple(prefixes))} if prefixes else set()

    @staticmethod
    def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None, where: str) -> list[dict]:
        """timm's own grouping (any nn.Module works with it)."""
        import timm.optim

        no_decay = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
        if layer_decay is not None:
            return timm.optim.param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay,
                                                       layer_decay=layer_decay)
        groups = timm.optim.param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
        return [{**g, "lr_scale": 1.0} for g in groups]

    @staticmethod
    def cam_target(model: nn.Module, input_size: int, what: str) -> Target:
        """ViT-style models (forward_features gives tokens): the output of the last block's `norm1`; CNNs
        (forward_features gives a map): the module whose output forward_features returns, i.e. the last map
        before the head's pooling. When that map is 1x1 at this input size it holds no location, so the
        deepest stage of timm's `feature_info` that is at least 2x2 is used instead."""
        features, records = _probe(model, input_size)
        if features.ndim == 3:
            blocks = getattr(model, "blocks", None)
            norm = getattr(blocks[-1], "norm1", None) if blocks is not None and len(blocks) else None
            patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
            if norm is None or patch is None:
                raise cannot(what, model, "its features are tokens, but it has no blocks[-1].norm1 and "
                                          "patch_embed.patch_size (not a ViT-style model)")
            return Target(norm, f"blocks.{len(blocks) - 1}.norm1", "tokens", pair(patch))
        producers = [name for name, out in records if out is features]
        if features.ndim != 4 or not producers:
            raise cannot(what, model, f"forward_features gives a {features.ndim}-d tensor that no single layer "
                                      "produces (expected a feature map or ViT tokens)")
        layout = "NHWC" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "NCHW"
        name = producers[-1]  # the outermost module (hooks fire inner modules first)
        if layout == "NCHW" and min(features.shape[2:]) < 2:
            shapes = {n: tuple(out.shape) for n, out in records if torch.is_tensor(out)}
            name = _finer_stage(model, shapes) or name
        return Target(model.get_submodule(name), name, layout)


def _interpolation(name: str) -> str:
    # timm's "random" (train-time choice) has no eval meaning; bicubic is timm's usual eval resize
    return name if name in ("nearest", "bilinear", "bicubic", "area") else "bicubic"


@torch.no_grad()
def _probe(model: nn.Module, input_size: int) -> tuple[torch.Tensor, list[tuple[str, object]]]:
    """forward_features on one blank image, and every module's output in the order the modules finished."""
    records = []
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: records.append((name, out)))
               for name, m in model.named_modules() if name]
    try:
        features = model.forward_features(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    return features, records


def _finer_stage(model: nn.Module, shapes: dict[str, tuple]) -> str | None:
    """The deepest timm `feature_info` stage whose map is at least 2x2 at the probed size, else None."""
    for info in reversed(list(getattr(model, "feature_info", None) or [])):
        shape = shapes.get(info.get("module")) if isinstance(info, dict) else None
        if shape is not None and len(shape) == 4 and min(shape[2:]) >= 2:
            return info["module"]
    return None
