"""The small pieces every training loop calls (teach, learn, fixres): resumable batches with their progress,
the non-finite guard, logging, save-when-due and the stop signal, checkpoint selection and early stopping."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from distill.checkpoint import Checkpoints, Progress, StopSignal, epoch_batches, planned_stop
from distill.errors import DistillError
from distill.record import SCORES

LOWER_IS_BETTER = {"nll", "ece"}


class Batches:
    """One epoch's (index, batch) pairs without those a resumed run already trained on, behind a progress bar
    (`log.progress`, main process). tqdm hides the bar when stderr is not a terminal (nohup, a pipe, CI): then
    `report` prints a plain line every `log.progress_seconds` instead (`ProgressLine`)."""

    def __init__(self, accelerator, loader, sampler, dataset, prog: Progress, epoch: int, epochs: int, label: str,
                 log):
        self.skip = prog.batch if epoch == prog.epoch else 0
        self.epoch, self.epochs, self.label, self.total = epoch, epochs, label, len(loader)
        self.index, self.images, self.processes = self.skip - 1, 0, accelerator.num_processes
        show = log.progress and accelerator.is_local_main_process
        self.bar = tqdm(epoch_batches(accelerator, loader, sampler, dataset, epoch, self.skip),
                        desc=f"{label} {epoch + 1}/{epochs}", leave=False, initial=self.skip, total=self.total,
                        disable=None if show else True)
        plain = log.progress and accelerator.is_main_process and not sys.stderr.isatty()
        self.line = ProgressLine(log.progress_seconds) if plain else None

    def __iter__(self):
        for i, batch in enumerate(self.bar, start=self.skip):
            self.index, self.images = i, self.images + len(batch[0]) * self.processes
            yield i, batch

    def report(self, loss) -> str | None:
        """The plain line, when one is due: the stage, epoch, batch, this process's last loss (a GPU sync only
        when printed, no collective), img/s and the stage's ETA (training only) at this session's speed."""
        if self.line is None or not self.line.due():
            return None
        seconds, done = self.line.elapsed(), self.index + 1 - self.skip
        left = self.total - self.index - 1 + (self.epochs - self.epoch - 1) * self.total
        return self.line.show(f"{self.label} epoch {self.epoch + 1}/{self.epochs} batch {self.index + 1}/{self.total} "
                              f"loss {loss.item():.4f} {self.images / seconds:.1f} img/s "
                              f"ETA {self.line.eta(done, left)}")


def resumable_batches(accelerator, loader, sampler, dataset, prog: Progress, epoch: int, epochs: int, label: str,
                      log) -> Batches:
    """`epoch`'s batches of a training loop (`Batches`); call `report(parts["loss"])` once per update."""
    return Batches(accelerator, loader, sampler, dataset, prog, epoch, epochs, label, log)


