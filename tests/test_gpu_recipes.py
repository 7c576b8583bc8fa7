"""recipes/gpu/*: each parses, and its teacher and students build from config and run, with nothing downloaded.

The hub teachers' configs cannot be fetched offline, so `AutoConfig.from_pretrained` answers with the
transformers defaults of the model family, which are the base/16 at 224 px architectures the cards name;
every model is built with random weights (`pretrained: false`)."""
from pathlib import Path

import pytest
import torch

from distill.data import build_transform
from distill.fixres import fixres_parts
from distill.models import build_model, count_params, param_groups
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes" / "gpu").glob("*.yaml"))
CLASSES = [f"class{i}" for i in range(7)]


@pytest.fixture
def offline_hub_configs(monkeypatch):
    import transformers

    def from_pretrained(ident, **kwargs):
        family = next(f for f in ("beit", "deit", "vit") if f"/{f}-" in ident)
        config = transformers.AutoConfig.for_model(family)
        if "distilled" in ident:
            config.architectures = ["DeiTForImageClassificationWithTeacher"]
        return config

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)


def test_there_are_three_gpu_recipes():
    assert {p.stem for p in RECIPES} == {"beit-resnet50", "deit-mobilenetv3", "vit-efficientnet-b0"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_builds_offline(path, offline_hub_configs):
    students = range(len(load_recipe(path).students))
    recipe = load_recipe(path, ["teacher.pretrained=false", *(f"students.{i}.pretrained=false" for i in students)])
    assert recipe.data.source == "imagefolder" and recipe.teacher.model.startswith("hf:")
    assert recipe.teacher.mixed_precision == "bf16" and recipe.teacher.input_size == 224

    teacher, pre = build_model(recipe.teacher, len(CLASSES), classes=CLASSES)
    assert 80e6 < count_params(teacher) < 95e6  # a base/16 ViT
    groups = param_groups(teacher, recipe.teacher.optim.weight_decay, recipe.teacher.optim.layer_decay)
    assert min(g["lr_scale"] for g in groups) < 0.05  # layer decay reaches the embeddings
    build_transform(recipe.teacher.augment.train, "train", pre, where="teacher.augment.train")
    with torch.inference_mode():
        assert teacher.eval()(torch.randn(1, 3, 224, 224)).shape == (1, len(CLASSES))

    families = {"resnet50", "mobilenetv3_large_100", "efficientnet_b0"}
    assert any(s.model.removeprefix("timm:") in families for s in recipe.students)
    assert any(s.fixres is not None for s in recipe.students)
    for i, student in enumerate(recipe.students):
        assert student.resolution == 224
        model, spre = build_model(student, len(CLASSES), where=f"students.{i}", classes=CLASSES)
        assert spre.input_size == 224
        sizes = [224] + ([student.fixres.resolution] if student.fixres else [])
        if student.fixres:
            assert 256 <= student.fixres.resolution <= 288
            trained, norms = fixres_parts(model, student.fixres.train_last_block, f"students.{i}")
            assert model.get_classifier() in trained and norms
        with torch.inference_mode():
            for size in sizes:
                assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, len(CLASSES))
