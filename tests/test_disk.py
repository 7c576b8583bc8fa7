"""A disk short of space is refused before a write starts, with one line; a disk that fills up midway leaves the
previous complete state (a file, a model, a checkpoint, the store's shards) and one line naming the path.

A full disk is simulated for real without root: a lowered soft RLIMIT_FSIZE with SIGXFSZ ignored makes every write
past the limit fail with EFBIG, in whatever library does it (Python, safetensors' Rust, torch.save's C++). The
up-front checks are driven by a patched shutil.disk_usage."""
import contextlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill import store
from distill.checkpoint import Checkpoints, Progress
from distill.data import Preprocess, load_splits
from distill.disk import check_free
from distill.errors import DistillError
from distill.recipe import DataConfig, StudentConfig, TargetsConfig
from distill.runs import write_json

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes of a file fail with EFBIG while inside (only the soft limit is lowered, so it
    can be raised again)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def short_disk(monkeypatch, tmp_path, free: int) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def files(folder: Path) -> dict:
    """Every file under `folder` (hidden temporary files too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_check_free_refuses_with_one_line_naming_the_disk(tmp_path, monkeypatch):
    short_disk(monkeypatch, tmp_path, 5 * 2**20)
    assert check_free(tmp_path / "not" / "yet", 2**20, "x", "do y") == 5 * 2**20  # the nearest existing folder
    with pytest.raises(DistillError) as e:
        check_free(tmp_path / "not" / "yet", 300 * 2**20, "stage: the thing", "free some space")
    assert str(e.value) == f"stage: the thing needs about 300 MiB and {tmp_path} has 5.0 MiB free; free some space"


def test_the_store_estimate_keeps_its_line(tmp_path, monkeypatch):
    short_disk(monkeypatch, tmp_path, 10_000)
    with pytest.raises(DistillError) as e:
        store.check_space(TargetsConfig(views=16), 1000, 10, tmp_path / "targets")
    assert "\n" not in str(e.value)
    assert re.match(rf"targets: the store needs about 0\.\d MiB and {re.escape(str(tmp_path))} ", str(e.value))
    assert str(e.value).endswith("has 0.0 MiB free; lower targets.views (16), keep top-k logits "
                                 "(targets.logits: topk), or free some space")


def test_write_json_that_fails_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"top1": 0.5})
    before = files(tmp_path)
    with file_size_limit(1000), pytest.raises(DistillError) as e:
        write_json(path, {"history": ["x" * 100] * 100})
    assert str(e.value) == f"writing {path} failed: File too large; it is left as it was; free some space and run again"
    assert files(tmp_path) == before  # no temporary file left either
    with file_size_limit(1000), pytest.raises(DistillError, match="new.json failed: File too large"):
        write_json(tmp_path / "sub" / "new.json", {"history": ["x" * 100] * 100})
    assert not (tmp_path / "sub" / "new.json").exists() and not any((tmp_path / "sub").iterdir())


def test_save_model_that_fails_midway_keeps_the_previous_model(tmp_path):
    from distill.models import build_model, load_model, save_model

    torch.manual_seed(0)
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=16, crop_pct=1.0),
                             3, where="students.0", classes=["a", "b", "c"])
    save_model(model, pre, tmp_path / "s", ["a", "b", "c"])
    before = files(tmp_path / "s")
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)
    with file_size_limit(100_000), pytest.raises(DistillError) as e:
        save_model(model, pre, tmp_path / "s", ["a", "b", "c"])
    assert f"writing {tmp_path / 's' / 'model.safetensors'} failed: File too large" in str(e.value)
    assert files(tmp_path / "s") == before
    load_model(tmp_path / "s")  # whole: its weights match model.json's sha256


class Run:
    """A tiny model and Adam, prepared by a CPU Accelerator, and their Checkpoints in `out`."""

    def __init__(self, out: Path, seed: int = 0):
        from accelerate import Accelerator

        torch.manual_seed(seed)
        self.acc = Accelerator(cpu=True)
        model = torch.nn.Linear(64, 256)  # weights 66 kB; Adam's state (two moments) twice that
        self.model, self.optimizer = self.acc.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))
        self.checkpoints = Checkpoints(self.acc, out, "fp", 1, "teacher")

    def step(self):
        self.model(torch.randn(8, 64)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def saved_step(out: Path, name: str = "state") -> int | None:
    path = out / "resume" / name / "progress.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.step()
    with monkeypatch.context() as m:
        short_disk(m, tmp_path, 100_000)
        with pytest.raises(DistillError) as e:  # the first save: the estimate is the tensors' size
            run.checkpoints.save(Progress(step=1))
    message = str(e.value)
    assert "\n" not in message and not (tmp_path / "resume").exists()
    assert message.startswith(f"teacher: the checkpoint in {tmp_path / 'resume'} needs about 0.2 MiB and {tmp_path} "
                              "has 0.1 MiB free; free some space, or save less often (checkpoint.every_steps")
    run.checkpoints.save(Progress(step=1))
    before = files(tmp_path / "resume")
    run.step()
    short_disk(monkeypatch, tmp_path, 100_000)
    with pytest.raises(DistillError, match=r"teacher: the checkpoint in .* needs about 0.2 MiB"):
        run.checkpoints.save(Progress(step=2))  # the estimate: the state saved before
    assert files(tmp_path / "resume") == before


@pytest.mark.parametrize("limit, writer", [(30_000, "safetensors"), (100_000, "torch.save")])
def test_a_checkpoint_that_fails_midway_keeps_the_previous_state_and_resumes(tmp_path, limit, writer):
    """Below the weights' size safetensors fails (on the model); between them and Adam's state, torch.save."""
    run = Run(tmp_path)
    run.step()
    run.checkpoints.save(Progress(step=1))
    saved, before = run.weights(), files(tmp_path / "resume")
    run.step()
    with file_size_limit(limit), pytest.raises(DistillError) as e:
        run.checkpoints.save(Progress(step=2))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"teacher: saving the checkpoint to {tmp_path / 'resume' / 'state.tmp'} failed: ")
    assert ("File too large" if writer == "safetensors" else "torch.save could not write it") in message
    assert message.endswith(f"the state in {tmp_path / 'resume' / 'state'} is kept (--resume continues from it); "
                            "free some space, or save less often (checkpoint.every_steps; 0: at epoch ends only)")
    assert files(tmp_path / "resume") == before  # state.tmp/ is gone, state/ untouched

    again = Run(tmp_path, seed=1)  # a resumed run: other weights until the state is loaded
    assert again.checkpoints.load().step == 1
    assert_same(again.weights(), saved)
    again.step()
    assert again.checkpoints.save(Progress(step=2)) == tmp_path / "resume" / "state"
    assert saved_step(tmp_path) == 2 and not (tmp_path / "resume" / "state.tmp").exists()


def digits_export(out: Path, **kwargs) -> dict:
    from accelerate import Accelerator

    train, _ = load_splits(DataConfig(source="digits"))
    samples = store.Samples(train.subset(np.arange(64)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, len(train.classes)))
    pre = Preprocess(input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0)
    return store.export(model, pre, samples, train.classes, TargetsConfig(views=2, shard_size=16), 0, out,
                        Accelerator(cpu=True), {"sha256": "x"}, progress=False, **kwargs)


def test_a_store_export_failing_midway_names_the_shard_and_a_rerun_completes_the_same_store(tmp_path, monkeypatch):
    export_module = importlib.import_module("distill.store.export")  # `store.export` is the function
    write_shard = export_module.write_shard

    def disk_full_at_shard_2(out, s, *args):
        with file_size_limit(1000) if s == 2 else contextlib.nullcontext():
            write_shard(out, s, *args)

    out = tmp_path / "targets"
    monkeypatch.setattr(export_module, "write_shard", disk_full_at_shard_2)
    with pytest.raises(DistillError) as e:
        digits_export(out)
    assert str(e.value) == (f"targets: writing {out / 'shard-00002.safetensors'} failed: File too large; the shards "
                            "written so far are kept; free some space and resume the export (distill run, or "
                            "distill teach <recipe.yaml> --export-only)")
    assert sorted(files(out)) == ["shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
                                  "shard-00001.safetensors"]  # the failed shard's temporary file is gone
    monkeypatch.setattr(export_module, "write_shard", write_shard)
    resumed = digits_export(out)
    uninterrupted = digits_export(tmp_path / "uninterrupted")
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in uninterrupted["shards"]]
    assert resumed["export"]["rows_exported_now"] == 2 * 16 * 3  # shards 2 and 3 only


def distill(*args, limit: int | None = None, stop_at: str = "") -> subprocess.CompletedProcess:
    """`distill ARGS` in a subprocess; `limit`: its files stop growing at that many bytes (EFBIG)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**{k: v for k, v in os.environ.items() if k != "DISTILL_STOP_AT"}, "HF_HUB_OFFLINE": "1",
           **({"DISTILL_STOP_AT": stop_at} if stop_at else {})}
    return subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False,
                          preexec_fn=limited if limit else None)


