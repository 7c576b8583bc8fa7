"""learn.py end to end on a real Fashion-MNIST store: students, the LS/KD policy, online KD, unlabeled data, errors."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
STUDENT = {"model": "timm:resnet10t", "resolution": 28, "epochs": 2, "batch_size": 32,
           "optim": {"name": "sgd", "lr": 0.05, "warmup_epochs": 0.2}}
REQUIRED = ("top1", "top5", "macro_f1", "nll", "ece", "params", "eval_images_per_sec", "train_images_per_sec",
            "epochs", "seed", "wall_seconds", "kd_loss", "temperature", "kd_weight", "label_smoothing", "mix",
            "ls_decision", "ls_reason")


def run(*args, check=True):
    r = subprocess.run(list(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny-ViT teacher fine-tuned with label smoothing 0.1, its store (with unlabeled images), 4 students
    (one with a FixRes stage)."""
    out = tmp_path_factory.mktemp("learn")
    recipe = yaml.safe_load((ROOT / "recipes/tiny-vit.yaml").read_text())
    recipe["name"] = "study"
    recipe["data"].update(subset=600, unlabeled="rest", unlabeled_subset=600)
    recipe["teacher"]["epochs"] = 4
    recipe["targets"] = {"views": 2}
    recipe["students"] = [
        {"name": "baseline", **STUDENT, "kd": "none"},
        {"name": "kd", **STUDENT, "kd": {"loss": "kl", "temperature": 4.0}, "label_smoothing": 0.1,
         "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, "fixres": {"resolution": 32, "epochs": 1}},
        {"name": "kd-warn", **STUDENT, "epochs": 1, "kd": {"loss": "dist", "temperature": 4.0, "ls_policy": "warn",
                                                           "use_unlabeled": False}},
        {"name": "online", **STUDENT, "epochs": 1, "ema": 0.9,
         "kd": {"loss": "dkd", "targets": "online", "temperature": 2.0, "ls_policy": "off"},
         "mix": {"cutmix_alpha": 1.0}},
    ]
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = run("distill", "run", str(path), f"output_dir={out}")
    return SimpleRun(out / "study", path, r.stdout + r.stderr)


class SimpleRun:
    def __init__(self, run_dir, recipe, log):
        self.dir, self.recipe, self.log = run_dir, recipe, log

    def metrics(self, name):
        return json.loads((self.dir / "students" / name / "metrics.json").read_text())


@pytest.mark.slow
def test_every_student_writes_its_run_directory(study):
    for name in ("baseline", "kd", "kd-warn", "online"):
        d = study.dir / "students" / name
        for f in ("model.safetensors", "model.json", "metrics.json", "config.yaml"):
            assert (d / f).is_file(), (name, f)
        m = study.metrics(name)
        assert not set(REQUIRED) - set(m), set(REQUIRED) - set(m)
        assert list((study.dir / "tb" / name).glob("events.out.tfevents.*"))
    assert study.metrics("baseline")["top1"] > 0.3  # 600 images, 2 epochs; chance is 0.1


@pytest.mark.slow
def test_baseline_uses_labels_only_and_kd_uses_the_unlabeled_images(study):
    assert study.metrics("baseline")["train_images"] == 600 and study.metrics("baseline")["kd_loss"] == "none"
    assert study.metrics("kd")["train_images"] == 1200  # 600 labeled + 600 unlabeled
    assert study.metrics("kd-warn")["train_images"] == 600  # kd.use_unlabeled: false


@pytest.mark.slow
def test_ls_policy_decisions_are_recorded(study):
    kd = study.metrics("kd")
    # the teacher was fine-tuned with label smoothing 0.1: auto distils at T = 1 instead of 4
    assert kd["temperature"] == 1.0 and kd["temperature_requested"] == 4.0 and kd["ls_decision"] == "T=1"
    assert "fine-tuned with label smoothing 0.1" in kd["ls_reason"] and kd["label_smoothing"] == 0.1
    warn = study.metrics("kd-warn")
    assert warn["temperature"] == 4.0 and warn["ls_decision"] == "warn"
    assert "warning: kd-warn:" in study.log
    off = study.metrics("online")
    assert off["temperature"] == 2.0 and off["ls_decision"] == "off"
    assert study.metrics("baseline")["ls_decision"] == "not applicable"


@pytest.mark.slow
def test_online_kd_measures_the_cached_mixing_approximation(study):
    m = study.metrics("online")
    assert m["kd_targets"] == "online" and m["ema"] == 0.9
    assert m["mix_approx_kl"] is not None and m["mix_approx_kl"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(study.dir / "tb" / "online")).Reload()
    assert events.Scalars("train/mix_approx_kl") and events.Scalars("train/loss_kd")


@pytest.mark.slow
def test_hparams_reach_tensorboard(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(study.dir / "tb" / "kd")).Reload()
    assert events.Scalars("hparam/top1")[-1].value == pytest.approx(study.metrics("kd")["top1"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


@pytest.mark.slow
def test_only_the_named_student_and_errors(study, tmp_path):
    r = run("distill", "learn", str(study.recipe), f"output_dir={study.dir.parent}", "--student", "nope", check=False)
    assert r.returncode == 2 and "error: --student: no student 'nope'" in r.stderr
    # a store built for other data is refused
    r = run("distill", "learn", str(study.recipe), f"output_dir={study.dir.parent}", "data.subset=500",
            "--student", "baseline", check=False)
    assert r.returncode == 2 and "error: targets: the store" in r.stderr and "dataset" in r.stderr, r.stderr
    # no store at all
    r = run("distill", "learn", str(study.recipe), f"output_dir={tmp_path}", check=False)
    assert r.returncode == 2 and "error: targets: no store" in r.stderr


@pytest.mark.slow
def test_a_rerun_skips_every_complete_stage(study):
    before = {name: study.metrics(name)["wall_seconds"] for name in ("baseline", "kd", "kd-warn", "online")}
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}")
    assert "teacher complete for this recipe: skipped" in r.stdout
    assert "nothing to export" in r.stdout
    for name, seconds in before.items():
        done = f"student {name}{' (+ FixRes)' if name == 'kd' else ''} complete for this recipe: skipped"
        assert done in r.stdout
        assert study.metrics(name)["wall_seconds"] == seconds  # untouched
    # a changed student is trained again, the others stay
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "students.kd-warn.epochs=2")
    assert "student kd-warn complete" not in r.stdout and "student kd (+ FixRes) complete" in r.stdout
    assert study.metrics("kd-warn")["epochs"] == 2
    # a changed FixRes stage runs again on the trained student, which stays as it was
    fixres = json.loads((study.dir / "students/kd/fixres/metrics.json").read_text())
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "students.kd-warn.epochs=2",
            "students.kd.fixres.epochs=2")
    assert "student kd complete for this recipe: skipped; its FixRes stage runs" in r.stdout
    assert study.metrics("kd")["wall_seconds"] == before["kd"]
    again = json.loads((study.dir / "students/kd/fixres/metrics.json").read_text())
    assert again["fixres"]["epochs"] == 2 and again["fingerprint"] != fixres["fingerprint"]
    # another teacher recipe under the same name is refused, not overwritten
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "teacher.epochs=1", check=False)
    assert r.returncode == 2 and "error: teacher:" in r.stderr and "--from teach" in r.stderr


