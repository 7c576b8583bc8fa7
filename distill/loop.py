"""The training loop teach and learn share: resumable epochs, accumulation, mixing draws, bad steps, logging, checkpoints, signals, selection, early stopping."""
from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

from distill.checkpoint import Checkpoints, Progress, StopSignal, epoch_batches
from distill.evaluate import evaluate
from distill.mix import sample_mix
from distill.runs import batch_rng, better, finite_or_skip, kept

METRICS = ("top1", "top5", "macro_f1", "nll", "ece")


def train(accelerator, recipe, cfg, where: str, label: str, *, model, optimizer, scheduler, train_loader, sampler,
          dataset, val_loader, num_classes: int, total_updates: int, seed: int, out_dir, checkpoints: Checkpoints,
          prog: Progress, loss_fn: Callable, save_best: Callable, ema=None) -> Progress:
    """Train from `prog` (a fresh or a resumed Progress) to the end of `cfg.epochs`, or to early stopping.

    `cfg` is the teacher's or a student's section (epochs, eval_every, select_by, patience, optim, mix);
    `where` its recipe key, `label` the name in messages. Per batch, MixUp/CutMix is drawn from (seed,
    process, epoch, batch) and `loss_fn(batch, mix)` returns the named loss parts ("loss" is minimised).
    After each update the EMA follows, train scalars are logged, and the state is saved when due or when
    SIGTERM/SIGINT arrived (then the run stops). At each evaluation the model (the EMA with `ema`) is scored
    on `val_loader`; `save_best()` writes a new best before the epoch's state is saved, so the state always
    records the checkpoint on disk.
    """
    with StopSignal() as stop:
        for epoch in range(prog.epoch, prog.epoch if prog.stopped_early else cfg.epochs):
            model.train()
            skip = prog.batch if epoch == prog.epoch else 0
            batches = epoch_batches(accelerator, train_loader, sampler, dataset, epoch, skip)
            epoch_start, epoch_images = time.perf_counter(), 0
            bar = tqdm(batches, desc=f"{label} {epoch + 1}/{cfg.epochs}", leave=False, initial=skip,
                       total=len(train_loader),
                       # None: tqdm hides itself when stderr is not a terminal (CI logs, files)
                       disable=None if recipe.log.progress and accelerator.is_local_main_process else True)
            for i, batch in enumerate(bar, start=skip):
                with accelerator.accumulate(model):
                    mix = sample_mix(cfg.mix, batch[0].shape[-2:],
                                     batch_rng(seed, accelerator.process_index, epoch, i))
                    parts = loss_fn(batch, mix)
                    if not finite_or_skip(parts["loss"], accelerator, prog.bad_steps, prog.step + 1,
                                          cfg.optim.max_bad_steps, where, kept(out_dir, prog.best)):
                        optimizer.zero_grad()
                        continue
                    accelerator.backward(parts["loss"])
                    if accelerator.sync_gradients and cfg.optim.clip_grad:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                epoch_images += len(batch[1]) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                prog.step += 1
                scheduler.step_update(prog.step)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=prog.step)
                if prog.step % recipe.log.every_steps == 0 or prog.step == total_updates:
                    logged = {f"train/{k}": accelerator.reduce(v.detach(), "mean").item() for k, v in parts.items()}
                    logged["train/lr"] = max(g["lr"] for g in optimizer.param_groups)  # layer decay scales the rest
                    accelerator.log(logged, step=prog.step)
                    bar.set_postfix(loss=f"{logged['train/loss']:.3f}", lr=f"{logged['train/lr']:.1e}")
                signum = stop.requested(accelerator)
                if signum or checkpoints.due(prog.step):
                    prog.epoch, prog.batch = epoch, i + 1
                    path = checkpoints.save(prog, ema)
                    if signum:
                        raise stop.stop(where, prog.step, epoch, path)
            prog.train_seconds += time.perf_counter() - epoch_start
            prog.train_images += epoch_images
            prog.epoch, prog.batch = epoch + 1, 0

            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics = evaluate(ema.module if ema is not None else model, val_loader, accelerator, num_classes)
                metrics["epoch"] = epoch + 1
                prog.history.append({"epoch": epoch + 1, **{k: metrics[k] for k in METRICS}})
                accelerator.log({f"val/{k}": metrics[k] for k in METRICS}, step=prog.step)
                accelerator.print(f"{label} epoch {epoch + 1}: val top1 {metrics['top1']:.4f} macro_f1 "
                                  f"{metrics['macro_f1']:.4f} nll {metrics['nll']:.4f} "
                                  f"({prog.train_images / prog.train_seconds:.0f} train img/s)")
                if prog.best is None or better(metrics, prog.best, cfg.select_by):
                    prog.best, prog.stale_evals = metrics, 0
                    if accelerator.is_main_process:
                        save_best()
                else:
                    prog.stale_evals += 1
                    prog.stopped_early = cfg.patience is not None and prog.stale_evals >= cfg.patience
            path = checkpoints.save(prog, ema)  # after the best checkpoint, which it records
            if stop.requested(accelerator):
                raise stop.stop(where, prog.step, epoch, path)
            if prog.stopped_early:
                accelerator.print(f"{label}: no better val {cfg.select_by} in {cfg.patience} evaluation(s): "
                                  f"stopped after epoch {epoch + 1} ({where}.patience)")
                break
    return prog
