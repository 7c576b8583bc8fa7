"""teach.py end to end on real Fashion-MNIST subsets: the run directory contract, accuracy, errors, 2 processes."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill import cli
from distill.data import ImageDataset, build_transform, load_splits
from distill.evaluate import classification_metrics
from distill.models import load_model
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("top1", "top5", "macro_f1", "nll", "ece", "params", "eval_images_per_sec", "train_images_per_sec",
            "epochs", "seed", "wall_seconds", "label_smoothing", "trained_with_label_smoothing")
NO_EXPORT = "targets.export=false"  # the store has its own tests (test_targets.py); keep these fast
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False, **kw)


def check_run_dir(run_dir: Path, recipe_path: str, overrides: list[str]) -> dict:
    assert (run_dir / "config.yaml").is_file()
    assert load_recipe(run_dir / "config.yaml") == load_recipe(ROOT / recipe_path, overrides)
    teacher = run_dir / "teacher"
    for name in ("model.safetensors", "model.json", "metrics.json", "last/model.safetensors"):
        assert (teacher / name).is_file(), name
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert not set(REQUIRED) - set(metrics)
    assert list((run_dir / "tb" / "teacher").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob("*.tmp"))
    return metrics


@pytest.mark.slow
def test_hf_vit_teacher_under_accelerate_launch(tmp_path):
    overrides = [f"output_dir={tmp_path}", NO_EXPORT]
    r = run(["accelerate", "launch", "--num_processes", "1", "--cpu", "--mixed_precision", "bf16",
             "distill/teach.py", "recipes/tiny-vit.yaml", *overrides])
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_run_dir(tmp_path / "tiny-vit", "recipes/tiny-vit.yaml", overrides)
    assert m["mixed_precision"] == "bf16"  # from accelerate's launch config, the recipe says null
    assert m["top1"] > 0.6, m["top1"]  # chance is 0.1
    assert m["num_images"] == 4000 and m["label_smoothing"] == 0.1 and m["trained_with_label_smoothing"] is True


@pytest.mark.slow
def test_timm_teacher_through_the_distill_command(tmp_path):
    overrides = [f"output_dir={tmp_path}", NO_EXPORT]
    r = run(["distill", "teach", "recipes/tiny-timm.yaml", *overrides])
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_run_dir(tmp_path / "tiny-timm", "recipes/tiny-timm.yaml", overrides)
    assert m["top1"] > 0.6, m["top1"]
    assert m["trained_with_label_smoothing"] is False


@pytest.mark.slow
def test_two_processes_count_each_val_image_once(tmp_path):
    """torchrun with 2 processes trains, and its metrics equal a single-process evaluation of the saved model."""
    overrides = [f"output_dir={tmp_path}", NO_EXPORT, "teacher.epochs=1", "data.subset=301", "teacher.batch_size=32"]
    r = run(["torchrun", "--nproc_per_node", "2", "distill/teach.py", "recipes/tiny-vit.yaml", *overrides])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "tiny-vit" / "teacher" / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["num_images"] == 301  # odd: the sampler pads one, gather drops it
    assert sum(map(sum, m["confusion_matrix"])) == 301

    model, pre, _ = load_model(tmp_path / "tiny-vit" / "teacher")
    recipe = load_recipe(ROOT / "recipes/tiny-vit.yaml", overrides)
    _, val = load_splits(recipe.data)
    ds = ImageDataset(val, build_transform(None, "eval", pre))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        single = classification_metrics(model.eval()(x), torch.as_tensor(val.labels), len(val.classes))
    assert single["confusion_matrix"] == m["confusion_matrix"]
    assert single["top1"] == pytest.approx(m["top1"])


@pytest.mark.slow
def test_training_options_work_together(tmp_path):
    """Accumulation, clipping, MixUp+CutMix, layer decay, scaled lr, warm-up+cosine, bf16, eval_every in one run."""
    overrides = [f"output_dir={tmp_path}", NO_EXPORT, "data.subset=640", "teacher.epochs=3", "teacher.eval_every=2",
                 "teacher.mixed_precision=bf16", "teacher.optim.grad_accum=2", "teacher.optim.clip_grad=1.0",
                 "teacher.optim.layer_decay=0.75", "teacher.optim.scale_lr=true", "teacher.optim.warmup_epochs=1",
                 "teacher.optim.min_lr=1e-5", "teacher.mix.mixup_alpha=0.2", "teacher.mix.cutmix_alpha=1.0",
                 "log.every_steps=1"]
    r = run(["distill", "teach", "recipes/tiny-vit.yaml", *overrides])
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_run_dir(tmp_path / "tiny-vit", "recipes/tiny-vit.yaml", overrides)
    assert [h["epoch"] for h in m["history"]] == [2, 3]  # every 2nd epoch, and always the last
    assert m["mixed_precision"] == "bf16" and m["global_batch_size"] == 64
    assert m["lr"] == pytest.approx(2e-3 * 64 / 256)
    assert m["top1"] > 0.2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tiny-vit" / "tb" / "teacher")).Reload()
    lr = [e.value for e in events.Scalars("train/lr")]
    assert len(lr) == 3 * (640 // 32 // 2)  # one optimizer step per 2 batches of 32
    warm = 640 // 32 // 2
    assert all(a < b for a, b in itertools.pairwise(lr[:warm]))  # linear warm-up to the peak
    assert lr[warm - 1] == pytest.approx(m["lr"], rel=0.05)
    assert all(a >= b for a, b in itertools.pairwise(lr[warm - 1:]))  # then cosine down
    assert lr[-1] < 0.1 * m["lr"]
    for tag in ("train/loss", "train/loss_ce", "val/top1", "val/macro_f1", "val/nll", "val/ece"):
        assert events.Scalars(tag), tag


@pytest.mark.slow
def test_distill_run_runs_the_teacher_stage(tmp_path):
    overrides = [f"output_dir={tmp_path}", "data.subset=200", "teacher.epochs=1"]
    r = run(["distill", "run", "recipes/tiny-vit.yaml", *overrides])
    assert r.returncode == 0, r.stderr[-3000:]
    check_run_dir(tmp_path / "tiny-vit", "recipes/tiny-vit.yaml", overrides)


@pytest.mark.slow
def test_users_own_data_image_folder_and_csv(tmp_path):
    """Real photos of mixed sizes and modes in an image folder, and Fashion-MNIST PNGs listed in a CSV."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from distill.recipe import DataConfig

    # image folder: crops of scikit-image's bundled photos (RGB of several sizes, and grey ones)
    photos = {"animal": [skimage.data.chelsea(), skimage.data.cat()],
              "object": [skimage.data.coffee(), skimage.data.rocket(), skimage.data.camera()]}
    rng = np.random.default_rng(0)
    for cls, images in photos.items():
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(30):
            img = images[i % len(images)]
            h, w = img.shape[:2]
            y, x = rng.integers(0, h // 3), rng.integers(0, w // 3)
            Image.fromarray(img[y:y + 2 * h // 3, x:x + 2 * w // 3]).save(tmp_path / "folder" / cls / f"{i}.png")
    r = run(["distill", "teach", "recipes/tiny-vit.yaml", f"output_dir={tmp_path / 'runs'}", "name=folder",
             "data.source=imagefolder", f"data.root={tmp_path / 'folder'}", "data.subset=null", "teacher.epochs=2", NO_EXPORT])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "folder" / "teacher" / "metrics.json").read_text())
    assert m["classes"] == ["animal", "object"] and m["num_images"] == 12  # a stratified 0.2 of 60

    # CSV: Fashion-MNIST images written as PNG files, paths relative to the CSV, custom column names
    train, _ = load_splits(DataConfig(subset=600))
    (tmp_path / "csv" / "img").mkdir(parents=True)
    lines = ["file,garment"]
    for i in range(len(train)):
        Image.fromarray(train.load(i)[:, :, 0]).save(tmp_path / "csv" / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{train.classes[train.labels[i]]}")
    (tmp_path / "csv" / "train.csv").write_text("\n".join(lines) + "\n")
    r = run(["distill", "teach", "recipes/tiny-timm.yaml", f"output_dir={tmp_path / 'runs'}", "name=csv",
             "data.source=csv", f"data.root={tmp_path / 'csv' / 'train.csv'}", "data.path_column=file",
             "data.label_column=garment", "data.subset=null", "data.val_fraction=0.25", NO_EXPORT,
             "teacher.batch_size=16", "teacher.epochs=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "csv" / "teacher" / "metrics.json").read_text())
    assert m["num_images"] == 150 and sorted(m["classes"]) == sorted(train.classes)
    assert m["top1"] > 0.5  # 450 training images, 6 epochs; chance is 0.1: labels arrived right


# --- bad input: one `error:` line, exit 2, nothing written -----------------------------------------
def _fail_in_process(capsys, tmp_path, *overrides, recipe="recipes/tiny-vit.yaml"):
    with pytest.raises(SystemExit) as e:
        cli.main(["teach", str(ROOT / recipe), f"output_dir={tmp_path / 'out'}", *overrides])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing half-done
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    ("teacher.epoch=3", "error: teacher.epoch: unknown key; did you mean 'epochs'?"),
    ("teacher.optim.lr=fast", "error: teacher.optim.lr: expected a positive number, got 'fast'"),
    ("data.root=/nonexistent/fmnist", "error: data.root"),
    ("teacher.model=timm:resnet_does_not_exist", "error: teacher.model"),
    ("teacher.card=nope", "error: teacher.card: no card 'nope'"),
])
def test_bad_recipes(capsys, tmp_path, override, expected):
    assert _fail_in_process(capsys, tmp_path, override).startswith(expected)


def test_distill_run_checks_every_student_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(ROOT / "recipes/tiny-vit.yaml"), f"output_dir={tmp_path / 'out'}",
                  "students=[{name: a, model: 'timm:resnet18'}, {name: b, model: 'timm:resnet_nope'}]"])
    assert e.value.code == 2
    assert "error: students.1.model: unknown timm model 'resnet_nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_local_checkpoint_with_other_class_count(capsys, tmp_path):
    from distill.models import build_model, save_model
    recipe = load_recipe(ROOT / "recipes/tiny-vit.yaml")
    model, pre = build_model(recipe.teacher, 7)
    save_model(model, pre, tmp_path / "ckpt", [str(i) for i in range(7)])
    line = _fail_in_process(capsys, tmp_path, f"teacher.pretrained={tmp_path / 'ckpt'}")
    assert line.startswith("error: teacher.pretrained") and "7" in line and "10" in line


