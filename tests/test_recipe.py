"""Recipes: strict validation with key paths, overrides, cards, and a resolved dump that reloads."""
import dataclasses

import pytest
import yaml

from distill.errors import DistillError
from distill.recipe import apply_override, dump_recipe, load_recipe, recipe_from_dict

BASE = {"name": "t", "teacher": {"model": "timm:resnet10t"}}


def _with(**teacher):
    return {"name": "t", "teacher": {"model": "timm:resnet10t", **teacher}}


def _error(raw) -> str:
    with pytest.raises(DistillError) as e:
        recipe_from_dict(raw)
    return str(e.value)


def test_defaults_and_types():
    r = recipe_from_dict(_with(optim={"lr": 3e-4, "betas": [0.9, 0.95]}, epochs=2))
    assert r.teacher.optim.lr == 3e-4 and r.teacher.optim.betas == (0.9, 0.95)
    assert r.teacher.epochs == 2 and r.data.source == "fashion-mnist" and r.students == []
    assert str(r.run_dir) == "runs/t"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.teacher.epochs = 3


@pytest.mark.parametrize("raw, message", [
    (_with(optim={"lr": "fast"}), "teacher.optim.lr: expected a positive number, got 'fast'"),
    (_with(optim={"lr": -1}), "teacher.optim.lr: expected a positive number, got -1"),
    (_with(epoch=3), "teacher.epoch: unknown key; did you mean 'epochs'?"),
    (_with(epochs=2.5), "teacher.epochs: expected an integer in [1, 100000], got 2.5"),
    (_with(epochs=True), "teacher.epochs: expected an integer in [1, 100000], got True"),
    (_with(mixed_precision="fp8"), "teacher.mixed_precision: expected one of 'no', 'fp16', 'bf16' or null"),
    (_with(mean=[0.5, 0.5]), "teacher.mean: expected a list of 3 numbers"),
    (_with(label_smoothing=1.0), "teacher.label_smoothing: expected a number in [0, 1), got 1.0"),
    ({**BASE, "data": {"val_fraction": 1.5}}, "data.val_fraction: expected a number in (0, 1), got 1.5"),
    ({**BASE, "data": {"source": "mnist"}}, "data.source: expected one of 'fashion-mnist', 'digits'"),
    ({**BASE, "dta": {}}, "dta: unknown key; did you mean 'data'?"),
    ({**BASE, "students": [{"name": "a", "model": "timm:x"}, {"name": "a", "model": "timm:y"}]},
     "students.1.name: 'a' is used twice"),
    ({**BASE, "students": [{"model": "timm:x"}]}, "students.0.name: missing (required)"),
    ({"name": "t", "teacher": {"model": "resnet"}}, "teacher.model: expected 'hf:<hub id or dir>' or 'timm:<name>'"),
    (_with(augment={"train": [{"p": 0.5}]}), "teacher.augment.train.0: expected a mapping with 'name:"),
    ({**BASE, "students": [{"name": "a", "model": "timm:x", "fixres": {"resolution": 32, "crop_pct": 0.875}}]},
     "students.0.fixres.crop_pct: 0.875 differs from the store's center view (targets.center_crop_pct: 1.0)"),
])
def test_errors_name_the_key(raw, message):
    assert message in _error(raw)


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads 2e-3 as a string; a user writing it means a number
    assert recipe_from_dict(_with(optim={"lr": "2e-3"})).teacher.optim.lr == 0.002


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "timm:resnet10t", "epochs": 5},
                                    "students": [{"name": "small", "model": "timm:resnet10t"}]}))
    r = load_recipe(path, ["teacher.epochs=3", "teacher.optim.lr=0.1", "data.subset=100",
                           "students.small.resolution=64", "students.0.pretrained=true"])
    assert r.name == "r"  # from the file name
    assert r.teacher.epochs == 3 and r.teacher.optim.lr == 0.1 and r.data.subset == 100
    assert r.students[0].resolution == 64 and r.students[0].pretrained is True
    with pytest.raises(DistillError, match="teacher.epochs: expected an integer"):
        load_recipe(path, ["teacher.epochs=many"])
    with pytest.raises(DistillError, match="expected key.path=value"):
        load_recipe(path, ["teacher.epochs"])
    with pytest.raises(DistillError, match="students.big"):
        load_recipe(path, ["students.big.resolution=3"])


def test_override_unknown_key_is_an_error():
    raw = dict(BASE)
    apply_override(raw, "teacher.optim.lrr=1")
    with pytest.raises(DistillError, match="teacher.optim.lrr: unknown key; did you mean 'lr'"):
        recipe_from_dict(raw)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DistillError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {model: [\n")
    with pytest.raises(DistillError, match="bad.yaml: line .* is not valid YAML"):
        load_recipe(bad)


def test_card_is_merged_and_recipe_wins():
    r = recipe_from_dict({"name": "t", "teacher": {"card": "tiny-vit", "input_size": 48,
                                                  "hf_config": {"num_hidden_layers": 1}}})
    assert r.teacher.model.startswith("hf:") and r.teacher.input_size == 48
    assert r.teacher.hf_config["num_hidden_layers"] == 1
    assert r.teacher.hf_config["model_type"] == "vit"  # the rest of the card's hf_config stays
    assert "teacher.card: no card 'nope'" in _error({"name": "t", "teacher": {"card": "nope"}})


def test_resolved_dump_reloads_to_the_same_recipe(tmp_path):
    r = recipe_from_dict({"name": "t", "teacher": {"card": "tiny-vit", "mix": {"mixup_alpha": 0.2}},
                          "students": [{"name": "s", "model": "timm:resnet10t"}]})
    path = tmp_path / "config.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r


def test_every_shipped_recipe_loads():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "recipes"
    paths = sorted(root.rglob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        load_recipe(path)
    quick = load_recipe(root / "quickstart.yaml")
    kinds = {s.name: s for s in quick.students}
    assert kinds["baseline"].kd.loss == "none" and kinds["kd"].kd.loss != "none"
    assert kinds["kd"].mix.cutmix_alpha > 0 and kinds["kd"].fixres is not None
    assert quick.teacher.card == "efficientnet-lite0"  # real weights that work offline


def test_every_card_loads_and_setup_cfg_installs_every_package():
    import configparser
    from pathlib import Path

    from distill.recipe import card_names, load_card

    assert {"beit-base", "tiny-vit", "efficientnet-lite0"} <= set(card_names())
    for name in card_names():
        assert load_card(name)["model"].partition(":")[0] in ("hf", "timm")
    # setup.cfg lists its packages (distill.teachers is the top-level teachers/ folder, which find: cannot see):
    # a sub-package missing from the list would be missing from a non-editable install
    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "distill").rglob("__init__.py")}
    assert on_disk | {"distill.teachers"} == listed
    assert (root / "teachers" / "README.md").is_file()
