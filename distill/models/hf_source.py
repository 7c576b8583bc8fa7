"""The `hf:<hub id or dir>` model source: transformers classifiers, wrapped; build, rebuild, head, groups, CAM layer.

`hf:<hub id or local dir>`: a transformers image classifier, wrapped in `HFClassifier` (the transformers
model stays reachable as `model.hf`, its config as `model.config`). When `hf_config` holds a `model_type`,
the config is built from `hf_config` alone with `AutoConfig.for_model` and, unless `pretrained: true`, the
id after `hf:` is only a label (`hf:tiny-vit`): nothing is read from the hub or the disk. That is how tests
and quick runs make tiny random-weight ViT / BEiT / DeiT models offline.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from distill.data import Preprocess
from distill.errors import DistillError
from distill.models.cam import Target, cannot, pair
from distill.models.common import IMAGENET_MEAN, IMAGENET_STD, INFO_FILE, first_line

# PIL resample codes as transformers image processors store them; lanczos/hamming have no
# counterpart among our interpolations, bicubic is the closest.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}

# Parameters that are positions or special tokens, not weights: never decayed (as in BEiT/DeiT).
_NO_DECAY_NAMES = ("cls_token", "distillation_token", "mask_token", "position_embeddings", "pos_embed",
                   "relative_position_bias_table")
# transformers < 5 names ViT blocks `encoder.layer.<i>`, transformers 5 `layers.<i>`: in parameter names
# and as module names
_HF_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")
_HF_BLOCK_MODULE = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.\d+$")


class HFClassifier(nn.Module):
    """A transformers image classifier that takes normalised pixels and returns plain logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def config(self):
        return self.hf.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ViT-style position embeddings only stretch to another resolution (FixRes, a recipe's
        # input_size) when asked; DeiT-with-teacher's `.logits` already averages its two heads.
        size = getattr(self.hf.config, "image_size", None)
        if isinstance(size, int) and tuple(x.shape[-2:]) != (size, size):
            return self.hf(pixel_values=x, interpolate_pos_encoding=True).logits
        return self.hf(pixel_values=x).logits


class HFSource:
    """`hf:<hub id or dir>`: a transformers image classifier in an `HFClassifier` (see the module docstring)."""

    usage = "hf:<hub id or dir>"

    @staticmethod
    def owns(model: nn.Module) -> bool:
        return isinstance(model, HFClassifier)

    @staticmethod
    def check(ident: str, where: str) -> None:
        """Nothing to check before building: the hub or the directory answers when the model is built."""

    @staticmethod
    def build(ident: str, cfg, num_classes: int, where: str, classes) -> tuple[nn.Module, Preprocess]:
        import transformers

        hf_config = dict(cfg.hf_config)
        local = Path(ident).expanduser().is_dir()
        if local:
            ident = str(Path(ident).expanduser())
            if (Path(ident) / INFO_FILE).is_file() and not (Path(ident) / "config.json").is_file():
                raise DistillError(f"{where}.model: {ident} is a distill checkpoint, not a transformers directory; "
                                   f"keep {where}.model as it was trained and set {where}.pretrained: {ident}")
        if "model_type" in hf_config:
            try:
                config = transformers.AutoConfig.for_model(**hf_config)
            except (ValueError, KeyError) as e:
                raise DistillError(f"{where}.hf_config: cannot build a config ({first_line(e)})") from None
        else:
            config = _hf_call(transformers.AutoConfig.from_pretrained, ident, where)
            config.update(hf_config)
        _set_labels(config, num_classes, classes)
        cls = _hf_class(config)
        if cfg.pretrained is True:
            # dtype: transformers 5 would otherwise keep a half-precision checkpoint's dtype; we train in fp32
            hf = _hf_call(cls.from_pretrained, ident, where, config=config, ignore_mismatched_sizes=True,
                          dtype=torch.float32)
        else:
            try:
                hf = cls.from_config(config) if cls is transformers.AutoModelForImageClassification else cls(config)
            except ValueError as e:
                raise DistillError(f"{where}.model: no transformers image classifier for "
                                   f"model_type {config.model_type!r} ({first_line(e)})") from None
        model = HFClassifier(hf)
        model.distill_spec = {"source": "hf"}
        label_only = "model_type" in hf_config and cfg.pretrained is not True and not local
        return model, _hf_preprocess(None if label_only else ident, config)

    @staticmethod
    def describe(model: HFClassifier, classes: list[str]) -> dict:
        """The transformers class and config (with the class names) that rebuild the model offline."""
        config = model.hf.config.to_dict()
        config["id2label"] = {str(i): c for i, c in enumerate(classes)}
        config["label2id"] = {c: i for i, c in enumerate(classes)}
        return {"hf_class": type(model.hf).__name__, "hf_config": config}

    @staticmethod
    def rebuild(info: dict) -> nn.Module:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config = CONFIG_MAPPING[info["hf_config"]["model_type"]].from_dict(info["hf_config"])
        cls = getattr(transformers, info["hf_class"])
        model = HFClassifier(cls(config))
        model.distill_spec = {"source": "hf"}
        return model

    @staticmethod
    def num_classes(model: HFClassifier) -> int:
        return int(model.hf.config.num_labels)

    @staticmethod
    def head_keys(model: HFClassifier, own: dict) -> set[str]:
        """State-dict keys of the classifier head(s): the transformers model's `*classifier*` children."""
        prefixes = [f"hf.{n}." for n, _ in model.hf.named_children() if "classifier" in n]
        return {k for k in own if k.startswith(tuple(prefixes))} if prefixes else set()

    @staticmethod
    def param_groups(model: HFClassifier, weight_decay: float, layer_decay: float | None, where: str) -> list[dict]:
        """BEiT/DeiT-style groups: no decay on 1-d parameters, positions and tokens; with `layer_decay`,
        embeddings are layer 0, encoder layer i is i + 1, everything after the encoder L + 1."""
        num_layers = getattr(model.hf.config, "num_hidden_layers", None)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if layer_decay is not None and (not isinstance(num_layers, int) or not any(map(_HF_BLOCK.search, names))):
            raise DistillError(f"{where}.optim.layer_decay: layer-wise lr decay needs a ViT-style model "
                               f"(embeddings + numbered encoder layers); {type(model.hf).__name__} is not one. "
                               "Set it to null")
        groups: dict[tuple, dict] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim > 1 and not any(t in name for t in _NO_DECAY_NAMES)
            scale = 1.0
            if layer_decay is not None:
                scale = layer_decay ** (num_layers + 1 - _hf_layer_id(name, num_layers))
            group = groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                       "lr_scale": scale})
            group["params"].append(p)
        return list(groups.values())

    @staticmethod
    def cam_target(model: HFClassifier, input_size: int, what: str) -> Target:
        """ViT / BEiT / DeiT: the output of the last encoder layer's `layernorm_before`."""
        blocks = [(name, m) for name, m in model.named_modules() if _HF_BLOCK_MODULE.search(name)]
        norm = getattr(blocks[-1][1], "layernorm_before", None) if blocks else None
        if norm is None:
            raise cannot(what, model, f"{type(model.hf).__name__} has no ViT-style encoder layers with a "
                                      "layernorm_before (only ViT, BEiT and DeiT are supported)")
        return Target(norm, f"{blocks[-1][0]}.layernorm_before", "tokens", pair(model.config.patch_size))


