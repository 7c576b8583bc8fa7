"""Threads on a busy machine (distill/threads.py) and the plain progress line where no bar shows (training.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate import Accelerator

from distill import cli, threads, training
from distill.checkpoint import Progress
from distill.errors import DistillError
from distill.loaders import make_loader
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_auto_respects_an_omp_num_threads_the_user_set(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 8)
    assert threads.auto_threads({"OMP_NUM_THREADS": "1"}) == 1  # tests and CI: the golden numbers stay
    assert threads.auto_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == 3
    assert threads.auto_threads({"OMP_NUM_THREADS": "junk"}) == 8


def test_auto_is_affinity_within_the_cgroup_quota_per_local_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    assert threads.cpus() == 8 and threads.auto_threads({}) == 8
    assert threads.auto_threads({"LOCAL_WORLD_SIZE": "2"}) == 4  # torchrun / accelerate: two processes here
    assert threads.auto_threads({"LOCAL_WORLD_SIZE": "16"}) == 1
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 2.5)  # docker --cpus 2.5: rounded down
    assert threads.cpus() == 2 and threads.auto_threads({"LOCAL_WORLD_SIZE": "2"}) == 1
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 0.5)
    assert threads.cpus() == 1


def test_cgroup_quota_from_v2_and_v1_files(tmp_path):
    assert threads.cgroup_cpus(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpus(str(tmp_path)) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpus(str(tmp_path)) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpus(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert threads.cgroup_cpus(str(v1)) == 2.0


def test_the_command_line_beats_the_recipe(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert threads.resolve(3) == 3
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.resolve(3) == 2 and threads.resolve("auto") == 2
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(DistillError, match="--threads"):
        threads.resolve("auto")


def test_the_recipe_key_is_checked():
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml").threads == "auto"
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml", ["threads=3"]).threads == 3
    for bad in ("0", "fast", "true", "1.5"):
        with pytest.raises(DistillError, match=r"^threads: expected an integer in \[1, 4096\] or 'auto'"):
            load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"threads={bad}"])


# a child that reports, as it exits, the threads it ran on: the command fails on purpose right after applying them
REPORT = ("import atexit, os, sys, torch\n"
          "atexit.register(lambda: print('THREADS', torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'), "
          "flush=True))\n"
          "from distill import cli\n"
          "cli.main(sys.argv[1:])\n")


@pytest.mark.parametrize("case", ["recipe key", "override", "--threads beats the recipe", "no recipe"])
def test_the_setting_reaches_torch(tmp_path, case):
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["threads"] = 1 if case == "recipe key" else 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # teach --export-only without a saved teacher: an error line once the threads are set, before any work
    argv = ["teach", str(path), f"output_dir={tmp_path / 'runs'}", "--export-only"]
    if case == "override":
        argv.append("threads=1")
    elif case == "--threads beats the recipe":
        argv += ["--threads", "1"]
    elif case == "no recipe":
        argv = ["predict", str(tmp_path / "no-model"), str(tmp_path), "--out", str(tmp_path / "p.csv"),
                "--threads=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV)}
    r = subprocess.run([sys.executable, "-c", REPORT, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env, "HF_HUB_OFFLINE": "1"}, check=False)
    assert r.returncode == 2 and "error:" in r.stderr, r.stderr[-2000:]
    assert "THREADS 1 1" in r.stdout, (r.stdout, r.stderr[-2000:])  # torch's default here would be 2 (or more)


def test_a_bad_threads_option_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "runs/x", "--threads", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().startswith("error: --threads: expected an integer")
    assert threads.ENV not in os.environ


def test_a_busy_machine_gets_one_warning_line(monkeypatch, capsys):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.04, 1.0, 1.0))
    line = threads.warn_if_busy(2)
    assert "busy (load 5.0 on 2 CPUs)" in line and "threads=2" in line and "threads=1" in line
    assert capsys.readouterr().err == line + "\n"
    assert threads.warn_if_busy(1) is None  # nothing left to lower
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert threads.warn_if_busy(2) is None


def test_passive_waiting_only_before_torch_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 1.0, 1.0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not threads.passive_when_busy()  # torch is imported in this process: too late
    monkeypatch.delitem(sys.modules, "torch")
    assert threads.passive_when_busy() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not threads.passive_when_busy() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_dataloader_worker_computes_on_one_thread():
    cv2 = pytest.importorskip("cv2")

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])

    threads = cv2.getNumThreads()
    recipe = SimpleNamespace(seed=0, data=SimpleNamespace(num_workers=1))
    loader = make_loader(Probe(), 2, recipe, train=False)
    assert next(iter(loader)).tolist() == [[1, threads], [1, threads]]  # OpenCV's: the parent's, as `apply` set it


def test_workers_and_threads_over_the_cpus_get_one_note(monkeypatch, capsys):
    if torch.accelerator.is_available():
        pytest.skip("the note is for CPU-only runs")
    monkeypatch.setattr(threads, "cpus", lambda: 2)
    monkeypatch.setattr(threads, "_applied", 2)
    monkeypatch.setattr(threads, "_noted", False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert threads.workers_note(0) is None
    assert "data.num_workers 2 + threads 2 exceed the 2 CPUs" in threads.workers_note(2)
    assert threads.workers_note(2) is None  # once per process
    assert capsys.readouterr().err.count("note:") == 1


def test_the_progress_line_clock():
    now = [100.0]
    line = training.ProgressLine(30, clock=lambda: now[0])
    assert not line.due()
    now[0] = 131.0
    assert line.due() and not line.due()
    assert line.eta(done=10, left=20) == "1m02s"  # 31 s for 10, so 62 s for 20
    assert training.duration(3725) == "1h02m" and training.duration(42) == "42s"


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.zeros(3), i

    def set_epoch(self, epoch):
        pass


def loop_output(capsys, terminal: bool, monkeypatch) -> str:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    accelerator = Accelerator(cpu=True)
    recipe = SimpleNamespace(seed=0, data=SimpleNamespace(num_workers=0))
    loader = make_loader(Numbers(), 2, recipe, train=True)
    sampler = loader.sampler
    loader = accelerator.prepare(loader)
    log = SimpleNamespace(progress=True, progress_seconds=0)
    batches = training.resumable_batches(accelerator, loader, sampler, Numbers(), Progress(), 1, 3, "teacher", log)
    for _, (x, _y) in batches:
        batches.report(torch.tensor(0.25) + x.sum())
    return capsys.readouterr().out


def test_a_plain_progress_line_where_stderr_is_not_a_terminal(capsys, monkeypatch):
    lines = loop_output(capsys, False, monkeypatch).splitlines()
    assert len(lines) == 4  # progress_seconds 0: every update
    assert re.fullmatch(r"teacher epoch 2/3 batch 1/4 loss 0\.2500 [\d.]+ img/s ETA \d+s", lines[0]), lines[0]
    assert lines[-1].startswith("teacher epoch 2/3 batch 4/4 loss 0.2500")


def test_no_plain_line_under_a_bar(capsys, monkeypatch):
    assert loop_output(capsys, True, monkeypatch) == ""
