"""The recipe's `sweep.params` checked against a student's own fields: the search space `distill sweep` draws from."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from distill.errors import DistillError
from distill.recipe.loading import _convert, _field_value, _join
from distill.recipe.schema import Recipe, StudentConfig

_RANGE_KEYS = ("low", "high", "log", "step")
_NOT_SWEPT = {"name": "the sweep names each trial", "fixres": "a trial has no FixRes stage",
              "mixed_precision": "one process trains every trial, in one precision"}


def check_sweep(recipe: Recipe) -> None:
    """The sweep's student exists and its ranges fit the student's fields (at recipe load)."""
    names = [s.name for s in recipe.students]
    if recipe.sweep.student is not None and recipe.sweep.student not in names:
        raise DistillError(f"sweep.student: no student {recipe.sweep.student!r} in the recipe (its students: "
                           f"{', '.join(names) or 'none'})")
    sweep_space(recipe.sweep.params)


def sweep_space(params: dict) -> dict[str, dict]:
    """`sweep.params` checked against a student's own fields: {dotted path: {"low", "high", "log", "step", "int"}
    for a number field, or {"choices"}}, each bound and choice converted and checked as the field itself is.
    Nested mappings are dotted paths too: `kd: {weight: {...}}`, or the override `sweep.params.kd.weight.high=0.8`
    (merged into a `kd.weight` range of the file)."""
    return {path: _sweep_range(path, spec) for path, spec in _flat_params(params, "").items()}


def _flat_params(node: dict, prefix: str) -> dict:
    flat: dict = {}
    for key, value in node.items():
        if isinstance(value, dict) and value and not any(k in value for k in (*_RANGE_KEYS, "choices")):
            items = _flat_params(value, _join(prefix, key)).items()  # a section of paths, not a range
        else:
            items = [(_join(prefix, key), value)]
        for path, spec in items:
            old = flat.get(path)
            flat[path] = {**old, **spec} if isinstance(old, dict) and isinstance(spec, dict) else spec
    return flat


def _sweep_range(path: str, spec) -> dict:
    where = f"sweep.params.{path}"
    f, hint = _student_field(path, where)
    kinds = [a for a in (typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,))
             if a is not type(None)]
    form = "{low, high[, log][, step]} (a number field) or {choices: [...]}"
    if not isinstance(spec, dict) or not spec:
        raise DistillError(f"{where}: expected {form}, got {spec!r}")
    if "choices" in spec:
        if len(spec) > 1:
            raise DistillError(f"{where}: expected {form}, not both; got {spec!r}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise DistillError(f"{where}.choices: expected a non-empty list of values, got {choices!r}")
        values = [_field_value(f, hint, c, f"{where}.choices.{j}") for j, c in enumerate(choices)]
        for j, v in enumerate(values):
            if not isinstance(v, (bool, int, float, str, type(None))):
                raise DistillError(f"{where}.choices.{j}: a choice is a single value (a number, string, true/false "
                                   f"or null), got {v!r}")
        return {"choices": values}
    unknown = sorted(set(map(str, spec)) - set(_RANGE_KEYS))
    if unknown:
        raise DistillError(f"{where}: unknown key {unknown[0]!r}; expected {form}")
    if kinds not in ([float], [int]):
        raise DistillError(f"{where}: {path} is not a number field, so it takes no range: give "
                           "{choices: [...]} of its values")
    kind = kinds[0]
    for key in ("low", "high"):
        if key not in spec:
            raise DistillError(f"{where}.{key}: missing (a range needs low and high)")
    low, high = (_field_value(f, kind, spec[k], f"{where}.{k}") for k in ("low", "high"))
    if low > high:
        raise DistillError(f"{where}: empty range, low {low!r} > high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise DistillError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise DistillError(f"{where}.log: a log range needs low > 0, got low {low!r}")
    step = spec.get("step")
    if step is not None:
        step = _convert(kind, step, f"{where}.step")
        if step <= 0 or log:
            raise DistillError(f"{where}.step: expected a positive {kind.__name__} without log: true, got {step!r}")
    return {"low": low, "high": high, "log": log, "step": step, "int": kind is int}


def _student_field(path: str, where: str) -> tuple[dataclasses.Field, Any]:
    """(field, type) at dotted `path` inside a student config."""
    parts = path.split(".")
    if parts[0] in _NOT_SWEPT:
        raise DistillError(f"{where}: {parts[0]} cannot be swept ({_NOT_SWEPT[parts[0]]})")
    hint: Any = StudentConfig
    for i, part in enumerate(parts):
        sections = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if not sections:
            raise DistillError(f"{where}: {'.'.join(parts[:i])} is not a section")
        fields = {f.name: f for f in dataclasses.fields(sections[0])}
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            near = f"; did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
            raise DistillError(f"{where}: unknown key {'.'.join(parts[:i + 1])!r} of a student{near}")
        hint = typing.get_type_hints(sections[0])[part]
    if any(dataclasses.is_dataclass(a) for a in (typing.get_args(hint) or (hint,))):
        raise DistillError(f"{where}: {path} is a section; sweep its keys ({path}.<key>)")
    return fields[part], hint
