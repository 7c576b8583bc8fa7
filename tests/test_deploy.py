"""distill deploy: a random-weight resnet10t and a tiny HF ViT as ONNX graphs taking images, checked against PyTorch
with ONNX Runtime at batch 1 and 5 (uint8 and float input), deploy.json, compare's ort_* columns, and the errors."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from distill import deploy
from distill.deploy import compare_logits, deployed_speed, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

VIT = {"model_type": "vit", "image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "hidden_size": 64,
       "num_attention_heads": 2, "intermediate_size": 128}


def fake_metrics(model_dir, model):
    """The metrics.json fields `distill compare` reads (values made up: compare only shows them)."""
    (model_dir / "metrics.json").write_text(json.dumps(
        {"model": model, "resolution": 32, "top1": 0.1, "macro_f1": 0.1, "nll": 2.3, "ece": 0.1, "params": 1000,
         "wall_seconds": 60.0, "kd_loss": "kl", "temperature": 4.0, "kd_weight": 0.5, "label_smoothing": 0.0}))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A run dir (config.yaml: digits, 30 val images) with a random-weight resnet10t student `r10` and a copy of
    it, `plain`, never deployed; outside any run a tiny ViT and 9 real digit images as 32 px PNGs."""
    from sklearn.datasets import load_digits

    from distill.data import load_splits
    from distill.models import build_model, save_model
    from distill.recipe import StudentConfig, TeacherConfig, dump_recipe, recipe_from_dict

    root = tmp_path_factory.mktemp("deploy")
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    recipe = recipe_from_dict({"name": "tiny", "teacher": {"model": "timm:resnet10t"},
                               "data": {"source": "digits", "subset": 30}})
    (run / "config.yaml").write_text(dump_recipe(recipe))
    classes = load_splits(recipe.data)[1].classes
    torch.manual_seed(0)
    model, pre = build_model(StudentConfig(name="r10", model="timm:resnet10t", resolution=32), len(classes),
                             where="students.0", classes=classes)
    for name in ("r10", "plain"):
        save_model(model, pre, run / "students" / name, classes)
        fake_metrics(run / "students" / name, "timm:resnet10t")
    model, pre = build_model(TeacherConfig(model="hf:tiny-vit", pretrained=False, hf_config=VIT), len(classes),
                             classes=classes)
    save_model(model, pre, root / "vit", classes)
    digits = load_digits()
    for label in range(3):
        (root / "images" / str(label)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == label)[:3]):
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(root / "images" / str(label) / f"{k}.png")
    return root


def ort_matches_torch(onnx_path, model_dir, input_kind):
    """ONNX Runtime on random images at batch 1 and 5 against the PyTorch model on the same images normalised;
    returns the largest |logit difference|."""
    import onnxruntime as ort

    from distill.models import load_for_eval

    model, pre, info, _ = load_for_eval(model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (image_input,) = session.get_inputs()
    assert image_input.name == "images" and image_input.shape[1:] == [3, 32, 32]
    assert image_input.type == ("tensor(uint8)" if input_kind == "uint8" else "tensor(float)")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch in (1, 5):  # the batch dimension is dynamic
        pixels = rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
        x = pixels if input_kind == "uint8" else (pixels / 255).astype(np.float32)
        got = session.run(["logits"], {"images": x})[0]
        with torch.inference_mode():
            reference = model((torch.from_numpy(pixels).float() / 255 - mean) / std).numpy()
        assert got.shape == (batch, info["num_classes"])
        diff = float(np.abs(got - reference).max())
        print(f"{model_dir.name} ({input_kind}), batch {batch}: max |logit diff| ONNX Runtime vs PyTorch {diff:.3g}")
        assert diff < 1e-3 * max(1.0, float(np.abs(reference).max()))
        worst = max(worst, diff)
    return worst


def test_a_student_in_a_run_deploys_with_uint8_input_checked_on_its_validation_split(tmp, capsys):
    model_dir = tmp / "runs" / "tiny" / "students" / "r10"
    main([str(model_dir), "--repeats", "3"])
    out = capsys.readouterr().out
    assert "check: 30 images from the validation split of run tiny" in out and "top-1 agreement 100.00%" in out
    assert "max |logit diff|" in out and "ms at batch 1" in out
    record = json.loads((model_dir / "deploy" / "deploy.json").read_text())
    assert sorted(p.name for p in (model_dir / "deploy").iterdir()) == ["deploy.json", "model.onnx"]
    assert record["input"] == {"name": "images", "dtype": "uint8", "range": "0..255", "channels": "RGB",
                               "layout": "NCHW", "shape": ["batch", 3, 32, 32]}
    assert record["sha256"] == json.loads((model_dir / "model.json").read_text())["sha256"]
    assert record["classes"] == [str(i) for i in range(10)] and record["preprocess"]["input_size"] == 32
    check, speed = record["check"], record["speed"]
    assert check["images"] == 30 and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] <= check["tolerance"] == pytest.approx(1e-3 * check["logit_scale"])
    assert speed["ort_latency_ms_b1"] > 0 and speed["ort_images_per_sec_b32"] > 0 and speed["torch_latency_ms_b1"] > 0
    assert speed["threads"] == 1 and speed["repeats"] == 3
    with capsys.disabled():
        print(f"\nresnet10t: deploy check {check['max_abs_diff']:.3g}; ORT {speed['ort_latency_ms_b1']:.3g} ms, "
              f"PyTorch {speed['torch_latency_ms_b1']:.3g} ms at batch 1")
    ort_matches_torch(model_dir / "deploy" / "model.onnx", model_dir, "uint8")
    assert list(tmp.glob("runs/tiny/students/.deploy*")) == []  # the temporary folder is gone


