"""Tests for distill.models: building from cards and specs, local weights, save/load, param groups."""
import os

# Nothing here may touch the hub; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import Preprocess
from distill.errors import DistillError
from distill.models import (
    HFClassifier,
    build_model,
    count_params,
    load_model,
    param_groups,
    save_model,
    sha256_file,
)
from distill.recipe import StudentConfig, TeacherConfig, recipe_from_dict

CLASSES = [f"c{i}" for i in range(10)]


def card(name, **teacher):
    return recipe_from_dict({"name": "t", "teacher": {"card": name, **teacher}}).teacher


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name, hf_class", [
    ("tiny-vit", "ViTForImageClassification"),
    ("tiny-beit", "BeitForImageClassification"),
    ("tiny-deit", "DeiTForImageClassificationWithTeacher"),
])
def test_tiny_hf_cards_build_offline(name, hf_class):
    cfg = card(name)
    model, pre = build_model(cfg, 10, classes=CLASSES)
    assert isinstance(model, HFClassifier) and type(model.hf).__name__ == hf_class
    assert model.config.num_labels == 10 and model.config.id2label[3] == "c3"
    assert pre == Preprocess(32, tuple(cfg.mean), tuple(cfg.std), "bicubic", 1.0)
    x = torch.randn(3, 3, 32, 32)
    logits = model.eval()(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    # another resolution (FixRes) works through interpolated position embeddings
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_distilled_deit_logits_average_both_heads():
    model, _ = build_model(card("tiny-deit"), 5)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.hf(pixel_values=x)
    assert torch.allclose(model(x), (out.cls_logits + out.distillation_logits) / 2)


def test_recipe_preprocess_overrides_card():
    _, pre = build_model(card("tiny-vit", input_size=48, crop_pct=0.9, interpolation="bilinear"), 10)
    assert (pre.input_size, pre.crop_pct, pre.interpolation, pre.mean) == (48, 0.9, "bilinear", (0.5, 0.5, 0.5))


def test_hf_config_without_card_uses_image_size_and_imagenet_defaults():
    cfg = TeacherConfig(model="hf:vit", pretrained=False, hf_config={
        "model_type": "vit", "image_size": 40, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64})
    model, pre = build_model(cfg, 4)
    assert pre.input_size == 40 and pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 4)


def test_hf_config_of_a_model_type_without_architectures_builds_its_classifier():
    """transformers 5's AutoModelForImageClassification.from_config fails on a DeiT config that names no
    architecture; the model type's own classifier is used instead."""
    cfg = TeacherConfig(model="hf:deit", pretrained=False, hf_config={
        "model_type": "deit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64})
    model, _ = build_model(cfg, 3)
    assert type(model.hf).__name__ == "DeiTForImageClassification"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_hf_local_dir_reads_its_preprocessor_and_replaces_the_head(tmp_path):
    import transformers

    config = transformers.AutoConfig.for_model(
        "deit", image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=5, architectures=["DeiTForImageClassificationWithTeacher"])
    src = transformers.DeiTForImageClassificationWithTeacher(config)
    src.save_pretrained(tmp_path)
    transformers.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5] * 3, image_std=[0.25] * 3, resample=2).save_pretrained(tmp_path)
    model, pre = build_model(TeacherConfig(model=f"hf:{tmp_path}", pretrained=True), 3, classes=["a", "b", "c"])
    assert pre == Preprocess(32, (0.5,) * 3, (0.25,) * 3, "bilinear", 0.8)
    assert type(model.hf) is type(src) and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert torch.equal(model.hf.deit.embeddings.cls_token, src.deit.embeddings.cls_token)
    assert model.hf.cls_classifier.weight.shape == (3, 32) and model.config.id2label[2] == "c"


def test_timm_model_builds_with_timm_preprocess():
    import timm
    import timm.data

    cfg = StudentConfig(name="s", model="timm:resnet10t", timm_kwargs={"drop_rate": 0.1})
    model, pre = build_model(cfg, 7, where="students.0")
    ref = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t"))
    assert pre == Preprocess(ref["input_size"][-1], ref["mean"], ref["std"], ref["interpolation"], ref["crop_pct"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model.drop_rate == 0.1
    _, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=96, mean=(0.5, 0.5, 0.5)), 7)
    assert (pre.input_size, pre.mean, pre.std) == (96, (0.5, 0.5, 0.5), ref["std"])


def _same_outputs(a, b, size):
    x = torch.randn(4, 3, size, size)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("cfg", [card("tiny-beit"), StudentConfig(name="s", model="timm:mobilenetv3_small_050")],
                         ids=["hf", "timm"])
