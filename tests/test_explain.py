"""Tests for distill.explain: Grad-CAM localises, its layer per architecture, and `distill explain` end to end."""
import os

# Nothing here may touch the hub; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from distill.data import FASHION_MNIST_CLASSES
from distill.errors import DistillError
from distill.explain import find_target, grad_cam, main, spread_over_classes
from distill.models import build_model, save_model
from distill.recipe import dump_recipe, recipe_from_dict


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- Grad-CAM localises ------------------------------------------------------------------------
class BarDetector(nn.Module):
    """A hand-built timm-style CNN: class 0 = "there is a horizontal bar", class 1 = "a vertical bar".

    Channel 0 of its feature map fires on horizontal lines, channel 1 on vertical ones; the head averages each
    channel into its class's logit. Nothing in it knows where a bar is, so a map that finds the bar found it
    from the activations and gradients alone.
    """

    def __init__(self):
        super().__init__()
        line = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0], self.conv.weight[1, 0] = line, line.T
        self.features = nn.Sequential(self.conv, nn.ReLU(), nn.MaxPool2d(4))  # 32 px → an 8x8 map

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return f.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def quadrant_mass(cam: torch.Tensor) -> torch.Tensor:
    """Share of the map in each quadrant: top-left, top-right, bottom-left, bottom-right."""
    h, w = cam.shape[-2] // 2, cam.shape[-1] // 2
    parts = [cam[..., :h, :w], cam[..., :h, w:], cam[..., h:, :w], cam[..., h:, w:]]
    mass = torch.stack([p.sum(dim=(-2, -1)) for p in parts], dim=-1)
    return mass / mass.sum(-1, keepdim=True)


def test_grad_cam_finds_the_evidence_for_each_class():
    # a horizontal bar top-right and a vertical bar bottom-right, on faint noise: each class's map must sit on its
    # own bar (top-right and bottom-right are not each other's transpose, so a swapped h/w is caught too)
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(2, 3, 32, 32, generator=g)
    x[:, :, 6, 20:30] += 1.0
    x[:, :, 20:30, 24] += 1.0
    model = BarDetector().eval()
    target = find_target(model, 32)
    assert target.name == "features" and target.map_size == (8, 8)
    cam, logits = grad_cam(model, x, target, torch.tensor([0, 1]))
    assert cam.shape == (2, 32, 32) and logits.shape == (2, 2)
    share = quadrant_mass(cam)
    assert share[0].argmax() == 1 and share[0, 1] > 0.5, share[0]  # horizontal: top-right
    assert share[1].argmax() == 3 and share[1, 3] > 0.5, share[1]  # vertical: bottom-right
    # and the peak is on the bar itself
    assert abs(int(cam[0].argmax()) // 32 - 6) <= 3 and abs(int(cam[1].argmax()) % 32 - 24) <= 3
    # by default the predicted class is explained: with only the vertical bar, that is class 1, bottom-right
    only_vertical = x.clone()
    only_vertical[:, :, 6, 20:30] -= 1.0
    cam, logits = grad_cam(model, only_vertical, target)
    assert (logits.argmax(1) == 1).all() and (quadrant_mass(cam).argmax(-1) == 3).all()


# --- the target layer per architecture ---------------------------------------------------------
def _check_maps(model, size, batch=3):
    target = find_target(model.eval(), size, "test")
    cam, logits = grad_cam(model, torch.randn(batch, 3, size, size), target)
    assert cam.shape == (batch, size, size) and logits.shape[0] == batch
    assert cam.min() >= 0 and cam.max() <= 1 and torch.isfinite(cam).all()
    assert (cam.amax(dim=(1, 2)) == 1).all(), "a random model still has some evidence somewhere"
    return target


def test_timm_cnn_uses_the_last_map_or_a_finer_stage_when_it_is_1x1():
    model = timm.create_model("resnet10t", num_classes=10)
    assert _check_maps(model, 64).name == "layer4"
    target = _check_maps(model, 32)  # layer4 is 1x1 at 32 px: no location left
    assert (target.name, target.map_size) == ("layer3", (2, 2))
    # finding the layer leaves a training model as it was: still training, BatchNorm statistics untouched
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.train()
    stats = bn.running_mean.clone()
    find_target(model, 32)
    assert model.training and torch.equal(bn.running_mean, stats)


def test_timm_vit_reads_the_patch_tokens_before_the_last_block():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    target = _check_maps(model, 32)
    assert (target.name, target.layout, target.map_size) == ("blocks.1.norm1", "tokens", (4, 4))
    # why not the last block's output: a class-token head gives its patch tokens no gradient at all
    seen = []
    handle = model.blocks[-1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    logits = model(torch.randn(1, 3, 32, 32, requires_grad=True))
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, 0], seen[0])
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().max() > 0


