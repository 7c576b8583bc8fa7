"""A run killed at any point and resumed ends exactly where an uninterrupted run ends: the same weights, bit for
bit, and the same metrics.json apart from timings. SIGTERM/SIGINT save the state and exit cleanly.

Every stop is planned, not raced against a timer: DISTILL_STOP_AT (distill/checkpoint.py, `planned_stop`) makes
the process send itself the signal right after a chosen optimizer step, before that step's checkpoint, or
(`:save`) half-way through that step's checkpoint save (state.tmp/ written, before the renames)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_same_run

from distill.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "DISTILL_STOP_AT"}, "HF_HUB_OFFLINE": "1"}
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
                        "optim": {"grad_accum": 2}, "kd": {"loss": "kl", "temperature": 4.0},
                        # 400 center views at batch 32: 12 FixRes steps per epoch
                        "fixres": {"resolution": 32, "epochs": 2, "lr": 1.0e-3}}]
    path = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def uninterrupted(recipe) -> Path:
    out = recipe.parent / "uninterrupted"
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny-timm"


def distill(*args, stop_at: str = "") -> subprocess.CompletedProcess:
    """`distill ARGS` with the code on sys.path; `stop_at`: DISTILL_STOP_AT, "<where>:<step>:<SIGNAL>[:save]"."""
    env = {**ENV, "DISTILL_STOP_AT": stop_at} if stop_at else ENV
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def state_step(stage_dir: Path, name: str = "state") -> int | None:
    """The step of the saved state `name` (state, state.tmp) of a stage, None when there is none."""
    path = stage_dir / "resume" / name / "progress.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None


def assert_killed_at(r: subprocess.CompletedProcess, stage_dir: Path, step: int, phase: str) -> None:
    """The process died of its planned SIGKILL after optimizer step `step`: before that step's checkpoint
    (phase "step") or half-way through writing it (phase "save"); the state on disk is the one of step - 1."""
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (stage_dir / "metrics.json").exists()
    assert state_step(stage_dir) == step - 1
    if phase == "save":
        assert state_step(stage_dir, "state.tmp") == step  # complete but not yet renamed: never read


def assert_resumed_run(a: Path, b: Path, parts=("teacher", "students/kd")) -> None:
    """`b` ended as `a` did (the teacher's last-epoch checkpoint too, which has no metrics.json)."""
    assert_same_run(a, b, parts, weights_only=("teacher/last",))


@pytest.mark.slow
@pytest.mark.parametrize("seed, phase", [(0, "step"), (1, "save")])
def test_sigkill_anywhere_then_resume_gives_the_same_weights(recipe, uninterrupted, seed, phase):
    """SIGKILL at a random step of the teacher, then of the student (after the step's update, or half-way
    through its checkpoint save); `distill run` resumes each time."""
    rng = np.random.default_rng(seed)
    out = recipe.parent / f"killed-{seed}"
    run_dir = out / "tiny-timm"
    suffix = ":save" if phase == "save" else ""
    step = int(rng.integers(2, TEACHER_STEPS + 1))  # from 2: a state of an earlier step is there to resume
    r = distill("run", recipe, f"output_dir={out}", stop_at=f"teacher:{step}:SIGKILL{suffix}")
    assert_killed_at(r, run_dir / "teacher", step, phase)

    # resumes the teacher, then goes on to the student
    step = int(rng.integers(2, STUDENT_STEPS + 1))
    r = distill("run", recipe, f"output_dir={out}", stop_at=f"students.0:{step}:SIGKILL{suffix}")
    assert "teacher: resumed from" in r.stdout, r.stdout[-3000:]
    assert_killed_at(r, run_dir / "students" / "kd", step, phase)

    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_resumed_run(uninterrupted, run_dir)
    # a complete run keeps only its results: the states are removed
    assert not (run_dir / "teacher" / "resume").exists()
    assert not (run_dir / "students" / "kd" / "resume").exists()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_learn_resume_continues(recipe, uninterrupted):
    out = recipe.parent / "sigterm"
    run_dir = out / "tiny-timm"
    r = distill("teach", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = distill("learn", recipe, f"output_dir={out}", stop_at="students.0:5:SIGTERM")
    stderr = r.stderr
    assert r.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("interrupted:", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("interrupted: students.0: SIGTERM at step"), stderr[-3000:]
    assert lines[0].startswith("interrupted: students.0: SIGTERM at step 5 "), lines[0]
    assert "--resume" in lines[0]
    assert (run_dir / "students" / "kd" / "resume" / "state" / "progress.json").is_file()
    assert state_step(run_dir / "students" / "kd") == 5  # the step under way is finished and saved

    r = distill("learn", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "students.0: resumed from" in r.stdout, r.stdout[-3000:]
    assert_resumed_run(uninterrupted, run_dir)


@pytest.mark.slow
def test_sigint_during_teach_then_teach_resume(recipe, uninterrupted):
    out = recipe.parent / "sigint"
    run_dir = out / "tiny-timm"
    r = distill("teach", recipe, f"output_dir={out}", stop_at="teacher:3:SIGINT")
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-3000:]
    assert "interrupted: teacher: SIGINT at step" in r.stderr
    assert "interrupted: teacher: SIGINT at step 3 " in r.stderr, r.stderr[-3000:]
    assert state_step(run_dir / "teacher") == 3
    r = distill("teach", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher: resumed from" in r.stdout, r.stdout[-3000:]
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


@pytest.mark.slow
def test_resume_of_another_recipe_starts_over(recipe, uninterrupted):
    """A state saved for another recipe is not loaded: `--resume` starts over (and says so)."""
    out = recipe.parent / "other"
    run_dir = out / "tiny-timm"
    r = distill("teach", recipe, f"output_dir={out}", "teacher.optim.lr=0.05", stop_at="teacher:2:SIGTERM")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert state_step(run_dir / "teacher") == 2
    r = distill("teach", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is of another recipe: starting over" in r.stdout
    assert_resumed_run(uninterrupted, run_dir, parts=("teacher",))


@pytest.mark.slow
def test_kill_after_the_best_checkpoint_and_in_fixres_then_resume(recipe, uninterrupted):
    """SIGKILL at the end of the teacher's first epoch, after its best checkpoint and before the epoch's state;
    then in the second FixRes epoch (its state is saved at epoch ends); `distill run` resumes both, and the
    FixRes model ends bit-identical too."""
    out = recipe.parent / "epoch-and-fixres"
    run_dir = out / "tiny-timm"
    r = distill("run", recipe, f"output_dir={out}", stop_at="teacher:6:SIGKILL:epoch")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run_dir / "teacher" / "model.safetensors").is_file()  # epoch 1's best checkpoint is written
    assert state_step(run_dir / "teacher") == 6  # the in-epoch state of its last step, not the epoch's
    r = distill("run", recipe, f"output_dir={out}", stop_at="students.0.fixres:15:SIGKILL")
    assert "teacher: resumed from" in r.stdout, r.stdout[-3000:]
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    fixres_dir = run_dir / "students" / "kd" / "fixres"
    assert (run_dir / "students" / "kd" / "metrics.json").is_file() and not (fixres_dir / "metrics.json").exists()
    assert state_step(fixres_dir) == 12  # the end of the first FixRes epoch
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "students.0.fixres: resumed from" in r.stdout, r.stdout[-3000:]
    assert_same_run(uninterrupted, run_dir, ("teacher", "students/kd", "students/kd/fixres"),
                    weights_only=("teacher/last",))
    assert not (fixres_dir / "resume").exists()
