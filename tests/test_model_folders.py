"""Model folders the ecosystem loads: timm's `local-dir:`, transformers' TimmWrapper and pipeline, a transformers
teacher's from_pretrained, the README.md model card, and `distill push`'s refusals (never a real hub)."""
import os

# Nothing here may touch the hub; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from distill.models import build_model, load_model, save_model, sha256_file
from distill.recipe import StudentConfig, recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)
CLASSES = [str(c) for c in range(10)]
SIZE = 16  # the digits, 8 px, saved at 16 px: at crop_pct 1.0 no loader resizes them, so every input is the same


def tiny_student(tmp_path, **kwargs):
    """A random-weight resnet10t (BatchNorm statistics moved off their defaults) saved by save_model."""
    torch.manual_seed(0)
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=SIZE, crop_pct=1.0,
                                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kwargs),
                             len(CLASSES), where="students.0", classes=CLASSES)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE))
    save_model(model.eval(), pre, tmp_path / "s", CLASSES, extra={"student": "s"})
    return tmp_path / "s"


def digit_images(folder, n=12):
    """n real digits (scikit-learn's load_digits, 0..16 -> 0..255) as SIZE px grey PNGs; their paths."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir()
    paths = []
    for i in range(n):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        paths.append(folder / f"d{i:02d}.png")
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.NEAREST).save(paths[-1])
    return paths


def test_timm_folder_is_timm_local_dir_and_transformers_timm_wrapper(tmp_path):
    import timm
    import transformers

    d = tiny_student(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "config.json", "model.json", "model.safetensors"]
    config = json.loads((d / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 10
    assert config["label_names"] == CLASSES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, SIZE, SIZE] and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"], cfg["num_classes"]) == ("bicubic", 1.0,
                                                                                           "center", 10)
    assert "tag" not in cfg and "num_classes" not in config.get("model_args", {})  # see folder._timm_folder

    ours, _, _ = load_model(d)
    assert load_file(str(d / "model.safetensors")).keys() == ours.state_dict().keys()  # timm's own names
    theirs = timm.create_model(f"local-dir:{d}", pretrained=True)
    assert theirs.pretrained_cfg["label_names"] == CLASSES
    wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(d))
    assert type(wrapped).__name__ == "TimmWrapperForImageClassification"
    assert wrapped.config.id2label == dict(enumerate(CLASSES))
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = ours.eval()(x)
        assert torch.equal(theirs.eval()(x), reference)
        assert torch.allclose(wrapped.eval()(pixel_values=x).logits, reference, rtol=0, atol=1e-6)


def test_pipeline_and_distill_predict_agree_on_real_images(tmp_path):
    import transformers

    from distill.predict import main as predict

    d = tiny_student(tmp_path)
    paths = digit_images(tmp_path / "images")
    predict([str(d), str(tmp_path / "images"), "--out", str(tmp_path / "preds.csv")])
    with open(tmp_path / "preds.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}

    classify = transformers.pipeline("image-classification", model=str(d))
    for path, top in zip(paths, classify([str(p) for p in paths], top_k=len(CLASSES))):
        row = rows[path.name]
        assert top[0]["label"] == row["prediction"]
        for entry in top:
            assert entry["score"] == pytest.approx(float(row[f"prob_{entry['label']}"]), rel=1e-4, abs=1e-6)


def test_transformers_teacher_folder_is_a_save_pretrained_folder(tmp_path):
    import transformers

    from distill.models import HFClassifier

    cfg = recipe_from_dict({"name": "t", "teacher": {"card": "tiny-vit"}}).teacher
    torch.manual_seed(0)
    model, pre = build_model(cfg, 3, classes=["a", "b", "c"])
    save_model(model.eval(), pre, tmp_path / "t", ["a", "b", "c"])
    d = tmp_path / "t"
    assert {"config.json", "preprocessor_config.json", "README.md"} <= {p.name for p in d.iterdir()}
    assert not any(k.startswith("hf.") for k in load_file(str(d / "model.safetensors")))

    hf = transformers.AutoModelForImageClassification.from_pretrained(str(d)).eval()
    assert type(hf).__name__ == "ViTForImageClassification" and hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    ours, pre2, _ = load_model(d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), model(x))
        assert torch.equal(hf(pixel_values=x).logits, model(x))
    assert pre2 == pre
    # `hf:<folder>` fine-tunes from it, with the folder's preprocessing read back
    again, pre3 = build_model(type(cfg)(model=f"hf:{d}", pretrained=True), 3, classes=["a", "b", "c"])
    assert isinstance(again, HFClassifier) and (pre3.input_size, pre3.crop_pct) == (32, 1.0)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))

    # a folder saved before (the wrapper's `hf.` in every name) still loads
    state = {f"hf.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    info = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**info, "sha256": sha256_file(d / "model.safetensors")}))
    with torch.no_grad():
        assert torch.equal(load_model(d)[0].eval()(x), model(x))


def fake_run(tmp_path):
    """A run directory as distill leaves it, around what a card reads: config.yaml, the store's manifest, the
    teacher folder, two students (`kd` and the labels-only `base`) saved with their metrics written."""
    from distill.record import write_metrics

    run = tmp_path / "runs" / "tiny"
    (run / "targets").mkdir(parents=True)
    (run / "teacher").mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "tiny", "data": {"source": "fashion-mnist",
                                                                                "subset": 300}}))
    (run / "targets" / "manifest.json").write_text(json.dumps({
        "fingerprint": "f1" * 32, "num_samples": 300, "rows_per_sample": 3,
        "teacher": {"model": "timm:resnet18", "sha256": "ab" * 32, "input_size": 32},
        "diagnostics": {"top1_center": 0.91}}))
    scores = {"top1": 0.8123, "top5": 0.99, "macro_f1": 0.8, "nll": 0.5, "ece": 0.03, "eval_images_per_sec": 1.0,
              "num_images": 300}
    kd = {"kd_loss": "kl", "temperature": 4.0, "kd_weight": 0.7, "kd_targets": "cached", "label_smoothing": 0.0,
          "ls_decision": "keep", "ls_reason": "the teacher was trained without label smoothing",
          "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 0.0}, "ema": None, "best_epoch": 2, "select_by": "top1",
          "resolution": SIZE, "train_images": 300}
    for name, loss, top1 in (("kd", "kl", 0.8123), ("base", "none", 0.7456)):  # the baseline last: kd's card
        tiny_student(run / "students")                                          # is refreshed with it
        (run / "students" / "s").rename(run / "students" / name)
        write_metrics(run / "students" / name / "metrics.json", {**scores, "top1": top1}, params=1,
                      train_images_per_sec=1.0, epochs=3, seed=0, wall_seconds=1.0, classes=CLASSES,
                      fingerprint="x", **{**kd, "kd_loss": loss}, student=name)
    return run


def test_the_card_states_what_the_model_is_where_it_came_from_and_how_it_scored(tmp_path):
    run = fake_run(tmp_path)
    text = (run / "students" / "kd" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"timm", "knowledge-distillation"} <= set(meta["tags"])
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.8123
    info = json.loads((run / "students" / "kd" / "model.json").read_text())
    for fact in ("timm:resnet10t", f"{info['params']:,}", f"{SIZE} px",  # what it is
                 "timm:resnet18", "ab" * 32, "f1" * 32,  # the teacher and its store
                 "`kl`", "T = 4.0", "KD weight 0.7", "`keep`", "the teacher was trained without label smoothing",
                 "0.8123", "labels-only `base`", "0.7456",  # metrics beside the baseline's
                 "fashion-mnist", "300 training images",  # the data
                 'timm.create_model("local-dir:', 'pipeline("image-classification"', "distill predict"):
        assert fact in body, fact
    base = (run / "students" / "base" / "README.md").read_text()
    assert "Labels only" in base and "labels-only `base`" not in base


def test_a_folder_without_metrics_has_a_card_and_metrics_elsewhere_write_none(tmp_path):
    from distill.record import write_metrics

    d = tiny_student(tmp_path)
    assert "Not evaluated yet" in (d / "README.md").read_text()
    scores = {"top1": 0.5, "top5": 1.0, "macro_f1": 0.5, "nll": 1.0, "ece": 0.1, "eval_images_per_sec": 1.0}
    write_metrics(tmp_path / "elsewhere" / "metrics.json", scores, params=1, train_images_per_sec=None, epochs=1,
                  seed=0, wall_seconds=0.0, classes=CLASSES, fingerprint="x")
    assert not (tmp_path / "elsewhere" / "README.md").exists()


def _push(args, capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as e:
        main(["push", *args])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_push_refuses_offline_before_any_network(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("push reached the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _push([str(tiny_student(tmp_path)), "someone/tiny"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: push: HF_HUB_OFFLINE is set")


def test_push_refuses_what_is_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _push([str(tmp_path / "empty"), "someone/tiny"], capsys)
    assert code == 2 and len(err) == 1 and "not a distill model directory" in err[0]