@pytest.mark.parametrize("hf_config", [
    {"model_type": "vit"},
    # two prefix tokens (class + distillation) before the patch grid
    {"model_type": "deit", "architectures": ["DeiTForImageClassificationWithTeacher"]},
])
def test_hf_vit_maps(hf_config):
    from distill.recipe import TeacherConfig

    cfg = TeacherConfig(model="hf:tiny", pretrained=False, hf_config={
        **hf_config, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64,
        "num_attention_heads": 2, "intermediate_size": 128})
    model, pre = build_model(cfg, 10)
    target = _check_maps(model, pre.input_size)
    assert target.name.endswith("layers.1.layernorm_before") and target.map_size == (4, 4)
    assert _check_maps(model, 48).map_size == (6, 6)  # another resolution (FixRes): the grid follows


def test_a_model_without_a_known_layer_is_an_error_naming_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(DistillError, match=r"students\.0: Grad-CAM cannot explain Sequential"):
        find_target(model, 8, "students.0")


def test_images_spread_over_classes_one_per_class_first():
    labels = np.array([2, 2, 0, 1, 0, 2, 1])
    assert spread_over_classes(labels, 4) == [2, 3, 0, 4]
    assert spread_over_classes(labels, 100) == [2, 3, 0, 4, 6, 1, 5]


# --- `distill explain` end to end --------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with random-weight models: an HF ViT teacher, two timm students, one with FixRes."""
    root = tmp_path_factory.mktemp("runs")
    student = {"resolution": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    recipe = recipe_from_dict({
        "name": "tiny", "output_dir": str(root), "data": {"source": "fashion-mnist", "subset": 20},
        "teacher": {"card": "tiny-vit"},
        "students": [{"name": "r10", "model": "timm:resnet10t", **student},
                     {"name": "mnv3", "model": "timm:mobilenetv3_small_050", **student}]})
    run = recipe.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(recipe))
    classes = FASHION_MNIST_CLASSES
    model, pre = build_model(recipe.teacher, 10, classes=classes)
    save_model(model, pre, run / "teacher", classes)
    for i, s in enumerate(recipe.students):
        model, pre = build_model(s, 10, where=f"students.{i}")
        save_model(model, pre, run / "students" / s.name, classes)
        if s.name == "r10":
            save_model(model, pre, run / "students" / s.name / "fixres", classes)
    return run


def test_explain_writes_pngs_json_and_tensorboard(run_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main([str(run_dir), "--count", "3", "--fixres"])
    out = run_dir / "explain"
    summary = json.loads((out / "explain.json").read_text())
    roles = ["teacher", "mnv3", "r10", "r10+fixres"]
    assert list(summary["models"]) == roles and summary["cam_class"] == "predicted"
    assert summary["models"]["teacher"]["layer"] == "hf.vit.layers.1.layernorm_before"
    assert summary["models"]["r10"]["layer"] == "layer3"
    images = summary["images"]
    assert len(images) == 3 and len({r["label"] for r in images}) == 3  # one per class first
    widths = set()
    for r in images:
        assert r["path"].startswith("fashion-mnist:test:") and r["label"] in FASHION_MNIST_CLASSES
        assert list(r["models"]) == roles
        for p in r["models"].values():
            assert p["predicted"] in FASHION_MNIST_CLASSES and 0 < p["confidence"] <= 1
            assert p["cam_class"] == p["predicted"]
        with Image.open(out / r["png"]) as png:
            widths.add(png.size[0])
    assert len(widths) == 1 and (out / "grid.png").is_file()
    printed = capsys.readouterr().out
    assert "written:" in printed and str(out / "explain.json") in printed

    events = EventAccumulator(str(run_dir / "tb" / "explain"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"explain/grid", *(f"explain/val{r['index']:05d}" for r in images)} <= set(tags["images"])
    row = events.Images(f"explain/val{images[0]['index']:05d}")[0]
    with Image.open(out / images[0]["png"]) as png:
        assert (row.width, row.height) == png.size
    assert any("captions" in t for t in tags["tensors"])


def test_explain_given_images_one_student_true_class(run_dir, tmp_path):
    out = tmp_path / "cams"
    main([str(run_dir), "--images", "4,0", "--student", "r10", "--class", "label", "--out", str(out)])
    summary = json.loads((out / "explain.json").read_text())
    assert list(summary["models"]) == ["teacher", "r10"]
    assert [r["index"] for r in summary["images"]] == [4, 0]
    for r in summary["images"]:
        assert all(p["cam_class"] == r["label"] for p in r["models"].values())
        assert (out / r["png"]).is_file()


@pytest.mark.parametrize("args, message", [
    (["--images", "0,20"], "--images: index 20 is out of range; the validation split has 20 images"),
    (["--images", "a"], "--images: expected comma-separated image indices"),
    (["--student", "nope"], "--student nope: no saved student of that name in .*students; students: mnv3, r10"),
])
def test_bad_arguments_are_one_error_line(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_no_teacher_is_an_error(run_dir, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no trained teacher" in capsys.readouterr().err


def test_not_a_run_dir_exits_2_with_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "distill.cli", "explain", str(tmp_path / "nope")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = (f"error: {tmp_path / 'nope'}: not a run directory (no config.yaml); give runs/<name> as written "
                "by distill run / teach")
    assert errors == [expected]
    assert "Traceback" not in result.stderr
