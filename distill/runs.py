"""The run directory: atomic writes, stage fingerprints, the hyper-parameters trackers get (the trackers
themselves: distill/trackers.py, whose start_tracking and log_hparams the entry points import from here)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from pathlib import Path

from distill.disk import writing
from distill.recipe import to_plain
from distill.trackers import log_hparams, start_tracking

__all__ = ["finished", "hparams", "log_hparams", "stage_fingerprint", "start_tracking", "write_json",
           "write_text"]


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename it, so a reader never sees half a file. A write that fails
    (a full disk: one DistillError line naming `path`) removes the temporary file and leaves `path` as it was."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_temp_file(path)
    with writing(path, tmp), os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new hidden file beside `path`, opened for writing. Created with mode 0666, so the process umask
    applies as to any new file (mkstemp would make it 0600; run outputs are meant to be shared)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666), tmp
        except FileExistsError:  # another writer drew the same name: draw again
            continue


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


# fields the results do not depend on: the draws are per sample (README "Interruptions and resume"), and the
# decoded-image cache holds the same pixels wherever it lives
NOT_IN_FINGERPRINT = {"num_workers", "cache_dir"}


def stage_fingerprint(*parts) -> str:
    """sha256 of what a stage's result depends on (recipe sections, an upstream fingerprint): a stage whose
    metrics.json carries the same fingerprint is complete and `distill run` skips it.

    A recipe section counts by its values that differ from the defaults (`_set_values`): a version of distill
    that adds a setting, at a default that keeps results as they were, keeps every complete stage complete."""
    blob = json.dumps([_set_values(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _set_values(obj):
    """A dataclass as {field: value} of the fields not at their default (recursively), others as plain data."""
    if not dataclasses.is_dataclass(obj):
        return to_plain(obj)
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in NOT_IN_FINGERPRINT:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # required: always part of it
            out[f.name] = _set_values(value)
            continue
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default) and type(value) is type(default):
            nested = _set_values(value)
            if nested != _set_values(default):
                out[f.name] = nested
        elif to_plain(value) != to_plain(default):
            out[f.name] = _set_values(value)
    return out


def finished(metrics_path: Path, fingerprint: str) -> bool | None:
    """True: complete for this fingerprint; False: complete for another one; None: not complete."""
    try:
        return json.loads(Path(metrics_path).read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return None


def hparams(recipe, section: str, config=None) -> dict:
    """The recipe's common keys and one section (`config`, default the recipe's attribute `section`)
    flattened to `key.path: scalar` (TensorBoard's hparams take scalars and strings only)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    plain = to_plain(recipe)
    walk("", {"name": plain["name"], "seed": plain["seed"], "data": plain["data"],
              section: to_plain(config) if config is not None else plain[section]})
    return flat
