"""Models: build teachers and students ("hf:<id or dir>", "timm:<name>"), load local weights, save/load, param groups.

Every model built here takes normalised float pixels (B, 3, H, W) and returns plain logits (B, K).

Model specs (one adapter per prefix, in `sources.SOURCES`):
- `timm:<name>`: `timm.create_model(name, num_classes=K, **timm_kwargs)` (timm_source.py).
- `hf:<hub id or local dir>`: a transformers image classifier, wrapped in `HFClassifier` (hf_source.py).

The parts: build.py (a recipe section → model + preprocessing), weights.py (`pretrained: <path or pkg:...>`),
folder.py (model folders: save_model / load_model / load_for_eval, model.json, sha256, and the config.json
that timm's `local-dir:` and transformers load), card.py (README.md, the folder's model card), ensemble.py
(Ensemble, OutOfFold, save_ensemble), params.py (param_groups, count_params), cam.py (Grad-CAM's layer).
"""
from distill.models.build import build_model, check_model_name
from distill.models.cam import Target
from distill.models.card import write_card
from distill.models.common import FORMAT_VERSION, IMAGENET_MEAN, IMAGENET_STD, INFO_FILE, MODEL_FILE, WEIGHT_SUFFIXES
from distill.models.ensemble import Ensemble, OutOfFold, save_ensemble
from distill.models.folder import (
    eval_augment,
    load_for_eval,
    load_model,
    member_info,
    read_model_info,
    save_model,
    sha256_file,
)
from distill.models.hf_source import HFClassifier
from distill.models.params import count_params, param_groups
from distill.models.sources import SOURCES, source_named, source_of

__all__ = [
    "FORMAT_VERSION", "IMAGENET_MEAN", "IMAGENET_STD", "INFO_FILE", "MODEL_FILE", "SOURCES", "WEIGHT_SUFFIXES",
    "Ensemble", "HFClassifier", "OutOfFold", "Target", "build_model", "check_model_name", "count_params",
    "eval_augment", "load_for_eval", "load_model", "member_info", "param_groups", "read_model_info", "save_ensemble",
    "save_model", "sha256_file", "source_named", "source_of", "write_card",
]