def test_save_load_round_trip(tmp_path, cfg):
    model, pre = build_model(cfg, 10, classes=CLASSES)
    with torch.no_grad():  # move BatchNorm statistics off their defaults so buffers are checked too
        model.train()(torch.randn(4, 3, 32, 32))
    info = save_model(model, pre, tmp_path / "m", CLASSES, extra={"epoch": 3})
    # distill's own files, and the timm / transformers config and the model card beside them
    assert {"model.json", "model.safetensors", "config.json", "README.md"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert info["sha256"] == sha256_file(tmp_path / "m" / "model.safetensors")

    loaded, pre2, info2 = load_model(tmp_path / "m")
    assert pre2 == pre and info2["classes"] == CLASSES and info2["extra"] == {"epoch": 3}
    assert info2["num_classes"] == 10 and info2["params"] == count_params(model)
    assert type(loaded) is type(model) and _same_outputs(model, loaded, 32)
    if isinstance(loaded, HFClassifier):
        assert loaded.config.id2label[9] == "c9"
    # a reloaded model saves again (fine-tune → save → load → save)
    save_model(loaded, pre2, tmp_path / "m2", CLASSES)
    assert _same_outputs(model, load_model(tmp_path / "m2")[0], 32)


def test_load_model_rejects_missing_and_damaged_dirs(tmp_path):
    with pytest.raises(DistillError, match="no model.json"):
        load_model(tmp_path / "nothing")
    model, pre = build_model(card("tiny-vit"), 10)
    save_model(model, pre, tmp_path / "m", CLASSES)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DistillError, match="sha256"):
        load_model(tmp_path / "m")


def test_pretrained_checkpoint_dir_loads_and_checks_class_count(tmp_path):
    model, pre = build_model(card("tiny-vit"), 7)
    save_model(model, pre, tmp_path / "ckpt", [f"k{i}" for i in range(7)])
    again, _ = build_model(card("tiny-vit", pretrained=str(tmp_path / "ckpt")), 7)
    assert _same_outputs(model, again, 32)
    with pytest.raises(DistillError) as e:
        build_model(card("tiny-vit", pretrained=str(tmp_path / "ckpt")), 10)
    assert "teacher.pretrained" in str(e.value) and "7 classes" in str(e.value) and "has 10" in str(e.value)


def test_pretrained_file_drops_mismatched_head_and_loads_the_rest(tmp_path):
    import timm

    src = timm.create_model("resnet10t", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    model, _ = build_model(StudentConfig(name="s", model="timm:resnet10t", pretrained=str(tmp_path / "w.pth")), 10)
    assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)
    assert model.fc.weight.shape == (10, 512)

    wrong = timm.create_model("resnet14t", num_classes=10)
    torch.save(wrong.state_dict(), tmp_path / "other.pth")
    with pytest.raises(DistillError, match=r"teacher\.pretrained: .*other\.pth does not fit.*unexpected"):
        build_model(TeacherConfig(model="timm:resnet10t", pretrained=str(tmp_path / "other.pth")), 10)


@pytest.mark.parametrize("cfg, message", [
    (TeacherConfig(model="timm:resnet10"), r"teacher\.model: unknown timm model 'resnet10'.*resnet10t"),
    (TeacherConfig(model="torch:resnet18"), r"teacher\.model: expected 'hf:"),
    (TeacherConfig(model="timm:resnet10t", pretrained="/no/such/weights.pth"),
     r"teacher\.pretrained: /no/such/weights\.pth not found"),
    (TeacherConfig(model="timm:resnet10t", pretrained="pkg:no_such_weights_package"),
     r"teacher\.pretrained: package 'no_such_weights_package' is not installed"),
    (TeacherConfig(model="timm:resnet10t", timm_kwargs={"no_such_arg": 1}), r"teacher\.timm_kwargs"),
    (TeacherConfig(model="hf:nobody-here/no-such-model", pretrained=True), r"teacher\.model: cannot load"),
    (TeacherConfig(model="timm:resnet10t", pretrained=True), r"teacher\.pretrained: cannot download"),
])
def test_bad_specs_raise_distill_error(cfg, message):
    with pytest.raises(DistillError, match=message):
        build_model(cfg, 10)


