"""A run killed at any point and resumed ends exactly where an uninterrupted run ends: the same weights, bit for
bit, and the same metrics.json apart from timings. SIGTERM/SIGINT save the state and exit cleanly."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_same_run

from distill.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
# 400 images: 6 teacher steps per epoch at batch 64; the student (batch 32, 2 batches per update) 6 too
TEACHER_STEPS, STUDENT_STEPS = 12, 12


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["data"]["subset"] = 400
    raw["teacher"]["epochs"] = 2
    raw["teacher"]["mix"] = {"mixup_alpha": 0.2}
    raw["targets"] = {"views": 2}
    raw["checkpoint"] = {"every_steps": 1}  # a state at every step: a kill can land anywhere, a save included
    raw["log"] = {"progress": False}
    raw["students"] = [{"name": "kd", "model": "timm:resnet10t", "resolution": 28, "epochs": 2, "batch_size": 32,
                        "mix": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, "ema": 0.9,
                        "optim": {"grad_accum": 2}, "kd": {"loss": "kl", "temperature": 4.0}}]
    path = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe) -> Path:
    out = recipe.parent / "uninterrupted"
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny-timm"


def distill(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(["distill", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(["distill", *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def saved_step(state_root: Path) -> int:
    try:
        return json.loads((state_root / "resume" / "state" / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def signal_at(proc: subprocess.Popen, state_root: Path, step: int, sig: int) -> None:
    """Send `sig` once a state of step >= `step` is saved (the process goes on meanwhile, so the signal lands
    wherever it lands: in a step, in a save, in an evaluation)."""
    deadline = time.monotonic() + 300
    while saved_step(state_root) < step:
        assert proc.poll() is None, f"finished before step {step}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)


def assert_resumed_run(a: Path, b: Path, parts=("teacher", "students/kd")) -> None:
    """`b` ended as `a` did (the teacher's last-epoch checkpoint too, which has no metrics.json)."""
    assert_same_run(a, b, parts, weights_only=("teacher/last",))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_resume_gives_the_same_weights(recipe, uninterrupted, seed):
    """SIGKILL at a random step of the teacher, then of the student; `distill run` resumes each time."""
    rng = np.random.default_rng(seed)
    out = recipe.parent / f"killed-{seed}"
    run_dir = out / "tiny-timm"
    proc = start("run", recipe, f"output_dir={out}")
    signal_at(proc, run_dir / "teacher", int(rng.integers(1, TEACHER_STEPS)), signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "teacher" / "metrics.json").exists()

    proc = start("run", recipe, f"output_dir={out}")  # resumes the teacher, then goes on to the student
    signal_at(proc, run_dir / "students" / "kd", int(rng.integers(1, STUDENT_STEPS)), signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "students" / "kd" / "metrics.json").exists()

    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_resumed_run(uninterrupted, run_dir)
    # a complete run keeps only its results: the states are removed
    assert not (run_dir / "teacher" / "resume").exists()
    assert not (run_dir / "students" / "kd" / "resume").exists()


def test_sigterm_saves_and_exits_cleanly_then_learn_resume_continues(recipe, uninterrupted):
    out = recipe.parent / "sigterm"
    run_dir = out / "tiny-timm"
    r = distill("teach", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start("learn", recipe, f"output_dir={out}")
    signal_at(proc, run_dir / "students" / "kd", 5, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("interrupted:", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("interrupted: students.0: SIGTERM at step"), stderr[-3000:]
    assert "--resume" in lines[0]
    assert (run_dir / "students" / "kd" / "resume" / "state" / "progress.json").is_file()

    r = distill("learn", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_run(uninterrupted, run_dir)


def test_sigint_during_teach_then_teach_resume(recipe, uninterrupted):
    out = recipe.parent / "sigint"
    run_dir = out / "tiny-timm"
    proc = start("teach", recipe, f"output_dir={out}")
    signal_at(proc, run_dir / "teacher", 3, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "interrupted: teacher: SIGINT at step" in stderr
    r = distill("teach", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed_run(uninterrupted, run_dir, parts=("teacher",))


def test_a_state_is_never_read_half_written(tmp_path):
    """The save protocol leaves state/ or state.old/ complete at every instant; state.tmp/ is never read."""

    class Acc:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            pass

        def print(self, *a):
            pass

    ckpt = Checkpoints(Acc(), tmp_path, "fp", 1, "teacher")
    assert ckpt.latest() is None
    (ckpt.dir / "state.tmp").mkdir(parents=True)  # killed while writing: no progress.json
    assert ckpt.latest() is None
    (ckpt.dir / "state.old").mkdir()
    (ckpt.dir / "state.old" / "progress.json").write_text("{}")  # killed between the two renames
    assert ckpt.latest() == ckpt.dir / "state.old"
    (ckpt.dir / "state").mkdir()
    (ckpt.dir / "state" / "progress.json").write_text("{}")
    assert ckpt.latest() == ckpt.dir / "state"


def test_resume_of_another_recipe_starts_over(recipe, uninterrupted):
    """A state saved for another recipe is not loaded: `--resume` starts over (and says so)."""
    out = recipe.parent / "other"
    run_dir = out / "tiny-timm"
    proc = start("teach", recipe, f"output_dir={out}", "teacher.optim.lr=0.05")
    signal_at(proc, run_dir / "teacher", 2, signal.SIGTERM)
    proc.communicate(timeout=300)
    r = distill("teach", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is of another recipe: starting over" in r.stdout
    assert_resumed_run(uninterrupted, run_dir, parts=("teacher",))
