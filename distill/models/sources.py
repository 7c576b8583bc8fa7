"""The model sources, one adapter per prefix of a model spec ("timm:<name>", "hf:<hub id or dir>"), in one dict.

Adding a source: one module with its adapter (see `Source`), one line in `SOURCES`, and its test. Nothing
else in distill asks which source a model comes from: it looks the adapter up here, by the spec's prefix
(`source_named`), by model.json's `source` (`SOURCES[info["source"]]`) or by the model itself (`source_of`).
"""
from __future__ import annotations

from typing import Protocol

from torch import nn

from distill.data import Preprocess
from distill.errors import DistillError
from distill.models.cam import Target
from distill.models.hf_source import HFSource
from distill.models.timm_source import TimmSource


class Source(Protocol):
    """What a model source provides. A model it builds carries `distill_spec`: {"source": <key>, ...}, saved
    into model.json; `rebuild` gets that model.json back (with num_classes, classes, preprocess)."""

    usage: str  # the spec's form, for error messages: "timm:<name>"

    def owns(self, model: nn.Module) -> bool: ...  # a model of this source (built here or not)
    def check(self, ident: str, where: str) -> None: ...  # fail fast on a spec that cannot build
    def build(self, ident: str, cfg, num_classes: int, where: str, classes) -> tuple[nn.Module, Preprocess]: ...
    def describe(self, model: nn.Module, classes: list[str]) -> dict: ...  # model.json fields `rebuild` needs
    def rebuild(self, info: dict) -> nn.Module: ...  # random weights; load_model loads the saved ones
    def num_classes(self, model: nn.Module) -> int: ...
    def head_keys(self, model: nn.Module, own: dict) -> set[str]: ...  # the classifier's state-dict keys
    def param_groups(self, model: nn.Module, weight_decay: float, layer_decay: float | None,
                     where: str) -> list[dict]: ...
    def cam_target(self, model: nn.Module, input_size: int, what: str) -> Target: ...  # Grad-CAM's layer


# keyed by the prefix of a model spec; the order is the order error messages list them in
SOURCES: dict[str, type[Source]] = {"hf": HFSource, "timm": TimmSource}


def source_named(spec: str, where: str) -> tuple[type[Source], str]:
    """(adapter, identifier after the prefix) of a model spec; a DistillError naming `where`.model if none."""
    prefix, _, ident = spec.partition(":")
    if prefix not in SOURCES or not ident:
        expected = " or ".join(f"'{s.usage}'" for s in SOURCES.values())
        raise DistillError(f"{where}.model: expected {expected}, got {spec!r}")
    return SOURCES[prefix], ident


def source_of(model: nn.Module, default: str | None = None) -> type[Source] | None:
    """The adapter whose kind of model `model` is (the first that owns it), else SOURCES[default] (or None)."""
    for source in SOURCES.values():
        if source.owns(model):
            return source
    return SOURCES[default] if default else None