def _hf_layer_id(name: str, num_layers: int) -> int:
    match = _HF_BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if ".embeddings." in name:
        return 0
    return num_layers + 1


def _hf_call(fn, ident: str, where: str, **kwargs):
    """Call a transformers `from_pretrained`; hub and disk failures become a DistillError."""
    try:
        return fn(ident, **kwargs)
    except (OSError, ValueError) as e:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set: only models already in the HF cache or local directories load" \
            if offline else "no such model on the hub, or the hub cannot be reached"
        raise DistillError(f"{where}.model: cannot load 'hf:{ident}' ({first_line(e)}); {why}. "
                           f"Give a local directory (hf:<dir>), or build from {where}.hf_config "
                           f"with a model_type and pretrained: false") from None


def _hf_class(config):
    """The classifier class the config asks for; e.g. a distilled DeiT keeps its two heads."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if "ForImageClassification" in name and hasattr(transformers, name):
            return getattr(transformers, name)
    # the model type's own classifier: transformers 5's AutoModelForImageClassification.from_config fails
    # with a TypeError on a config without `architectures` (a hand-written hf_config)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if isinstance(name, (tuple, list)):
        name = name[0]
    if name and hasattr(transformers, name):
        return getattr(transformers, name)
    return transformers.AutoModelForImageClassification


def _set_labels(config, num_classes: int, classes):
    config.num_labels = num_classes
    if classes is not None:
        config.id2label = dict(enumerate(classes))
        config.label2id = {c: i for i, c in enumerate(classes)}


def _hf_preprocess(ident: str | None, config) -> Preprocess:
    """Image processor config when there is one, else the model config's image_size, else ImageNet."""
    size = getattr(config, "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pre = Preprocess(input_size=int(size or 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    proc = _processor_dict(ident) if ident else {}
    changes = {}
    if proc.get("image_mean") and proc.get("image_std"):
        changes.update(mean=tuple(map(float, proc["image_mean"])), std=tuple(map(float, proc["image_std"])))
    resize, crop = _edge(proc.get("size")), _edge(proc.get("crop_size")) if proc.get("do_center_crop") else None
    if crop and resize:
        changes.update(input_size=crop, crop_pct=min(1.0, crop / resize))
    elif resize and proc.get("crop_pct"):
        changes.update(input_size=resize, crop_pct=float(proc["crop_pct"]))
    elif resize:
        # resized straight to the model size, no crop
        changes.update(input_size=resize, crop_pct=1.0)
    resample = proc.get("resample")
    if resample in _PIL_RESAMPLE or resample in _PIL_RESAMPLE.values():
        changes["interpolation"] = _PIL_RESAMPLE.get(resample, resample)
    return dataclasses.replace(pre, **changes)


def _processor_dict(ident: str) -> dict:
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        d, _ = ImageProcessingMixin.get_image_processor_dict(ident)
    except (OSError, ValueError):
        # no preprocessor_config.json, or not cached while offline: fall back to the model config
        return {}
    return d.get("image_processor", d) if isinstance(d, dict) else {}


def _edge(size) -> int | None:
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size) if isinstance(size, (int, float)) and size > 0 else None
