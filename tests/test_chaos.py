"""The chaos test: one `distill run` of a tiny recipe with two students and FixRes, killed at chosen instants in
every stage (during a step, half-way through a checkpoint save, after an epoch's best checkpoint, after a stage's
metrics.json but before its state is cleared, between two shards of the export, SIGTERM's clean stop) and run
again after each kill, ends with the run directory of an uninterrupted run: the same weights bit for bit, the
same metrics.json apart from timings. After every kill each stage folder is complete or marked INCOMPLETE.

Every kill is planned (DISTILL_STOP_AT, distill/checkpoint.py `planned_stop`), not raced against a timer."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_run

from distill import results

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k not in ("DISTILL_STOP_AT", "DISTILL_STOP_RANK")},
       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PARTS = ("teacher", "students/a", "students/b", "students/a/fixres", "students/b/fixres")

# (stop, exit status): in stage order, so each re-run goes on to the next instant
KILLS = [
    ("teacher:3:SIGKILL", -signal.SIGKILL),  # after a step's update, before its checkpoint
    ("teacher:8:SIGKILL:save", -signal.SIGKILL),  # half-way through a checkpoint save
    ("teacher:12:SIGKILL:done", -signal.SIGKILL),  # metrics.json written, the state not yet cleared
    ("export:1:SIGKILL:shard", -signal.SIGKILL),  # two of four shards written
    ("students.0:6:SIGKILL:epoch", -signal.SIGKILL),  # after the epoch's best checkpoint, before its state
    ("students.0:12:SIGKILL:done", -signal.SIGKILL),
    # `distill run` trains the students not complete (each with its FixRes), then the FixRes stages left
    ("students.1:3:SIGTERM", 128 + signal.SIGTERM),  # a pre-empted job: saves and exits with one line
    ("students.1.fixres:6:SIGKILL:save", -signal.SIGKILL),  # FixRes saves at its epochs' ends: 6 steps
    ("students.0.fixres:5:SIGKILL", -signal.SIGKILL),
]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["data"]["subset"] = 400
    raw["teacher"]["epochs"] = 2  # 400 images at batch 64: 6 steps per epoch
    raw["targets"] = {"views": 2, "shard_size": 100}  # four shards
    raw["checkpoint"] = {"every_steps": 1}
    raw["log"] = {"progress": False}
    raw["students"] = [
        {"name": "a", "model": "timm:resnet10t", "resolution": 28, "epochs": 2, "batch_size": 32, "ema": 0.9,
         "mix": {"cutmix_alpha": 1.0}, "optim": {"grad_accum": 2}, "kd": {"loss": "kl", "temperature": 4.0},
         "fixres": {"resolution": 32, "epochs": 1, "lr": 1.0e-3}},  # 12 steps per epoch at batch 32
        {"name": "b", "model": "timm:resnet10t", "resolution": 24, "epochs": 1, "batch_size": 64,
         "kd": {"loss": "dist"}, "fixres": {"resolution": 28, "epochs": 1, "lr": 1.0e-3}},
    ]
    path = tmp_path_factory.mktemp("chaos") / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def distill(*args, stop_at: str = "", env=None) -> subprocess.CompletedProcess:
    env = {**ENV, **(env or {}), **({"DISTILL_STOP_AT": stop_at} if stop_at else {})}
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def uninterrupted(recipe) -> Path:
    out = recipe.parent / "uninterrupted"
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "tiny-timm"


def assert_complete_or_marked(run_dir: Path) -> None:
    """Every stage folder there is complete (its metrics.json describes its weights) or marked INCOMPLETE."""
    for part in PARTS:
        folder = run_dir / part
        if folder.is_dir() and any(p.name not in ("config.yaml",) for p in folder.iterdir()):
            complete = (folder / "metrics.json").is_file() and results.problem(folder) is None
            assert complete or (folder / results.MARKER).is_file(), f"{part}: neither complete nor marked"


def test_killed_in_every_stage_ends_as_an_uninterrupted_run(recipe, uninterrupted):
    out = recipe.parent / "killed"
    run_dir = out / "tiny-timm"
    for stop, status in KILLS:
        r = distill("run", recipe, f"output_dir={out}", stop_at=stop)
        assert r.returncode == status, f"{stop}: {r.returncode}\n{r.stderr[-3000:]}"
        if status > 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("interrupted:", "error:", "Traceback"))]
            assert len(lines) == 1 and lines[0].startswith("interrupted: students.1: SIGTERM"), r.stderr[-2000:]
        assert_complete_or_marked(run_dir)
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir, PARTS, weights_only=("teacher/last",))
    # a finished run keeps its results only: no saved states, no marks, nothing set aside
    assert not list(run_dir.rglob("resume")) and not list(run_dir.rglob(results.MARKER))
    assert not list(run_dir.rglob(results.PREVIOUS)) and (run_dir / "comparison.md").is_file()


def test_an_interrupted_retrain_never_reports_the_old_result(recipe, uninterrupted, tmp_path):
    """The issue's case: a complete student retrained with other settings and stopped (Ctrl-C) half-way."""
    import shutil

    out = tmp_path / "runs"
    run_dir = out / "tiny-timm"
    shutil.copytree(uninterrupted, run_dir)
    old = json.loads((run_dir / "students/a/metrics.json").read_text())
    r = distill("learn", recipe, f"output_dir={out}", "--student", "a", "students.a.epochs=3",
                stop_at="students.0:8:SIGINT")
    assert r.returncode == 128 + signal.SIGINT, r.stderr[-3000:]
    a = run_dir / "students" / "a"
    assert json.loads((a / "previous" / "metrics.json").read_text()) == old
    assert (a / "previous" / "fixres" / "metrics.json").is_file() and not (a / "fixres").exists()
    assert (a / results.MARKER).is_file() and not (a / "metrics.json").exists()

    r = distill("compare", run_dir, "--no-speed")
    assert r.returncode == 0, r.stderr[-3000:]
    table = (run_dir / "comparison.md").read_text()
    assert "| a |" not in table and "| a+fixres |" not in table and "| b |" in table
    assert "warning: a left out:" in r.stderr and "incomplete" in r.stderr and "previous" in r.stderr
    r = distill("predict", a, ROOT / "tests", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "incomplete" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1

    # the recipe as it was: its own training of `a` starts over (the interrupted one was for other settings)
    r = distill("run", recipe, f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, run_dir, PARTS)
    assert json.loads((a / "previous" / "metrics.json").read_text()) == old  # the last complete result, kept


def test_torchrun_a_killed_process_ends_the_job_with_one_line_and_the_rerun_completes(recipe, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "runs"
    run_dir = out / "tiny-timm"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "students" / "b")
    command = ["torchrun", "--nproc_per_node", "2", "distill/learn.py", str(recipe), f"output_dir={out}",
               "--student", "b"]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                       env={**ENV, "DISTILL_STOP_AT": "students.1:3:SIGKILL", "DISTILL_STOP_RANK": "1"})
    assert r.returncode != 0
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and "another process of this job stopped" in ours[0] and "--resume" in ours[0], r.stderr
    assert "[rank0]: Traceback" not in r.stderr  # the survivor's failed collective is that one line
    assert (run_dir / "students" / "b" / results.MARKER).is_file()
    r = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "students.1: resumed from" in r.stdout
    m = json.loads((run_dir / "students" / "b" / "metrics.json").read_text())
    assert m["num_processes"] == 2 and results.problem(run_dir / "students" / "b") is None
    assert not (run_dir / "students" / "b" / "resume").exists()
