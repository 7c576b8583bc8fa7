"""Resumable training: atomic accelerate-state checkpoints with the loop's progress, and a clean stop on SIGTERM/SIGINT."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import load_model, save_model

from distill import results
from distill.disk import agree, check_free, full_disk_reason, remove
from distill.errors import DistillError, Interrupted


@dataclasses.dataclass
class Progress:
    """Where a training loop is, and what it has gathered so far: all a resumed run needs besides the weights."""

    epoch: int = 0  # epochs complete
    batch: int = 0  # batches of epoch `epoch` already trained on (per process)
    step: int = 0  # optimizer updates
    best: dict | None = None  # the selected checkpoint's validation metrics
    history: list = dataclasses.field(default_factory=list)
    bad_steps: list = dataclasses.field(default_factory=list)  # steps skipped for a non-finite loss
    stale_evals: int = 0  # evaluations since the best one (early stopping)
    stopped_early: bool = False
    mix_kl: list = dataclasses.field(default_factory=list)  # online KD: cached-mixing approximation error
    before: dict | None = None  # FixRes: the metrics before its fine-tune, by resolution (str)
    train_images: int = 0  # of complete epochs and of the resumed part of an epoch, over train_seconds
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # of the sessions before this one, until `clock()`

    def __post_init__(self):
        self._since = time.perf_counter()

    def clock(self) -> float:
        """Wall seconds so far, over every session of this run."""
        now = time.perf_counter()
        self.wall_seconds += now - self._since
        self._since = now
        return self.wall_seconds


def epoch_batches(accelerator, loader, sampler, dataset, epoch: int, skip: int):
    """The prepared training loader for `epoch` (its order, views and augmentations), without the first `skip`
    batches, which a resumed run has already trained on (accelerate skips them without loading them)."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    loader.set_epoch(epoch)  # accelerate's own epoch counter, which it passes on when iterating
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def planned_stop(where: str, step: int, phase: str = "step") -> None:
    """A test's exact stopping point instead of a race against a timer: DISTILL_STOP_AT="<where>:<step>:<SIGNAL>"
    (comma-separated for several) sends this process SIGNAL once stage `where` ("teacher", "teacher-fold-1",
    "students.0", "students.0.fixres") has done optimizer step `step`, before that step's checkpoint; with a
    fourth field `save`, half-way through that step's checkpoint save instead; with `epoch`, at the end of the
    epoch that step ends, after its evaluation and best checkpoint, before the epoch's state is saved."""
    if os.environ.get("DISTILL_STOP_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return  # DISTILL_STOP_RANK=<rank>: only that process of a torchrun job stops
    for item in filter(None, os.environ.get("DISTILL_STOP_AT", "").split(",")):
        w, s, sig, *rest = item.split(":")
        if w == where and int(s) == step and (rest[0] if rest else "step") == phase:
            signal.raise_signal(signal.Signals[sig])


class Checkpoints:
    """The resumable state of one training loop in `<out_dir>/resume/state/`.

    Every process calls `save`: accelerate writes the model, optimizer, gradient scaler and each process's RNG
    states (`Accelerator.save_state`), then the main process adds the EMA weights and `progress.json` (epoch,
    batch, step, best metrics, history, ...), written last as the mark of a complete state. It all goes to
    `state.tmp/` first, which then replaces `state/` by renames, so a kill at any instant leaves one complete
    state (`state.old/` between the two renames). The loop's randomness is a function of (seed, epoch, index)
    (`loaders.EpochSampler`, `loaders.batch_rng`, seeded augmentation), so a resumed run continues bit for bit.
    """

    def __init__(self, accelerator, out_dir: Path, fingerprint: str, every_steps: int, where: str):
        self.accelerator, self.fingerprint, self.every_steps, self.where = accelerator, fingerprint, every_steps, where
        self.dir = Path(out_dir) / "resume"

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def latest(self) -> Path | None:
        for name in ("state", "state.old"):  # state.old: killed between the two renames of a save
            if (self.dir / name / "progress.json").is_file():
                return self.dir / name
        return None

    def save(self, progress: Progress, ema=None) -> Path:
        """Write the state (every process calls it). Refused with one line before anything is written when the
        disk lacks room for it; a write that fails midway (a full disk) removes state.tmp/ and stops every
        process with one line, and the previous state stays whole for --resume."""
        acc = self.accelerator
        tmp, final, old = self.dir / "state.tmp", self.dir / "state", self.dir / "state.old"
        refused = None
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed half-way
            try:
                check_free(self.dir, self._state_bytes(ema), f"{self.where}: the checkpoint in {self.dir}",
                           self._space_hint())
            except DistillError as e:
                refused = str(e)
        # also the barrier before writing: state.tmp/ is gone before any process writes to it
        refused = agree(acc, refused)
        if refused:
            raise DistillError(refused)
        error = None
        try:
            acc.save_state(str(tmp))  # which creates state.tmp/
            if acc.is_main_process:
                if ema is not None:
                    save_model(ema, str(tmp / "ema.safetensors"))
                record = {**dataclasses.asdict(progress), "wall_seconds": progress.clock(),
                          "fingerprint": self.fingerprint, "num_processes": acc.num_processes}
                (tmp / "progress.json").write_text(json.dumps(record, indent=1, default=float))
        except Exception as e:  # noqa: BLE001 - every process hears of any failure, so none waits for the others
            error = e
        failed = agree(acc, None if error is None else self._save_failed(tmp, final, error))
        if failed:
            if acc.is_main_process:
                remove(tmp)
            if error is not None and full_disk_reason(error) is None:
                raise error  # not the disk: a bug keeps its traceback
            raise DistillError(failed)
        if acc.is_main_process:
            planned_stop(self.where, progress.step, "save")  # tests: a kill between the write and the renames
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _state_bytes(self, ema) -> int:
        """What a save writes: the size of the state saved before, else of the model, optimizer and EMA
        tensors (Adam's moments included) that accelerate holds."""
        previous = self.latest()
        if previous is not None:
            return sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
        acc = self.accelerator
        tensors = [t for m in getattr(acc, "_models", []) for t in m.state_dict().values()]
        for optimizer in getattr(acc, "_optimizers", []):
            tensors += [t for state in optimizer.state_dict()["state"].values() for t in state.values()]
        tensors += list(ema.state_dict().values()) if ema is not None else []
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    def _space_hint(self) -> str:
        if self.every_steps > 0:
            return "free some space, or save less often (checkpoint.every_steps; 0: at epoch ends only)"
        return "free some space"

    def _save_failed(self, tmp: Path, final: Path, error: Exception) -> str:
        """The line every process stops with when the save failed on one of them."""
        kept = f"the state in {final} is kept (--resume continues from it)" if self.latest() else "no state is kept"
        reason = full_disk_reason(error)
        if reason is None:  # the failed process raises its own error; this is the others' line
            return (f"{self.where}: saving the checkpoint to {tmp} failed on process "
                    f"{self.accelerator.process_index} ({type(error).__name__}); {kept}")
        return f"{self.where}: saving the checkpoint to {tmp} failed: {reason}; {kept}; {self._space_hint()}"

    def load(self, ema=None) -> Progress | None:
        """The progress of the saved state after loading it into the prepared objects (and `ema`), or None when
        there is no state for this recipe (a state of another recipe is left for `clear` to remove)."""
        acc, path = self.accelerator, self.latest()
        if path is None:
            return None
        progress = json.loads((path / "progress.json").read_text())
        if progress.get("fingerprint") != self.fingerprint:
            acc.print(f"{self.where}: the saved state in {path} is of another recipe: starting over")
            return None
        if progress["num_processes"] != acc.num_processes:
            raise DistillError(f"{self.where}: the state in {path} was saved by {progress['num_processes']} "
                               f"process(es), this run has {acc.num_processes}; resume with "
                               f"{progress['num_processes']}, or start over without --resume")
        acc.load_state(str(path))
        if ema is not None:
            load_model(ema, str(path / "ema.safetensors"), device=str(acc.device))
        acc.print(f"{self.where}: resumed from {path} (epoch {progress['epoch'] + 1}, batch {progress['batch']}, "
                  f"step {progress['step']})")
        fields = {f.name for f in dataclasses.fields(Progress)}
        return Progress(**{k: v for k, v in progress.items() if k in fields})

    def start(self, resume: bool, ema=None) -> Progress:
        """Where the loop starts: the saved state with `resume` (when there is one for this recipe), else a
        fresh Progress, after removing any old state so that it is never mixed in (and saying so)."""
        progress = self.load(ema) if resume else None
        if progress is not None:
            if self.accelerator.is_main_process:
                results.resumed(self.dir.parent, self.fingerprint)
            return progress
        if not resume and self.latest() is not None:
            self.accelerator.print(f"{self.where}: starting over; the saved state in {self.latest()} is removed "
                                   "(--resume continues from it)")
        self.clear()
        if self.accelerator.is_main_process:  # until this attempt's metrics.json, the folder is INCOMPLETE
            previous = results.begin(self.dir.parent, self.fingerprint)
            if previous is not None:
                self.accelerator.print(f"{self.where}: the earlier result in {self.dir.parent} moved to {previous}")
        self.accelerator.wait_for_everyone()
        return Progress()

    def complete(self, progress: Progress) -> None:
        """The stage's metrics.json is written: its state is no longer needed (a kill before this point leaves
        a complete stage with its state, which `distill run` skips and tidies)."""
        planned_stop(self.where, progress.step, "done")  # tests: a kill between the metrics and the clearing
        self.clear()

    def clear(self) -> None:
        """Remove the state: at a fresh start (so an old one is never mixed in) and once the run is complete."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()


class StopSignal:
    """SIGTERM (a pre-empted job) or SIGINT (Ctrl-C) asks the loop to save its state and stop after the step
    under way; a second signal stops at once. Every process must agree on the step to stop at, so `requested`
    combines the flags of all processes."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # the second one: do not wait for the step to end
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator) -> int:
        """The signal number to stop for (0: go on), the same on every process."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.gather(flag).max())

    def stop(self, where: str, step: int, epoch: int, path: Path) -> Interrupted:
        name = signal.Signals(self.signum).name
        return Interrupted(f"{where}: {name} at step {step} (epoch {epoch + 1}): the state is saved in {path}; "
                           "continue with --resume (`distill run` continues on its own)", 128 + self.signum)