@pytest.mark.slow
def test_teach_stops_with_one_line_when_the_disk_fills_up_then_resumes(tmp_path):
    """A fine-tune whose checkpoint save hits a full disk exits 2 with one `error:` line and the previous state;
    `--resume` with room again continues from it and completes."""
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    raw["data"]["subset"] = 400
    raw["teacher"]["epochs"] = 1
    raw["targets"]["export"] = False
    raw["checkpoint"] = {"every_steps": 1}
    raw["log"] = {"progress": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out, stage_dir = tmp_path / "runs", tmp_path / "runs" / "tiny-timm" / "teacher"

    r = distill("teach", recipe, f"output_dir={out}", stop_at="teacher:3:SIGKILL")
    assert r.returncode == -signal.SIGKILL and saved_step(stage_dir) == 2, r.stderr[-3000:]
    # the resnet10t's weights are ~20 MB: the step-3 save is the first file past 1 MB
    r = distill("teach", recipe, f"output_dir={out}", "--resume", limit=2**20)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"teacher: saving the checkpoint to {stage_dir / 'resume' / 'state.tmp'} failed: File too large" \
           in errors[0]
    assert saved_step(stage_dir) == 2 and not (stage_dir / "resume" / "state.tmp").exists()
    r = distill("teach", recipe, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher: resumed from" in r.stdout and "step 2)" in r.stdout, r.stdout[-3000:]
    assert (stage_dir / "metrics.json").is_file()


TWO_PROCESSES = """
import resource, signal, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from distill.checkpoint import Checkpoints, Progress
from distill.errors import DistillError, exit_on_error

@exit_on_error
def main(out, failing):
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 256)
    model, optimizer = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=0.1))
    checkpoints = Checkpoints(acc, Path(out), "fp", 1, "teacher")
    for step in (1, 2):
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 2 and acc.process_index == failing:  # this process's files stop at 1 kB
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        checkpoints.save(Progress(step=step))

main(sys.argv[1], int(sys.argv[2]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1])
def test_two_processes_stop_together_when_one_save_fails(tmp_path, failing):
    """The main process's model save (0) or the other's RNG state (1) hits the limit: both processes stop with
    the same line instead of one waiting for the other, and the state of step 1 stays."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                        str(tmp_path), str(failing)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: teacher: saving the checkpoint")]
    assert len(errors) >= 1 and len(set(errors)) == 1, r.stderr[-3000:]  # the launcher may stop the second
    assert saved_step(tmp_path) == 1 and not (tmp_path / "resume" / "state.tmp").exists()
