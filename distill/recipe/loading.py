"""Recipe loading: YAML → the schema's dataclasses through a strict builder, overrides, checks, resolved dump."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distill.errors import DistillError
from distill.recipe.cards import merge_card, read_yaml
from distill.recipe.data_config import DataConfig
from distill.recipe.fields import model_sources
from distill.recipe.schema import Recipe

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# --- loading -----------------------------------------------------------------
def load_recipe(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `key.path=value` overrides and teacher card, validate strictly."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: recipe file not found")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise DistillError(f"{path}: a recipe is a YAML mapping of sections (name, data, teacher, ...)")
    raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict) -> Recipe:
    raw = dict(raw)
    if isinstance(raw.get("students"), list):
        # `kd: none` (the baseline) or `kd: dkd` is shorthand for `kd: {loss: ...}`
        raw["students"] = [{**s, "kd": {"loss": s["kd"]}} if isinstance(s, dict) and isinstance(s.get("kd"), str)
                           else s for s in raw["students"]]
    if isinstance(raw.get("teacher"), dict) and raw["teacher"].get("card"):
        if not isinstance(raw["teacher"]["card"], str):
            raise DistillError(f"teacher.card: expected a card name or a path to a card .yaml, "
                               f"got {raw['teacher']['card']!r}")
        raw["teacher"] = merge_card(raw["teacher"])
    recipe = _build(Recipe, raw, "")
    _check_recipe(recipe)
    return recipe


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a raw recipe dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    if "=" not in item:
        raise DistillError(f"override {item!r}: expected key.path=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, {})
        if node is None:
            raise DistillError(f"override {key}: {where} is null; set it as a mapping first")
        if not isinstance(node, (dict, list)):
            raise DistillError(f"override {key}: {where} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, where: str) -> int:
    """A list element by position (`students.0`) or by its `name` (`students.resnet18`)."""
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise DistillError(f"override {where}: no element {part!r} (use an index or a name)")


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML; loading it again gives the same recipe."""
    return yaml.safe_dump(to_plain(recipe), sort_keys=False)


def to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _check_device_decode(recipe: Recipe) -> None:
    """data.decode: device renders crop, resize and flip of image files only (distill/data/device_decode.py, which
    checks the store again): refused at load, before any stage trains, for what it cannot do."""
    if recipe.data.decode != "device":
        return
    drop = "or drop data.decode: device"
    if recipe.data.source not in ("imagefolder", "csv"):
        raise DistillError(f"data.decode: device reads image files; data.source {recipe.data.source} keeps its "
                           f"images in memory or in Arrow: use an imagefolder or csv source, {drop}")
    if recipe.data.cache is not None:
        raise DistillError(f"data.decode: device reads the original files, not data.cache's: drop data.cache, {drop}")
    from distill.mix import mix_enabled
    for key, on in (("augment", bool(recipe.targets.augment)), ("mix", mix_enabled(recipe.targets.mix))):
        if on:
            raise DistillError(f"data.decode: device renders crop, resize and flip only; targets.{key} is set: leave "
                               f"it out, {drop}")
    for i, s in enumerate(recipe.students):
        if s.kd.targets == "online":
            raise DistillError(f"students.{i}.kd.targets: online KD renders the teacher's view on the CPU; use "
                               f"kd.targets: cached, {drop}")


def _check_recipe(recipe: Recipe) -> None:
    if not recipe.name or "/" in recipe.name or recipe.name.startswith("."):
        raise DistillError(f"name: expected a plain run name (no '/'), got {recipe.name!r}")
    families = model_sources()
    if not _in_family(recipe.teacher.model, families):
        forms = " or ".join(repr(families[f]) for f in sorted(families))
        raise DistillError(f"teacher.model: expected {forms} (or a teacher.card), got {recipe.teacher.model!r}")
    names = [s.name for s in recipe.students]
    for i, s in enumerate(recipe.students):
        if s.name in names[:i]:
            raise DistillError(f"students.{i}.name: {s.name!r} is used twice; names must be unique")
        if not _in_family(s.model, families):
            raise DistillError(f"students.{i}.model: expected 'timm:<name>', got {s.model!r}")
        center = recipe.targets.center_crop_pct
        if s.fixres is not None and s.fixres.crop_pct is not None and s.fixres.crop_pct != center:
            # FixRes trains on the store's center view and is evaluated and saved with its own crop: they must agree
            raise DistillError(f"students.{i}.fixres.crop_pct: {s.fixres.crop_pct} differs from the store's center "
                               f"view (targets.center_crop_pct: {center}), the crop FixRes trains on; leave "
                               "fixres.crop_pct out, or set targets.center_crop_pct to it (the store is rebuilt)")
    _check_tricks(recipe)
    from distill.mix import mix_enabled
    if mix_enabled(recipe.targets.mix):
        for i, s in enumerate(recipe.students):
            if mix_enabled(s.mix):
                raise DistillError(f"students.{i}.mix: the store mixes its views already (targets.mix, labelled by "
                                   "the teacher on the mixed image); mixing the batch again would mix twice: leave "
                                   f"students.{i}.mix out, or targets.mix out for in-batch mixing")
        if recipe.targets.oof:
            raise DistillError("targets.mix: out-of-fold targets (targets.oof) cannot be mixed: no fold teacher "
                               "held out both images of a pair; leave one of them out")
    if recipe.targets.oof and not recipe.teacher.folds:
        raise DistillError("targets.oof: out-of-fold targets need fold teachers; set teacher.folds (e.g. 5)")
    if recipe.data.group_column is not None and recipe.data.source not in ("csv", "hf"):
        raise DistillError(f"data.group_column: only a csv or hf source has columns; data.source is "
                           f"{recipe.data.source!r}")
    if recipe.data.source != "hf":
        for key in ("dataset", "revision", "train_split", "val_split", "image_column"):
            if getattr(recipe.data, key) != getattr(DataConfig, key):
                raise DistillError(f"data.{key}: only data.source hf reads it; data.source is "
                                   f"{recipe.data.source!r}")
    _check_device_decode(recipe)
    for i, scale in enumerate(recipe.tta.scales):
        if not 0.5 <= scale <= 2:
            raise DistillError(f"tta.scales.{i}: expected a scale in [0.5, 2], got {scale!r}")
    if not recipe.tta.scales:
        raise DistillError("tta.scales: expected at least one scale, e.g. [1.0]")
    from distill.trackers import check_names  # accelerate's tracker names (accelerate imported on first use)
    check_names(recipe.log.trackers)
    t = recipe.targets
    for key in ("scale", "ratio"):
        lo, hi = getattr(t, key)
        if not 0 < lo <= hi or (key == "scale" and hi > 1):
            raise DistillError(f"targets.{key}: expected [low, high] with 0 < low <= high"
                               f"{' <= 1' if key == 'scale' else ''}, got {[lo, hi]}")
    if t.augment:
        from distill.store.augment import check_augment  # the store's registry (imported only when used)
        check_augment(t.augment, "targets.augment")
    for section in ("train", "eval"):
        for j, t in enumerate(getattr(recipe.teacher.augment, section) or []):
            if not isinstance(t.get("name"), str):
                raise DistillError(f"teacher.augment.{section}.{j}: expected a mapping with "
                                   f"'name: <albumentations class>', got {t!r}")
    from distill.recipe.sweep_space import check_sweep  # it builds on this module's converters
    check_sweep(recipe)


