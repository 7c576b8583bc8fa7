"""Entry: fine-tune the teacher of a recipe (Accelerate, mixed precision), keep its best checkpoint and metrics,
then export its soft targets (targets/).

    accelerate launch distill/teach.py recipe.yaml [key.path=value ...] [--resume] [--export-only] [--rebuild-targets]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python distill/teach.py`: import the package, not the sibling files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from distill import results, store, threads, trackers, training
from distill.checkpoint import Checkpoints, StopSignal
from distill.data import ImageDataset, attach_cache, build_transform, fold_ids, load_splits, load_unlabeled
from distill.errors import DistillError, exit_on_error
from distill.evaluate import evaluate
from distill.folds import evaluate_dir, write_ensemble_metrics, write_oof
from distill.loaders import batch_rng, make_loader
from distill.losses import class_weights, smooth_one_hot, weighted_cross_entropy
from distill.mix import mix_images, mix_targets, sample_mix
from distill.models import (
    Ensemble,
    OutOfFold,
    build_model,
    count_params,
    load_model,
    member_info,
    param_groups,
    save_ensemble,
    save_model,
)
from distill.optim import make_optimizer, make_scheduler
from distill.policy import teacher_record
from distill.recipe import dump_recipe, load_recipe, to_plain
from distill.record import SCORES, write_metrics
from distill.runlock import one_writer
from distill.runs import finished, hparams, log_hparams, stage_fingerprint, start_tracking, write_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill teach", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.epochs=3")
    p.add_argument("--export-only", action="store_true",
                   help="skip fine-tuning: export the soft targets of the saved teacher (resumes a partial export)")
    p.add_argument("--rebuild-targets", action="store_true",
                   help="replace a soft-target store built for another teacher, dataset or view spec")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted fine-tune from its saved state (teacher/resume/), if any")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def teacher_loss(logits, labels, num_classes, smoothing, mix, weights=None, gamma=0.0):
    """Cross-entropy (class-weighted, focal with γ > 0) against label-smoothed, then mixed, one-hot targets;
    returns the named parts."""
    target = mix_targets(smooth_one_hot(labels, num_classes, smoothing), mix)
    loss = weighted_cross_entropy(logits, target, weights, gamma)
    return {"loss": loss, "loss_ce": loss.detach()}


def main(argv=None):
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    threads.apply(recipe.threads)  # before any parallel work (distill/threads.py)
    with one_writer(recipe.run_dir):
        teach(recipe, args)


def teach(recipe, args):
    cfg, run_dir = recipe.teacher, recipe.run_dir
    out_dir = run_dir / "teacher"
    accelerator = Accelerator(
        # without a GPU, accelerate only goes multi-process (gloo) under torchrun when told it is on CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=trackers.log_with(recipe),  # log.trackers, each checked installed before anything is written
        project_dir=str(run_dir / "tb"),  # trackers.start_tracking: the run dir is its parent
    )
    set_seed(recipe.seed)
    if args.export_only:
        export_targets(recipe, accelerator, args.rebuild_targets)
        accelerator.end_training()
        return
    if recipe.targets.export and _has_files(run_dir / "targets") and not args.rebuild_targets:
        raise DistillError(f"targets: {run_dir / 'targets'} holds a store of an earlier teacher, which a new "
                           "fine-tune makes stale; pass --rebuild-targets to replace it after training, or "
                           "--export-only to finish exporting the saved teacher")

    # Build everything that can fail on bad input before anything is written.
    train_split, val_split = load_splits(recipe.data)
    unlabeled = load_unlabeled(recipe.data, train_split, val_split) if recipe.targets.export else None
    attach_cache(recipe, train_split, val_split, unlabeled, accelerator=accelerator)  # data.cache: decode once
    skipped = [*train_split.skipped, *val_split.skipped, *(unlabeled.skipped if unlabeled else [])]
    if recipe.targets.export:  # before hours of fine-tuning: the store it ends with must fit on the disk
        store.check_space(recipe.targets, len(train_split) + (len(unlabeled) if unlabeled else 0),
                          len(train_split.classes), run_dir / "targets")
    if cfg.folds or cfg.ensemble_with:
        teach_ensemble(recipe, accelerator, train_split, val_split, args.resume, skipped)
    else:
        fit_teacher(recipe, accelerator, train_split, val_split, out_dir, "teacher", teacher_fingerprint(recipe),
                    args.resume, skipped)
    if recipe.targets.export:
        export_targets(recipe, accelerator, args.rebuild_targets)
    accelerator.end_training()  # last: it also tears down the process group


def fit_teacher(recipe, accelerator, train_split, val_split, out_dir: Path, name: str, fingerprint: str,
                resume: bool, skipped=()) -> dict:
    """Fine-tune one teacher on `train_split`, select its checkpoint on `val_split`, and write `out_dir`
    (model, last/, metrics.json with `fingerprint`); returns the selected checkpoint's metrics."""
    cfg, run_dir = recipe.teacher, recipe.run_dir
    classes, num_classes = train_split.classes, len(train_split.classes)
    model, pre = build_model(cfg, num_classes, where="teacher", classes=classes)
    train_tf = build_transform(cfg.augment.train, "train", pre, where="teacher.augment.train")
    eval_augment = cfg.augment.eval  # saved with the model: what scores it (compare, predict, audit, explain)
    eval_tf = build_transform(eval_augment, "eval", pre, where="teacher.augment.eval")
    train_ds = ImageDataset(train_split, train_tf, seed=recipe.seed)
    train_loader = make_loader(train_ds, cfg.batch_size, recipe, train=True, world_size=accelerator.num_processes,
                               classes=train_split.labels, balance=cfg.imbalance.sampler, repeats=cfg.repeated_aug)
    sampler = train_loader.sampler
    counts = np.bincount(train_split.labels, minlength=num_classes)
    weights = class_weights(counts, cfg.imbalance.class_weights, cfg.imbalance.effective_beta)
    val_loader = make_loader(ImageDataset(val_split, eval_tf), cfg.eval_batch_size or cfg.batch_size, recipe,
                             train=False, world_size=accelerator.num_processes)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.optim.grad_accum
    optimizer, lr = make_optimizer(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                   cfg.optim, global_batch)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum)
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = make_scheduler(optimizer, cfg.optim, lr, total_updates, updates_per_epoch)

    if accelerator.is_main_process:  # everything that can fail on bad input has been built: record the run
        write_text(run_dir / "config.yaml", dump_recipe(recipe))
        if skipped:
            write_text(run_dir / "skipped_images.txt", "".join(f"{path}\t{why}\n" for path, why in skipped))
            accelerator.print(f"warning: data.on_bad_image: skip: {len(skipped)} unreadable image(s) left out, "
                              f"listed in {run_dir / 'skipped_images.txt'}")
    start_tracking(accelerator, name, hparams(recipe, "teacher"))  # the config from the start: a crash keeps it
    accelerator.print(f"{name} {cfg.model}: {count_params(model) / 1e6:.2f}M params, {num_classes} classes, "
                      f"{len(train_split)} train / {len(val_split)} val images, input {pre.input_size}px, "
                      f"lr {lr:.2e}, {accelerator.num_processes} process(es), precision {accelerator.mixed_precision}")

    checkpoints = Checkpoints(accelerator, out_dir, fingerprint, recipe.checkpoint.every_steps, name)
    prog = checkpoints.start(resume)
    with StopSignal() as stop:
        for epoch in training.epochs(prog, cfg.epochs):
            model.train()
            started, images = time.perf_counter(), 0
            batches = training.resumable_batches(accelerator, train_loader, sampler, train_ds, prog, epoch, cfg.epochs,
                                                 name, recipe.log)
            for i, (x, y) in batches:
                with accelerator.accumulate(model):
                    mix = sample_mix(cfg.mix, x.shape[-2:], batch_rng(recipe.seed, accelerator.process_index, epoch, i))
                    parts = teacher_loss(model(mix_images(x, mix)), y, num_classes, cfg.label_smoothing, mix, weights,
                                         cfg.imbalance.focal_gamma)
                    if not training.finite(parts["loss"], accelerator, prog, cfg.optim.max_bad_steps, "teacher",
                                           out_dir):
                        optimizer.zero_grad()
                        continue
                    accelerator.backward(parts["loss"])
                    training.clip(accelerator, model, cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad()
                images += len(y) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue  # a micro-batch of a gradient accumulation: no update yet
                prog.step += 1
                scheduler.step_update(prog.step)
                training.log_step(accelerator, parts, optimizer, prog.step, recipe.log.every_steps, total_updates)
                batches.report(parts["loss"])  # a plain line where no progress bar shows
                training.save_when_due(checkpoints, stop, prog, epoch, i + 1)
            training.end_epoch(prog, epoch, started, images)

            if training.eval_due(cfg, epoch):
                metrics = evaluate(model, val_loader, accelerator, num_classes)
                if training.select(accelerator, prog, metrics, epoch, cfg, name) and accelerator.is_main_process:
                    save_model(accelerator.unwrap_model(model), pre, out_dir, classes, extra=teacher_record(cfg),
                               eval_augment=eval_augment)
                training.schedule_after_eval(scheduler, metrics, epoch, cfg)
            training.save_epoch(checkpoints, stop, prog, epoch)
            if training.stopped_early(accelerator, prog, epoch, cfg, "teacher", name):
                break
    best = prog.best

    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), pre, out_dir / "last", classes, extra=teacher_record(cfg),
                   eval_augment=eval_augment)
        write_metrics(
            out_dir / "metrics.json", best, params=count_params(model),
            train_images_per_sec=prog.train_images / max(prog.train_seconds, 1e-9), epochs=cfg.epochs,
            seed=recipe.seed, wall_seconds=prog.clock(), classes=classes, fingerprint=fingerprint,
            best_epoch=best["epoch"], select_by=cfg.select_by, epochs_trained=prog.epoch,
            stopped_early=prog.stopped_early, imbalance=to_plain(cfg.imbalance), model=cfg.model, card=cfg.card,
            input_size=pre.input_size, mixed_precision=accelerator.mixed_precision,
            num_processes=accelerator.num_processes, global_batch_size=global_batch, lr=lr,
            mix={"mixup_alpha": cfg.mix.mixup_alpha, "cutmix_alpha": cfg.mix.cutmix_alpha,
                 "fmix_alpha": cfg.mix.fmix_alpha},
            **teacher_record(cfg), history=prog.history)
        accelerator.print(f"{name} saved to {out_dir} (best epoch {best['epoch']}: top1 {best['top1']:.4f})")
    checkpoints.complete(prog)  # the run is complete: its files above are the result
    log_hparams(accelerator, hparams(recipe, "teacher"), {k: best[k] for k in SCORES})
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next fold's model and optimizer are prepared afresh
    return best