def test_param_groups_hf_layer_decay():
    model, _ = build_model(card("tiny-vit"), 10)
    by_name = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for g in param_groups(model, 0.05, 0.5):
        for p in g["params"]:
            scale[by_name[id(p)]], decay[by_name[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert len(scale) == len(by_name)
    emb = [n for n in scale if ".embeddings." in n]
    assert emb and all(scale[n] == 0.5 ** 3 for n in emb)
    assert {scale[n] for n in scale if ".layers.0." in n or ".encoder.layer.0." in n} == {0.5 ** 2}
    assert {scale[n] for n in scale if ".layers.1." in n or ".encoder.layer.1." in n} == {0.5}
    assert scale["hf.classifier.weight"] == scale["hf.classifier.bias"] == 1.0
    for name, wd in decay.items():
        no_decay = name.endswith("bias") or "norm" in name or "cls_token" in name or "position" in name
        assert wd == (0.0 if no_decay else 0.05), name
    assert all(g["lr_scale"] == 1.0 for g in param_groups(model, 0.05, None))


def test_param_groups_timm():
    model, _ = build_model(StudentConfig(name="s", model="timm:resnet10t"), 10)
    groups = param_groups(model, 0.1, None)
    assert all(g["lr_scale"] == 1.0 for g in groups)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.fc.bias) in no_decay and id(model.bn1.weight) in no_decay
    assert id(model.fc.weight) not in no_decay
    scales = {g["lr_scale"] for g in param_groups(model, 0.1, 0.5)}
    assert max(scales) == 1.0 and min(scales) < 0.1


def _chelsea(pre: Preprocess) -> torch.Tensor:
    """skimage's cat photo the eval way: shorter side to size/crop_pct, center crop, normalise."""
    from skimage.data import chelsea

    img = Image.fromarray(chelsea())
    resize = round(pre.input_size / pre.crop_pct)
    w, h = img.size
    img = img.resize((round(w * resize / min(w, h)), round(h * resize / min(w, h))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - pre.input_size) // 2, (h - pre.input_size) // 2
    img = img.crop((left, top, left + pre.input_size, top + pre.input_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(pre.mean)[:, None, None]) / torch.tensor(pre.std)[:, None, None])[None]


def test_efficientnet_lite0_card_real_imagenet_weights():
    model, pre = build_model(card("efficientnet-lite0"), 1000)
    assert pre == Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    x = _chelsea(pre)
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    assert int(probs.argmax()) in {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(probs[281:286].sum()) > 0.5

    # 10 classes: the ImageNet head is dropped, everything else is the same network
    small, _ = build_model(card("efficientnet-lite0"), 10)
    assert small.classifier.weight.shape == (10, 1280)
    with torch.no_grad():
        assert torch.equal(small.eval().forward_features(x), model.forward_features(x))


# --- sources: one dict of adapters ---------------------------------------------------------------
def test_sources_are_one_dict_keyed_by_the_spec_prefix():
    from distill.models.sources import SOURCES, source_named, source_of

    assert list(SOURCES) == ["hf", "timm"]
    assert source_named("timm:resnet10t", "students.0") == (SOURCES["timm"], "resnet10t")
    assert source_named("hf:org/model:v2", "teacher") == (SOURCES["hf"], "org/model:v2")
    for bad in ("torch:resnet18", "timm:", "resnet18"):
        with pytest.raises(DistillError, match=r"students\.1\.model: expected 'hf:<hub id or dir>' or 'timm:<name>'"):
            source_named(bad, "students.1")
    model, _ = build_model(card("tiny-vit"), 3)
    assert source_of(model) is SOURCES["hf"]
    assert source_of(build_model(StudentConfig(name="s", model="timm:resnet10t"), 3)[0]) is SOURCES["timm"]
    assert source_of(torch.nn.Linear(2, 2)) is None and source_of(torch.nn.Linear(2, 2), "timm") is SOURCES["timm"]


class ToyNet(torch.nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.features = torch.nn.Conv2d(3, width, 3, padding=1)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ToySource:
    """A model source as a new module would add it: `toy:<width>`."""

    usage = "toy:<width>"

    @staticmethod
    def owns(model):
        return isinstance(model, ToyNet)

    @staticmethod
    def check(ident, where):
        if not ident.isdigit():
            raise DistillError(f"{where}.model: toy width {ident!r} is not a number")

    @staticmethod
    def build(ident, cfg, num_classes, where, classes):
        ToySource.check(ident, where)
        model = ToyNet(int(ident), num_classes)
        model.distill_spec = {"source": "toy", "width": int(ident)}
        return model, Preprocess(16, (0.5,) * 3, (0.5,) * 3)

    @staticmethod
    def describe(model, classes):
        return {}

    @staticmethod
    def rebuild(info):
        model = ToyNet(info["width"], info["num_classes"])
        model.distill_spec = {"source": "toy", "width": info["width"]}
        return model

    @staticmethod
    def num_classes(model):
        return model.head.out_features

    @staticmethod
    def head_keys(model, own):
        return {k for k in own if k.startswith("head.")}

    @staticmethod
    def param_groups(model, weight_decay, layer_decay, where):
        return [{"params": list(model.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0}]

    @staticmethod
    def cam_target(model, input_size, what):
        from distill.models.cam import Target

        return Target(model.features, "features", "NCHW")


def test_a_new_source_is_its_adapter_plus_one_dict_entry(tmp_path, monkeypatch):
    """Everything source-specific goes through the adapter: build, check, local weights (head), save/load,
    param groups and the Grad-CAM layer."""
    from distill.explain import find_target
    from distill.models import check_model_name
    from distill.models.sources import SOURCES

    monkeypatch.setitem(SOURCES, "toy", ToySource)
    model, pre = build_model(TeacherConfig(model="toy:8", input_size=24), 4, classes=CLASSES[:4])
    assert pre.input_size == 24 and model.distill_spec == {"source": "toy", "width": 8, "model": "toy:8"}
    with pytest.raises(DistillError, match=r"teacher\.model: toy width 'x'"):
        check_model_name("toy:x", "teacher")
    info = save_model(model, pre, tmp_path / "toy", CLASSES[:4])
    assert (info["source"], info["width"], info["num_classes"]) == ("toy", 8, 4)
    loaded, pre2, _ = load_model(tmp_path / "toy")
    assert pre2 == pre and _same_outputs(model, loaded, 24)
    # weights for other classes: the head is dropped, the rest loads
    torch.save(model.state_dict(), tmp_path / "toy.pth")
    again, _ = build_model(TeacherConfig(model="toy:8", pretrained=str(tmp_path / "toy.pth")), 6)
    assert torch.equal(again.features.weight, model.features.weight) and again.head.out_features == 6
    assert param_groups(model, 0.1, None)[0]["weight_decay"] == 0.1
    assert find_target(model, 16).map_size == (16, 16)


# --- model folders describe their eval transform -------------------------------------------------
AUGMENT = [{"name": "Resize", "height": "input_size", "width": "input_size"}]


def _same_transform(a, b, pre=None) -> bool:
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    return torch.equal(a(image), b(image))


def test_model_json_keeps_the_eval_transform(tmp_path):
    from distill.data import build_transform
    from distill.models import load_for_eval

    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=32, crop_pct=0.8), 10)
    assert save_model(model, pre, tmp_path / "plain", CLASSES)["eval_augment"] is None
    save_model(model, pre, tmp_path / "aug", CLASSES, eval_augment=AUGMENT)
    default, resized = build_transform(None, "eval", pre), build_transform(AUGMENT, "eval", pre)
    assert not _same_transform(default, resized, pre)
    for name, expected in (("plain", default), ("aug", resized)):
        loaded, pre2, _, transform = load_for_eval(tmp_path / name)
        assert pre2 == pre and not loaded.training and _same_transform(transform, expected, pre)
    assert load_for_eval(tmp_path / "aug")[2]["eval_augment"] == AUGMENT


def test_an_ensemble_keeps_its_eval_transform(tmp_path):
    from distill.data import build_transform
    from distill.models import Ensemble, load_for_eval, save_ensemble

    for i in range(2):
        model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=32), 10)
        save_model(model, pre, tmp_path / f"m{i}", CLASSES)
    info = save_ensemble(tmp_path / "ens", [tmp_path / "m0", tmp_path / "m1"], "probs", CLASSES, eval_augment=AUGMENT)
    assert info["eval_augment"] == AUGMENT
    model, pre2, _, transform = load_for_eval(tmp_path / "ens")
    assert isinstance(model, Ensemble) and _same_transform(transform, build_transform(AUGMENT, "eval", pre2), pre2)


def test_folders_from_before_eval_augment_are_evaluated_as_then(tmp_path):
    """No `eval_augment` in model.json: a run's teacher (and the folders inside teacher/) with the recipe's
    teacher.augment.eval, everything else with the default eval transform."""
    import json

    from distill.data import build_transform
    from distill.models import load_for_eval
    from distill.recipe import dump_recipe, recipe_from_dict

    run = tmp_path / "run"
    recipe = recipe_from_dict({"name": "run", "teacher": {"model": "timm:resnet10t", "augment": {"eval": AUGMENT}}})
    run.mkdir()
    (run / "config.yaml").write_text(dump_recipe(recipe))
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=32, crop_pct=0.8), 10)
    folders = {"teacher": True, "teacher/fold-0": True, "students/s": False, "students/teacher": False}
    for folder in folders:
        save_model(model, pre, run / folder, CLASSES)
        info = json.loads((run / folder / "model.json").read_text())
        del info["eval_augment"]
        (run / folder / "model.json").write_text(json.dumps(info))
    save_model(model, pre, tmp_path / "teacher", CLASSES)  # a teacher/ outside any run: no recipe beside it
    (tmp_path / "teacher" / "model.json").write_text(json.dumps(info))
    default, resized = build_transform(None, "eval", pre), build_transform(AUGMENT, "eval", pre)
    for folder, teacher in folders.items():
        transform = load_for_eval(run / folder)[3]
        assert _same_transform(transform, resized if teacher else default, pre), folder
    assert _same_transform(load_for_eval(tmp_path / "teacher")[3], default, pre)
