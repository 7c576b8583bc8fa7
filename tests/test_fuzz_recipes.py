"""Hundreds of mutated recipes: each is either valid or ends in one `error:` line and exit 2, never a traceback,
never a half-written run directory."""
import copy
import functools
import random
from pathlib import Path

import pytest
import yaml

from distill import cli
from distill.errors import DistillError
from distill.recipe import load_recipe, recipe_from_dict, to_plain

ROOT = Path(__file__).resolve().parent.parent
# wrong types, negative, zero, absurd sizes, empty containers, null, booleans, odd strings
BAD_VALUES = ["fast", -1, 0, -0.5, 10**12, 1e300, [], {}, None, True, "", [1, 2, 3], {"a": 1}, "../../etc/passwd"]
MISSING_FILES = {
    ("data", "root"): "/nonexistent/train",
    ("data", "val_root"): "/nonexistent/val",
    ("data", "unlabeled"): "/nonexistent/unlabeled",
    ("teacher", "pretrained"): "/nonexistent/weights.safetensors",
    ("teacher", "card"): "/nonexistent/card.yaml",
}


def base_recipe() -> dict:
    """The quickstart fully resolved (every key present), small enough never to train long."""
    return to_plain(load_recipe(ROOT / "recipes" / "quickstart.yaml"))


def leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(node, list) and node and isinstance(node[0], dict):
        for i, v in enumerate(node):
            yield from leaf_paths(v, (*prefix, i))
    else:
        yield prefix


def mapping_paths(node, prefix=()):
    if isinstance(node, dict):
        yield prefix
        for k, v in node.items():
            yield from mapping_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from mapping_paths(v, (*prefix, i))


def set_path(raw, path, value):
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def mutations(seed=0, n=600):
    """(description, mutated recipe dict): wrong values at every leaf, unknown and missing keys, bad files."""
    rng = random.Random(seed)
    base = base_recipe()
    leaves = list(leaf_paths(base))
    out = []
    for path in leaves:  # every key gets a few bad values
        for value in rng.sample(BAD_VALUES, 3):
            raw = copy.deepcopy(base)
            set_path(raw, path, value)
            out.append((f"{'.'.join(map(str, path))}={value!r}", raw))
    for path in mapping_paths(base):  # an unknown key in every section
        raw = copy.deepcopy(base)
        node = raw
        for part in path:
            node = node[part]
        node["unknwn_key"] = 1
        out.append((f"{'.'.join(map(str, path))}.unknwn_key", raw))
    for section in ("data", "teacher", "targets", "students", "log"):  # a section of the wrong type
        for value in ("x", 3, [1]):
            raw = copy.deepcopy(base)
            raw[section] = value
            out.append((f"{section}={value!r}", raw))
    for name in ("name", "model"):  # required keys removed
        raw = copy.deepcopy(base)
        del raw["students"][0][name]
        out.append((f"students.0 without {name}", raw))
    rng.shuffle(out)
    return out[:n]


def test_hundreds_of_mutated_recipes_are_valid_or_one_named_error():
    cases = mutations()
    assert len(cases) >= 400
    errors = 0
    for what, raw in cases:
        try:
            recipe_from_dict(raw)
        except DistillError as e:
            errors += 1
            message = str(e)
            assert "\n" not in message and ": " in message, (what, message)
        except Exception as e:  # noqa: BLE001 - anything else is a crash the user would see as a traceback
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
    assert errors > 0.8 * len(cases)  # most mutations are wrong; the rest (e.g. seed=-1) are fine recipes


@functools.cache
def cli_cases() -> list:
    """The invalid mutations and missing files that go through the CLI, built once for every case."""
    invalid = []
    for what, raw in mutations(seed=1):
        try:
            recipe_from_dict(raw)
        except DistillError:
            invalid.append((what, raw))
    for (section, key), path in MISSING_FILES.items():
        raw = base_recipe()
        raw[section][key] = path
        if key in ("root", "val_root", "unlabeled"):
            raw["data"]["source"] = "imagefolder"
            raw["data"]["root"] = raw["data"]["root"] if key != "root" else path
        invalid.append((f"{section}.{key}={path}", raw))
    return invalid[:19] + invalid[-5:]  # mutations, then every missing file


@pytest.mark.parametrize("case", range(24))
def test_mutated_recipes_through_distill_run(case, tmp_path, capsys):
    """A sample of the invalid mutations and missing files, end to end through `distill run`."""
    what, raw = cli_cases()[case]
    raw = {**raw, "output_dir": str(tmp_path / "runs")}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(recipe)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2, (what, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, err)
    # never a half-written run directory
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*")), (what, sorted(runs.rglob("*")))
