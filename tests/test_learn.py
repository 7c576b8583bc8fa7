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
    """A tiny-ViT teacher fine-tuned with label smoothing 0.1, its store (with unlabeled images), 4 students."""
    out = tmp_path_factory.mktemp("learn")
    recipe = yaml.safe_load((ROOT / "recipes/tiny-vit.yaml").read_text())
    recipe["name"] = "study"
    recipe["data"].update(subset=600, unlabeled="rest", unlabeled_subset=600)
    recipe["teacher"]["epochs"] = 4
    recipe["targets"] = {"views": 2}
    recipe["students"] = [
        {"name": "baseline", **STUDENT, "kd": "none"},
        {"name": "kd", **STUDENT, "kd": {"loss": "kl", "temperature": 4.0}, "label_smoothing": 0.1,
         "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}},
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


def test_every_student_writes_its_run_directory(study):
    for name in ("baseline", "kd", "kd-warn", "online"):
        d = study.dir / "students" / name
        for f in ("model.safetensors", "model.json", "metrics.json", "config.yaml"):
            assert (d / f).is_file(), (name, f)
        m = study.metrics(name)
        assert not set(REQUIRED) - set(m), set(REQUIRED) - set(m)
        assert list((study.dir / "tb" / name).glob("events.out.tfevents.*"))
    assert study.metrics("baseline")["top1"] > 0.3  # 600 images, 2 epochs; chance is 0.1


def test_baseline_uses_labels_only_and_kd_uses_the_unlabeled_images(study):
    assert study.metrics("baseline")["train_images"] == 600 and study.metrics("baseline")["kd_loss"] == "none"
    assert study.metrics("kd")["train_images"] == 1200  # 600 labeled + 600 unlabeled
    assert study.metrics("kd-warn")["train_images"] == 600  # kd.use_unlabeled: false


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


def test_online_kd_measures_the_cached_mixing_approximation(study):
    m = study.metrics("online")
    assert m["kd_targets"] == "online" and m["ema"] == 0.9
    assert m["mix_approx_kl"] is not None and m["mix_approx_kl"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(study.dir / "tb" / "online")).Reload()
    assert events.Scalars("train/mix_approx_kl") and events.Scalars("train/loss_kd")


def test_hparams_reach_tensorboard(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(study.dir / "tb" / "kd")).Reload()
    assert events.Scalars("hparam/top1")[-1].value == pytest.approx(study.metrics("kd")["top1"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


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


def test_a_rerun_skips_every_complete_stage(study):
    before = {name: study.metrics(name)["wall_seconds"] for name in ("baseline", "kd", "kd-warn", "online")}
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}")
    assert "teacher complete for this recipe: skipped" in r.stdout
    assert "nothing to export" in r.stdout
    for name, seconds in before.items():
        assert f"student {name} complete for this recipe: skipped" in r.stdout
        assert study.metrics(name)["wall_seconds"] == seconds  # untouched
    # a changed student is trained again, the others stay
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "students.kd-warn.epochs=2")
    assert "student kd-warn complete" not in r.stdout and "student kd complete for this recipe: skipped" in r.stdout
    assert study.metrics("kd-warn")["epochs"] == 2
    # another teacher recipe under the same name is refused, not overwritten
    r = run("distill", "run", str(study.recipe), f"output_dir={study.dir.parent}", "teacher.epochs=1", check=False)
    assert r.returncode == 2 and "error: teacher:" in r.stderr and "--from teach" in r.stderr


def test_compare_writes_the_table_and_tensorboard(study):
    r = run("distill", "compare", str(study.dir))
    table = (study.dir / "comparison.md").read_text()
    for role in ("teacher", "baseline", "kd", "kd-warn", "online"):
        assert f"| {role} |" in table and f"| {role} |" in r.stdout
    rows = (study.dir / "comparison.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("run,model,role,top1")
    assert (study.dir / "accuracy_vs_latency.png").stat().st_size > 1000
    assert "Label-smoothing / KD policy decisions" in table and "T=1" in table

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    text = EventAccumulator(str(study.dir / "tb" / "compare")).Reload()
    assert "comparison/text_summary" in text.Tags()["tensors"]
    assert b"| kd |" in text.Tensors("comparison/text_summary")[0].tensor_proto.string_val[0]
    hp = EventAccumulator(str(study.dir / "tb" / "compare" / "study-kd")).Reload()
    assert hp.Scalars("compare/top1")[0].value == pytest.approx(study.metrics("kd")["top1"])
    assert "_hparams_/session_start_info" in hp.PluginTagToContent("hparams")