def _check_tricks(recipe: Recipe) -> None:
    """FMix, lr schedules and hard voting: what their keys alone cannot say."""
    if recipe.targets.mix.fmix_alpha > 0:
        raise DistillError("targets.mix.fmix_alpha: the store's exact mixing has no FMix (MixUp and CutMix only); "
                           "use FMix in-batch instead (students.N.mix.fmix_alpha) and leave it out of targets.mix")
    sections = [("teacher.optim", recipe.teacher.optim)]
    sections += [(f"students.{i}.optim", s.optim) for i, s in enumerate(recipe.students)]
    for where, optim in sections:
        default = type(optim)()
        for key, schedule in (("step_epochs", "step"), ("step_every", "step"), ("step_gamma", "step"),
                              ("plateau_patience", "plateau"), ("plateau_gamma", "plateau")):
            if optim.schedule != schedule and getattr(optim, key) != getattr(default, key):
                raise DistillError(f"{where}.{key}: only {where}.schedule {schedule} reads it; the schedule is "
                                   f"{optim.schedule!r}")
        if optim.schedule == "step" and bool(optim.step_epochs) == (optim.step_every is not None):
            raise DistillError(f"{where}.step_epochs: {where}.schedule step needs either the epochs to decay at "
                               f"(step_epochs, e.g. [30, 60]) or step_every (e.g. 30), not both or neither")
        for j, epoch in enumerate(optim.step_epochs):
            if epoch <= 0:
                raise DistillError(f"{where}.step_epochs.{j}: expected an epoch > 0, got {epoch!r}")
    if recipe.teacher.ensemble_combine == "vote" and recipe.targets.export:
        raise DistillError("teacher.ensemble_combine: vote gives nearly a histogram of the members' votes, little of "
                           "the between-class similarity KD transfers: export soft targets of `probs` (or `logits`), "
                           "or set targets.export: false to evaluate the voting ensemble only")


# --- the strict dict → dataclass builder --------------------------------------
def _build(cls, raw, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DistillError(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(fields)}"
            raise DistillError(f"{_join(path, key)}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DistillError(f"{where}: missing (required)")
            continue
        kwargs[name] = _field_value(f, hints[name], raw[name], where)
    return cls(**kwargs)


def _field_value(f: dataclasses.Field, hint, raw, where: str):
    """`raw` as the value of field `f` of type `hint`: a registry's name, the type, the field's constraint."""
    choices = f.metadata.get("choices")
    if choices is not None:
        names = choices()
        if not isinstance(raw, str) or raw not in names:
            raise DistillError(f"{where}: expected one of {', '.join(map(repr, names))}, got {raw!r}")
    check = f.metadata.get("check")
    try:
        value = _convert(hint, raw, where)
    except DistillError:
        if not check:
            raise
        # a wrong type: name the whole expectation, not just the type
        raise DistillError(f"{where}: expected {check[0]}, got {raw!r}") from None
    if check and value is not None and not check[1](value):
        raise DistillError(f"{where}: expected {check[0]}, got {raw!r}")
    return value


def _convert(hint, value, where):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a section: its own error names the key inside
            return _build(sections[0], value, where)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except DistillError as e:
                errors.append(str(e).split(": expected ", 1)[-1].split(", got")[0])
        expected = " or ".join(errors) + (" or null" if type(None) in args else "")
        raise DistillError(f"{where}: expected {expected}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise DistillError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise DistillError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise DistillError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_convert(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise DistillError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise DistillError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistillError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads `2e-3` (no dot) as a string; the user meant a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DistillError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise DistillError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema: unsupported type {hint} at {where}")


def _in_family(model: str, families) -> bool:
    """Whether `model` is "<prefix>:<name>" with a registered prefix (distill.models.sources)."""
    prefix, colon, _ = model.partition(":")
    return bool(colon) and prefix in families


def _join(path, key):
    return f"{path}.{key}" if path else str(key)