@pytest.mark.parametrize("launcher", [
    ["distill", "teach"],
    [sys.executable, "distill/teach.py"],
    ["accelerate", "launch", "--num_processes", "1", "--cpu", "distill/teach.py"],
])
def test_error_line_from_every_launcher(tmp_path, launcher):
    r = run([*launcher, "recipes/tiny-vit.yaml", "teacher.epochs=zero", f"output_dir={tmp_path}"])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: teacher.epochs: expected an integer in [1, 100000], got 'zero'"], r.stderr[-2000:]
    if launcher[0] == "accelerate":
        assert r.returncode != 0  # accelerate wraps the script's exit 2 in its own error
    else:
        assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_recipes_in_the_repo_are_valid():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        header = path.read_text().splitlines()[0]
        assert header.startswith("#"), f"{path.name}: start with a comment giving the commands"
        yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    overrides = [f"output_dir={tmp_path}", NO_EXPORT, "data.subset=300", "teacher.epochs=2", "name=t"]
    good = run(["distill", "teach", "recipes/tiny-timm.yaml", *overrides])
    assert good.returncode == 0, good.stderr[-2000:]
    teacher = tmp_path / "t" / "teacher"
    saved = {f: (teacher / f).read_bytes() for f in ("model.safetensors", "model.json", "metrics.json")}
    # the same run again with an absurd lr: the weights blow up within a few steps
    r = run(["distill", "teach", "recipes/tiny-timm.yaml", *overrides, "teacher.optim.lr=1e12",
             "teacher.optim.warmup_epochs=0"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "teacher: the loss is not finite" in errors[0] and "at step" in errors[0]
    # the good teacher was set aside when the retrain started, untouched, and the error line says where
    assert {f: (teacher / "previous" / f).read_bytes() for f in saved} == saved
    assert f"the earlier complete result is in {teacher / 'previous'}" in errors[0]
    assert (teacher / "INCOMPLETE").is_file() and not (teacher / "metrics.json").exists()
    # allowed bad steps are skipped with a warning instead (and the run then ends normally)
    r = run(["distill", "teach", "recipes/tiny-timm.yaml", *overrides, "name=skip", "teacher.optim.lr=1e12",
             "teacher.optim.warmup_epochs=0", "teacher.optim.max_bad_steps=100000"])
    assert r.returncode == 0 and "non-finite loss at step" in r.stdout + r.stderr, r.stderr[-2000:]


def test_finite_guard_decides_the_same_on_every_step(tmp_path):
    from distill.checkpoint import Progress
    from distill.errors import DistillError
    from distill.training import finite

    class One:  # a single-process accelerator
        num_processes = 1

        def print(self, *a):
            pass

    prog = Progress()
    assert finite(torch.tensor(1.5), One(), prog, 2, "teacher", tmp_path)
    for step in (1, 2):  # the guard names the step about to be taken
        prog.step = step
        assert not finite(torch.tensor(float("nan") if step == 1 else float("inf")), One(), prog, 2, "teacher",
                          tmp_path)
    prog.step = 3
    prog.best = {"epoch": 1, "top1": 0.5}
    with pytest.raises(DistillError, match=r"at step 4 \(3 bad steps: \[2, 3, 4\]\); the checkpoint of epoch 1 "
                                           r"\(val top1 0.5000\) in .* is kept"):
        finite(torch.tensor(float("nan")), One(), prog, 2, "teacher", tmp_path)