def test_a_vit_outside_a_run_deploys_with_float_input_checked_on_an_image_folder(tmp, capsys):
    out_dir = tmp / "vit-onnx"
    main([str(tmp / "vit"), "--input", "float", "--images", str(tmp / "images"), "--out", str(out_dir),
          "--repeats", "3"])
    assert f"check: 9 images from {tmp / 'images'}" in capsys.readouterr().out
    record = json.loads((out_dir / "deploy.json").read_text())
    assert record["input"]["dtype"] == "float32" and record["input"]["range"] == "0..1"
    assert record["source"] == "hf" and record["check"]["top1_agreement"] == 1.0
    with capsys.disabled():
        print(f"\ntiny ViT: deploy check {record['check']['max_abs_diff']:.3g}; ORT "
              f"{record['speed']['ort_latency_ms_b1']:.3g} ms, PyTorch {record['speed']['torch_latency_ms_b1']:.3g} "
              "ms at batch 1")
    ort_matches_torch(out_dir / "model.onnx", tmp / "vit", "float")
    assert not (tmp / "vit" / "deploy").exists()


@pytest.mark.parametrize("hf_config", [
    {"model_type": "beit", "use_relative_position_bias": True},  # exported with eager attention (see export_onnx)
    {"model_type": "deit", "architectures": ["DeiTForImageClassificationWithTeacher"]},  # two heads, averaged
])
def test_beit_and_deit_teachers_deploy(tmp, hf_config, capsys):
    from distill.models import build_model, save_model
    from distill.recipe import TeacherConfig

    model_dir = tmp / hf_config["model_type"]
    model, pre = build_model(TeacherConfig(model=f"hf:{model_dir.name}", pretrained=False,
                                           hf_config={**VIT, **hf_config}), 10, classes=[str(i) for i in range(10)])
    save_model(model, pre, model_dir, [str(i) for i in range(10)])
    main([str(model_dir), "--images", str(tmp / "images"), "--repeats", "2"])
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    ort_matches_torch(model_dir / "deploy" / "model.onnx", model_dir, "uint8")