class ProgressLine:
    """A plain progress line (stdout, flushed) at most every `seconds`, for logs where no bar shows."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.start = self.last = clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return max(self.clock() - self.start, 1e-9)

    def eta(self, done: int, left: int) -> str:
        """The time `left` units take at the speed of the `done` ones since the start."""
        return duration(left * self.elapsed() / max(done, 1))

    def show(self, text: str) -> str:
        print(text, flush=True)
        return text


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epochs(prog: Progress, total: int) -> range:
    """The epochs still to train: none once early stopping ended the run (a resumed run stays stopped)."""
    return range(prog.epoch, prog.epoch if prog.stopped_early else total)


def finite(loss, accelerator, prog: Progress, max_bad: int, where: str, out_dir: Path) -> bool:
    """Whether this step's loss is finite on every process. A non-finite one is skipped (no update, the same
    decision on every process) up to `max_bad` times; then the run stops with an error naming the step, and
    the checkpoint saved before is kept as it is."""
    ok = loss.detach().isfinite().all().float().reshape(1)
    if accelerator.num_processes > 1:
        ok = accelerator.gather(ok)  # one flag per process (reduce knows only sum and mean)
    if bool(ok.min() == 1):
        return True
    step = prog.step + 1
    prog.bad_steps.append(step)
    if len(prog.bad_steps) > max_bad:
        raise DistillError(f"{where}: the loss is not finite ({loss.item()}) at step {step}"
                           + (f" ({len(prog.bad_steps)} bad steps: {prog.bad_steps[:10]})" if max_bad else "")
                           + f"; {kept(out_dir, prog.best)}. Lower {where}.optim.lr, set {where}.optim.clip_grad, "
                           f"or allow {where}.optim.max_bad_steps skipped steps")
    accelerator.print(f"warning: {where}: non-finite loss at step {step}: skipped "
                      f"({len(prog.bad_steps)} of {max_bad} allowed)")
    return False


def kept(out_dir: Path, best: dict | None) -> str:
    """What a failed run leaves behind, for its error message."""
    previous = Path(out_dir) / "previous"
    earlier = f"; the earlier complete result is in {previous}" if (previous / "metrics.json").is_file() else ""
    if best is None:
        return "nothing was saved yet" + earlier
    return f"the checkpoint of epoch {best['epoch']} (val top1 {best['top1']:.4f}) in {out_dir} is kept" + earlier


def clip(accelerator, model, max_norm: float | None) -> None:
    """Clip the gradient norm on the update step of an accumulation (not on the micro-batches before it)."""
    if accelerator.sync_gradients and max_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)


def log_step(accelerator, parts: dict, optimizer, step: int, every: int, last: int, prefix: str = "train") -> None:
    """The loss parts (mean over processes) and the peak lr, every `every` updates and at the last."""
    if step % every and step != last:
        return
    logged = {f"{prefix}/{k}": accelerator.reduce(v.detach(), "mean").item() for k, v in parts.items()}
    logged[f"{prefix}/lr"] = max(g["lr"] for g in optimizer.param_groups)  # layer decay scales the other groups
    accelerator.log(logged, step=step)


def save_when_due(checkpoints: Checkpoints, stop: StopSignal, prog: Progress, epoch: int, batches_done: int,
                  ema=None) -> None:
    """Save the state every `checkpoint.every_steps` updates, and when SIGTERM/SIGINT arrived (then stop)."""
    planned_stop(checkpoints.where, prog.step)
    signum = stop.requested(checkpoints.accelerator)
    if signum or checkpoints.due(prog.step):
        prog.epoch, prog.batch = epoch, batches_done
        path = checkpoints.save(prog, ema)
        if signum:
            raise stop.stop(checkpoints.where, prog.step, epoch, path)


def end_epoch(prog: Progress, epoch: int, started: float, images: int) -> None:
    """Count the epoch's throughput and mark it complete."""
    prog.train_seconds += time.perf_counter() - started
    prog.train_images += images
    prog.epoch, prog.batch = epoch + 1, 0


def eval_due(cfg, epoch: int) -> bool:
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs


def better(metrics: dict, best: dict, select_by: str) -> bool:
    if select_by in LOWER_IS_BETTER:
        return metrics[select_by] < best[select_by]
    return metrics[select_by] > best[select_by]


def select(accelerator, prog: Progress, metrics: dict, epoch: int, cfg, label: str) -> bool:
    """Record an evaluation (history, tracker, one line); True when it is the new best checkpoint (the caller
    saves it), else count it towards early stopping (`patience`)."""
    metrics["epoch"] = epoch + 1
    prog.history.append({"epoch": epoch + 1, **{k: metrics[k] for k in SCORES}})
    accelerator.log({f"val/{k}": metrics[k] for k in SCORES}, step=prog.step)
    accelerator.print(f"{label} epoch {epoch + 1}: val top1 {metrics['top1']:.4f} macro_f1 "
                      f"{metrics['macro_f1']:.4f} nll {metrics['nll']:.4f} "
                      f"({prog.train_images / prog.train_seconds:.0f} train img/s)")
    if prog.best is None or better(metrics, prog.best, cfg.select_by):
        prog.best, prog.stale_evals = metrics, 0
        return True
    prog.stale_evals += 1
    prog.stopped_early = cfg.patience is not None and prog.stale_evals >= cfg.patience
    return False


def schedule_after_eval(scheduler, metrics: dict, epoch: int, cfg) -> None:
    """Tell the lr schedule how the evaluation after `epoch` scored on `select_by` (higher is better, so a lower-
    is-better metric is negated): `optim.schedule: plateau` decays the lr when it stalls; the others ignore it."""
    score = metrics[cfg.select_by]
    scheduler.step(epoch + 1, -score if cfg.select_by in LOWER_IS_BETTER else score)


def save_epoch(checkpoints: Checkpoints, stop: StopSignal, prog: Progress, epoch: int, ema=None) -> None:
    """The state at the epoch's end (after the best checkpoint, which it records); stop here on a signal."""
    planned_stop(checkpoints.where, prog.step, "epoch")  # tests: a kill after the best checkpoint, before this
    path = checkpoints.save(prog, ema)
    if stop.requested(checkpoints.accelerator):
        raise stop.stop(checkpoints.where, prog.step, epoch, path)


def stopped_early(accelerator, prog: Progress, epoch: int, cfg, where: str, label: str) -> bool:
    if prog.stopped_early:
        accelerator.print(f"{label}: no better val {cfg.select_by} in {cfg.patience} evaluation(s): "
                          f"stopped after epoch {epoch + 1} ({where}.patience)")
    return prog.stopped_early