@pytest.mark.slow
def test_compare_writes_the_table_and_tensorboard(study):
    r = run("distill", "compare", str(study.dir))
    table = (study.dir / "comparison.md").read_text()
    for role in ("teacher", "baseline", "kd", "kd-warn", "online"):
        assert f"| {role} |" in table and f"| {role} |" in r.stdout
    rows = (study.dir / "comparison.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("run,model,role,resolution,top1")
    assert "| kd+fixres | 32 |" in table and "FixRes: val top-1 before -> after" in table
    assert (study.dir / "accuracy_vs_latency.png").stat().st_size > 1000
    assert "Label-smoothing / KD policy decisions" in table and "T=1" in table

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    text = EventAccumulator(str(study.dir / "tb" / "compare")).Reload()
    assert "comparison/text_summary" in text.Tags()["tensors"]
    assert b"| kd |" in text.Tensors("comparison/text_summary")[0].tensor_proto.string_val[0]
    hp = EventAccumulator(str(study.dir / "tb" / "compare" / "study-kd")).Reload()
    assert hp.Scalars("compare/top1")[0].value == pytest.approx(study.metrics("kd")["top1"])
    assert "_hparams_/session_start_info" in hp.PluginTagToContent("hparams")


@pytest.mark.slow
def test_fixres_trains_only_the_head_and_the_last_normalisation(study):
    from safetensors.torch import load_file
    m = json.loads((study.dir / "students/kd/fixres/metrics.json").read_text())
    f = m["fixres"]
    assert m["resolution"] == 32 and m["train_resolution"] == 28 and m["student"] == "kd+fixres"
    for key in ("before_28px", "before_32px", "after_28px", "after_32px"):
        assert 0 <= f[key]["top1"] <= 1
    assert m["top1"] == f["after_32px"]["top1"]
    # the student's own accuracy at its resolution is the "before" one: the same model, the same images
    assert f["before_28px"]["top1"] == pytest.approx(study.metrics("kd")["top1"])
    pre = json.loads((study.dir / "students/kd/fixres/model.json").read_text())["preprocess"]
    # tested and saved on the crop it trained on: the store's center view (targets.center_crop_pct)
    view_spec = json.loads((study.dir / "targets" / "manifest.json").read_text())["view_spec"]
    assert pre["input_size"] == 32 and pre["crop_pct"] == view_spec["center_crop_pct"]
    assert m["temperature"] == study.metrics("kd")["temperature"]  # the same KD signal, the same LS decision

    before = load_file(study.dir / "students/kd/model.safetensors")
    after = load_file(study.dir / "students/kd/fixres/model.safetensors")
    changed = {k for k in before if not torch_equal(before[k], after[k])}
    # resnet10t: the classifier and the norms of the last block (layer4.0) change; nothing else
    assert {"fc.weight", "fc.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.weight"} <= changed
    assert all(k.startswith(("fc.", "layer4.0.")) and (k.startswith("fc.") or ".bn" in k or "downsample.2" in k)
               for k in changed), sorted(changed)
    assert m["renormalised_layers"] == 3 and m["trainable_params"] < 0.01 * m["params"]


def torch_equal(a, b):
    import torch
    return a.shape == b.shape and torch.equal(a, b)


def test_fixres_parts_of_timm_students():
    import timm

    from distill.fixres import fixres_parts
    model = timm.create_model("resnet50", num_classes=10)
    trained, norms = fixres_parts(model, train_last_block=False, where="students.0")
    assert model.fc in trained and model.layer4[2].bn3 in norms and model.layer4[1].bn3 not in norms
    trained, _ = fixres_parts(model, train_last_block=True, where="students.0")
    assert model.layer4[2].conv2 in trained and model.layer4[1].conv2 not in trained
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    trained, norms = fixres_parts(lite0, train_last_block=False, where="students.0")
    assert lite0.classifier in trained and lite0.bn2 in norms  # the norm before pooling


@pytest.mark.slow
def test_a_failing_stage_is_named_and_the_earlier_stages_kept(study):
    teacher = (study.dir / "teacher" / "metrics.json").read_text()
    manifest = (study.dir / "targets" / "manifest.json").read_text()
    # two students to retrain with different precisions: learn refuses before training anything
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "students.kd.mixed_precision=bf16",
            "students.baseline.epochs=1", check=False)
    assert r.returncode == 2 and "== learn:" in r.stdout
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "mixed_precision" in error[0], r.stderr[-2000:]
    assert error[0].endswith("(stage learn; the stages before it are kept)")
    assert (study.dir / "teacher" / "metrics.json").read_text() == teacher
    assert (study.dir / "targets" / "manifest.json").read_text() == manifest
    assert study.metrics("baseline")["epochs"] == 2


def test_standardised_kd_with_two_classes_is_refused():
    """Two standardised logits are always ±1/√2: the KD term would have no gradient."""
    from distill.errors import DistillError
    from distill.kd import check_kd
    from distill.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["students.kd.kd.standardize=true"])
    check_kd(recipe, recipe.students, 10)
    with pytest.raises(DistillError, match=r"students.1.kd.standardize: with 2 classes"):
        check_kd(recipe, recipe.students, 2)