def test_compare_shows_onnx_runtime_columns_for_deployed_models(tmp, capsys):
    from distill import compare

    run = tmp / "runs" / "tiny"
    if not (run / "students" / "r10" / "deploy" / "deploy.json").is_file():
        main([str(run / "students" / "r10"), "--repeats", "3"])
    compare.main([str(run), "--no-speed"])
    with open(run / "comparison.csv", newline="") as f:
        rows = {r["role"]: r for r in csv.DictReader(f)}
    assert float(rows["r10"]["ort_latency_ms_b1"]) > 0 and float(rows["r10"]["ort_images_per_sec_b32"]) > 0
    assert rows["plain"]["ort_latency_ms_b1"] == rows["plain"]["ort_images_per_sec_b32"] == ""
    table = (run / "comparison.md").read_text()
    assert "ort_latency_ms_b1 | ort_images_per_sec_b32" in table
    # deployed from other weights than the folder's (retrained since): not shown
    stale = tmp / "stale"
    shutil.copytree(run / "students" / "r10", stale)
    record = json.loads((stale / "deploy" / "deploy.json").read_text())
    (stale / "deploy" / "deploy.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert deployed_speed(stale) == (None, None) and deployed_speed(tmp / "vit") == (None, None)


def test_logit_check_tolerance_and_near_ties():
    reference = np.array([[5.0, 1.0, 0.0], [2.0, 2.0 - 1e-4, 0.0]])
    same = compare_logits(reference, reference + 1e-6)
    assert same["max_abs_diff"] == pytest.approx(1e-6) and same["tolerance"] == pytest.approx(5e-3)
    assert same["top1_agreement"] == 1.0 and same["near_ties"] == 0
    swapped = reference.copy()
    swapped[1] = [2.0 - 1e-4, 2.0, 0.0]  # a near-tie decided the other way: float noise, agreement
    tie = compare_logits(reference, swapped)
    assert tie["top1_agreement"] == 1.0 and tie["near_ties"] == 1
    wrong = compare_logits(reference, reference[:, [1, 0, 2]])
    assert wrong["top1_agreement"] == 0.5 and wrong["max_abs_diff"] == 4.0


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_are_one_error_line_and_write_nothing(tmp, capsys):
    model_dir = tmp / "vit"
    assert "not a distill model directory" in error_of(capsys, [str(tmp / "images")])
    assert "no such model directory" in error_of(capsys, [str(tmp / "nowhere")])
    assert "--format: 'tflite' is not supported" in error_of(capsys, [str(model_dir), "--format", "tflite"])
    assert "--input: expected uint8" in error_of(capsys, [str(model_dir), "--input", "int8"])
    assert "not inside a run" in error_of(capsys, [str(model_dir)])  # and no --images
    assert "no such file or folder" in error_of(capsys, [str(model_dir), "--images", str(tmp / "nowhere")])
    assert "is a file" in error_of(capsys, [str(model_dir), "--out", str(model_dir / "model.json")])
    assert not (model_dir / "deploy").exists() and not list(model_dir.glob(".deploy*"))


def test_logits_that_differ_are_an_error_and_nothing_is_written(tmp, capsys, monkeypatch):
    class Wrong:  # an ONNX Runtime session whose logits are off
        def run(self, names, feeds):
            return [np.ones((len(feeds["images"]), 10), dtype=np.float32)]

    def fake_export(graph, example, path, metadata, what):
        path.write_bytes(b"onnx")
        return 20

    monkeypatch.setattr(deploy, "export_onnx", fake_export)
    monkeypatch.setattr(deploy, "ort_session", lambda path: Wrong())
    out = tmp / "wrong"
    err = error_of(capsys, [str(tmp / "vit"), "--images", str(tmp / "images"), "--out", str(out)])
    assert "logits differ from PyTorch's" in err and "nothing written" in err
    assert not out.exists() and not list(tmp.glob(".wrong*"))


@pytest.fixture(scope="module")
def ensemble(tmp):
    """An ensemble of the ViT and the resnet10t, written where a run's teacher would be."""
    from distill.models import save_ensemble

    classes = json.loads((tmp / "vit" / "model.json").read_text())["classes"]
    d = tmp / "runs" / "tiny" / "ensemble"
    save_ensemble(d, [tmp / "vit", tmp / "runs" / "tiny" / "students" / "r10"], "probs", classes)
    return d


def test_an_ensemble_that_does_not_export_is_refused(ensemble, capsys, monkeypatch):
    def cannot(*args, **kwargs):  # as torch's ConversionError: advice in colour first, the failure as its cause
        raise RuntimeError("Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m\nmore") from ValueError(
            "Unsupported: data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", cannot)
    err = error_of(capsys, [str(ensemble)])
    assert "ensemble of" in err and "torch.onnx.export cannot export it (ValueError: Unsupported" in err
    assert "\x1b" not in err
    assert not (ensemble / "deploy").exists() and not list(ensemble.glob(".deploy*"))


def test_an_ensemble_deploys_as_one_graph(ensemble, capsys):
    main([str(ensemble), "--repeats", "2"])
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    ort_matches_torch(ensemble / "deploy" / "model.onnx", ensemble, "uint8")