def teach_ensemble(recipe, accelerator, train_split, val_split, resume: bool, skipped) -> dict:
    """The teacher as an ensemble (teacher/model.json, `models.save_ensemble`) of k fold teachers
    (`teacher.folds`: teacher/fold-<f>/, each trained on the other folds and selected on its own) or of this
    recipe's one teacher (teacher/own/), plus `teacher.ensemble_with` models trained elsewhere.

    With folds, teacher/oof.safetensors holds each training image's out-of-fold logits (from the one fold
    teacher that did not train on it) and its fold. teacher/metrics.json has the ensemble's validation metrics,
    every member's (`members`) and the folds' held-out metrics with mean ± std (`folds`). A fold already
    complete for this recipe is not trained again.
    """
    cfg, out_dir = recipe.teacher, recipe.run_dir / "teacher"
    classes, num_classes = train_split.classes, len(train_split.classes)
    for i, d in enumerate(cfg.ensemble_with):  # before hours of training: a member that cannot join
        member_info(Path(d), classes, f"teacher.ensemble_with.{i}")
    members, heldout = [], []
    if accelerator.is_main_process and not finished(out_dir / "metrics.json", teacher_fingerprint(recipe)):
        results.begin(out_dir, teacher_fingerprint(recipe))  # the ensemble's files: INCOMPLETE until its metrics
    if cfg.folds:
        folds = fold_ids(train_split, cfg.folds, recipe.data.split_seed)
        for f in range(cfg.folds):
            fold_dir, fingerprint = out_dir / f"fold-{f}", stage_fingerprint(teacher_fingerprint(recipe), "fold", f)
            if finished(fold_dir / "metrics.json", fingerprint):
                accelerator.print(f"teacher fold {f} complete for this recipe: skipped")
                heldout.append(json.loads((fold_dir / "metrics.json").read_text()))
            else:
                heldout.append(fit_teacher(recipe, accelerator, train_split.subset(np.flatnonzero(folds != f)),
                                           train_split.subset(np.flatnonzero(folds == f)), fold_dir,
                                           f"teacher-fold-{f}", fingerprint, resume, skipped))
            members.append(fold_dir)
        write_oof(recipe, accelerator, train_split, folds, members, out_dir / "oof.safetensors")
    else:
        own = out_dir / "own"
        fingerprint = stage_fingerprint(teacher_fingerprint(recipe), "own")
        if not finished(own / "metrics.json", fingerprint):
            fit_teacher(recipe, accelerator, train_split, val_split, own, "teacher", fingerprint, resume, skipped)
        members.append(own)
    members += [Path(d) for d in cfg.ensemble_with]
    if accelerator.is_main_process:
        save_ensemble(out_dir, members, cfg.ensemble_combine, classes, extra=teacher_record(cfg),
                      eval_augment=cfg.augment.eval)
    accelerator.wait_for_everyone()

    start_tracking(accelerator, "teacher", hparams(recipe, "teacher"))
    scores = {d: evaluate_dir(recipe, accelerator, d, val_split, num_classes) for d in [out_dir, *members]}
    for d in members:
        accelerator.print(f"member {d}: val top1 {scores[d]['top1']:.4f} macro_f1 {scores[d]['macro_f1']:.4f}")
    best = scores[out_dir]
    accelerator.print(f"ensemble of {len(members)} ({cfg.ensemble_combine}): val top1 {best['top1']:.4f} "
                      f"macro_f1 {best['macro_f1']:.4f} nll {best['nll']:.4f}")
    if accelerator.is_main_process:
        write_ensemble_metrics(recipe, accelerator, out_dir, members, scores, heldout, teacher_fingerprint(recipe))
    log_hparams(accelerator, hparams(recipe, "teacher"), {k: best[k] for k in SCORES})
    accelerator.wait_for_everyone()
    return best


