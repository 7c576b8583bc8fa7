"""One writer per run directory (distill/runlock.py): a second writer stops at once naming the holder; a killed
holder leaves no lock; one process may take the lock again (distill run → teach → learn)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.runlock import LOCK_NAME, holder, one_writer

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k not in ("DISTILL_STOP_AT", "RANK")}, "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def hold_in_child(run_dir: Path) -> subprocess.Popen:
    """Another process holding the lock of `run_dir` until it is killed (it says `held` once it has it)."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom distill.runlock import one_writer\n"
            f"with one_writer(Path({str(run_dir)!r}), 'distill run recipes/x.yaml'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    child = hold_in_child(run_dir)
    try:
        info = holder(run_dir)
        assert info["pid"] == child.pid and info["command"] == "distill run recipes/x.yaml"
        started = time.perf_counter()
        with pytest.raises(DistillError) as e, one_writer(run_dir):
            pass
        assert time.perf_counter() - started < 1
        message = str(e.value)
        assert f"pid {child.pid} on {os.uname().nodename} since " in message
        assert "distill run recipes/x.yaml" in message and str(run_dir) in message
    finally:
        child.kill()
        child.wait()
    # SIGKILL leaves the file but not the lock: the next writer goes ahead, and names itself
    assert (run_dir / LOCK_NAME).exists() and holder(run_dir) is None
    with one_writer(run_dir, "me"):
        assert holder(run_dir)["pid"] == os.getpid()


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
    run_dir = tmp_path / "x"
    with one_writer(run_dir), one_writer(run_dir):  # distill run holds it and calls teach, which takes it again
        (run_dir / "config.yaml").write_text("name: x\n")
        assert holder(run_dir)["pid"] == os.getpid()
    assert holder(run_dir) is None
    code = f"from pathlib import Path\nfrom distill.runlock import one_writer\nwith one_writer(Path({str(run_dir)!r})): print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert r.stdout.strip() == "ok", r.stderr


def test_a_command_that_writes_nothing_leaves_no_run_directory(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with pytest.raises(DistillError), one_writer(run_dir):
        raise DistillError("a check failed before anything was written")
    assert not (tmp_path / "runs").exists()  # the output_dir too, which taking the lock had made


def test_only_rank_0_of_a_job_takes_the_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "x"
    child = hold_in_child(run_dir)
    try:
        monkeypatch.setenv("RANK", "1")  # rank 1 of a torchrun job: its rank 0 holds (or is refused) the lock
        with one_writer(run_dir):
            pass
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("command", ["run", "teach", "learn"])
def test_distill_commands_refuse_a_run_directory_in_use(tmp_path, command):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndata: {source: digits}\nteacher: {model: timm:resnet10t, epochs: 1}\n"
                      "students: [{name: s, model: timm:resnet10t, resolution: 16}]\n")
    run_dir = tmp_path / "runs" / "x"
    child = hold_in_child(run_dir)
    try:
        r = subprocess.run([sys.executable, "-m", "distill.cli", command, str(recipe), f"output_dir={tmp_path / 'runs'}"],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120, check=False)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {child.pid}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing else was written