def export_targets(recipe, accelerator, rebuild: bool) -> dict:
    """Soft targets of the saved (best) teacher for every training and unlabeled image: targets/."""
    teacher_dir = recipe.run_dir / "teacher"
    if not (teacher_dir / "model.json").is_file():
        raise DistillError(f"targets: no saved teacher in {teacher_dir}; fine-tune it first "
                           f"(teach.py without --export-only)")
    model, pre, info = load_model(teacher_dir)
    train_split, val_split = load_splits(recipe.data)
    unlabeled = load_unlabeled(recipe.data, train_split, val_split)
    attach_cache(recipe, train_split, val_split, unlabeled, accelerator=accelerator)
    if info["classes"] != train_split.classes:
        raise DistillError(f"targets: the teacher in {teacher_dir} was trained on classes {info['classes'][:5]}…, "
                           f"the data has {train_split.classes[:5]}…; fine-tune the teacher on this data first")
    if recipe.targets.oof:
        oof_file = teacher_dir / "oof.safetensors"
        if not isinstance(model, Ensemble) or not oof_file.is_file():
            raise DistillError(f"targets.oof: {teacher_dir} holds no fold teachers ({oof_file} is missing); train "
                               "them with teacher.folds")
        model = OutOfFold(model, load_file(str(oof_file))["fold"])
    seed = recipe.seed if recipe.targets.seed is None else recipe.targets.seed
    return store.export(model.to(accelerator.device), pre, store.Samples(train_split, unlabeled),
                          train_split.classes, recipe.targets, seed, recipe.run_dir / "targets", accelerator,
                          store.teacher_record(info), rebuild=rebuild, num_workers=recipe.data.num_workers,
                          progress=recipe.log.progress, progress_seconds=recipe.log.progress_seconds)


def teacher_fingerprint(recipe) -> str:
    # data.decode: where the *students'* images are decoded (the teacher always decodes on the CPU)
    return stage_fingerprint(recipe.seed, dataclasses.replace(recipe.data, decode="cpu"), recipe.teacher)


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


if __name__ == "__main__":
    exit_on_error(main)()  # `distill <command>` wraps it in cli.main
