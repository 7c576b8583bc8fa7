"""Entry: train each student of a recipe on the teacher's soft targets (cached or online), keep its best checkpoint,
then run its FixRes stage (distill/fixres.py) when it has one.

    accelerate launch distill/learn.py recipe.yaml [--student NAME] [--resume] [key.path=value ...]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python distill/learn.py`: import the package, not the sibling files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch.utils.data import Subset

from distill import fixres, policy, threads, training
from distill.checkpoint import Checkpoints, StopSignal
from distill.data import ImageDataset, build_transform, device_decode
from distill.errors import exit_on_error
from distill.evaluate import evaluate
from distill.kd import (
    batch_target,
    check_kd,
    chosen_students,
    class_balance,
    online_teacher,
    open_store,
    student_accelerator,
    student_fingerprint,
    student_loss,
)
from distill.loaders import batch_rng, make_loader
from distill.mix import mix_images, sample_mix
from distill.models import build_model, count_params, param_groups, save_model
from distill.optim import make_optimizer, make_scheduler
from distill.recipe import dump_recipe, load_recipe, to_plain
from distill.record import SCORES, write_metrics
from distill.runlock import one_writer
from distill.runs import hparams, log_hparams, start_tracking, write_text
from distill.store import ReplayDataset


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill learn", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. students.small.epochs=3")
    p.add_argument("--student", action="append", help="train only this student (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted student from its saved state (students/<name>/resume/), if any")
    p.add_argument("--fixres-only", action="store_true",
                   help="run only the FixRes stage of students already trained (those with `fixres:`); the same "
                        "as distill/fixres.py")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv=None):
    args = parse_args(argv)
    if args.fixres_only:
        return fixres.main([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--fixres-only"])
    recipe = load_recipe(args.recipe, args.overrides)
    threads.apply(recipe.threads)  # before any parallel work (distill/threads.py)
    with one_writer(recipe.run_dir):
        learn(recipe, args)


def learn(recipe, args):
    students = chosen_students(recipe, args.student)
    accelerator = student_accelerator(recipe, students)
    store, samples, val_split, classes = open_store(recipe, accelerator)  # checked before anything is written
    check_kd(recipe, students, len(classes), store)
    for student in students:
        index = recipe.students.index(student)
        train_student(recipe, student, index, store, samples, val_split, classes, accelerator, args.resume)
        if student.fixres is not None:
            fixres.fixres_student(recipe, student, index, store, samples, val_split, classes, accelerator,
                                  args.resume)
    accelerator.end_training()


def train_student(recipe, cfg, index, store, samples, val_split, classes, accelerator, resume=False):
    num_classes, where = len(classes), f"students.{index}"
    seed = recipe.seed if cfg.seed is None else cfg.seed
    set_seed(seed)
    out_dir = recipe.run_dir / "students" / cfg.name
    kd = cfg.kd
    temperature, decision = policy.decide(kd, store.manifest["teacher"], store.manifest.get("diagnostics", {}))
    if decision["ls_decision"] == "warn":
        accelerator.print(f"warning: {cfg.name}: {decision['ls_reason']}")

    model, pre = build_model(cfg, num_classes, where=where, classes=classes)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format  # of the weights and inputs
    model = model.to(memory_format=memory)
    teacher, teacher_pre = online_teacher(recipe, kd, accelerator)
    train_ds = ReplayDataset(store, samples, pre, view="random", seed=seed, teacher_pre=teacher_pre,
                             temperature=temperature, standardized=kd.standardize)
    if recipe.data.decode == "device":  # the files' bytes: the loop decodes, crops and resizes them on its device
        train_ds = device_decode.EncodedReplay(train_ds, where)
    if kd.loss == "none" or not kd.use_unlabeled:
        train_ds = Subset(train_ds, range(samples.num_labeled))  # labels only: the baseline's data
    replay = train_ds.dataset if isinstance(train_ds, Subset) else train_ds  # the one with set_epoch
    val_ds = ImageDataset(val_split, build_transform(None, "eval", pre, where=f"{where}.eval"))
    imb = cfg.imbalance
    balance_classes, weights = class_balance(store, samples, len(train_ds), imb, num_classes)
    train_loader = make_loader(train_ds, cfg.batch_size, recipe, train=True, world_size=accelerator.num_processes,
                               seed=seed, balance=imb.sampler, classes=balance_classes, repeats=cfg.repeated_aug)
    if recipe.data.decode == "device":
        train_loader.collate_fn = device_decode.collate  # a batch's files of any length in one tensor
    sampler = train_loader.sampler
    val_loader = make_loader(val_ds, cfg.eval_batch_size or cfg.batch_size, recipe, train=False,
                             world_size=accelerator.num_processes)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.optim.grad_accum
    optimizer, lr = make_optimizer(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, where=where),
                                   cfg.optim, global_batch)
    accelerator.gradient_accumulation_steps = cfg.optim.grad_accum
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # warm-up: the decay ramps up, so a short run is not dominated by the random initial weights
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema, use_warmup=True) if cfg.ema else None
    if cfg.compile:  # in place, after the EMA's copy: the module, its state_dict and what save_model writes stay
        model.compile()
    updates_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum)
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = make_scheduler(optimizer, cfg.optim, lr, total_updates, updates_per_epoch)

    if accelerator.is_main_process:
        write_text(out_dir / "config.yaml", dump_recipe(recipe))
    start_tracking(accelerator, cfg.name, hparams(recipe, "student", cfg))  # the config from the start
    accelerator.print(f"student {cfg.name} ({cfg.model}): {count_params(model) / 1e6:.2f}M params, "
                      f"{len(train_ds)} train images at {pre.input_size}px, kd {kd.loss} "
                      f"({kd.targets}, T={temperature:g}, w={kd.weight:g}), LS policy: {decision['ls_decision']} "
                      f"({decision['ls_reason']})")

    fingerprint = student_fingerprint(recipe, cfg, store.manifest["fingerprint"])
    checkpoints = Checkpoints(accelerator, out_dir, fingerprint, recipe.checkpoint.every_steps, where)
    prog = checkpoints.start(resume, ema)
    with StopSignal() as stop:
        for epoch in training.epochs(prog, cfg.epochs):
            model.train()
            started, images = time.perf_counter(), 0
            batches = training.resumable_batches(accelerator, train_loader, sampler, replay, prog, epoch, cfg.epochs,
                                                 cfg.name, recipe.log)
            for i, batch in batches:
                x, y = batch[0], batch[1]
                if recipe.data.decode == "device":  # files: their views as the model's input, made on the device
                    x = device_decode.pixels(x, pre, accelerator.device)
                with accelerator.accumulate(model):
                    mix = sample_mix(cfg.mix, x.shape[-2:], batch_rng(seed, accelerator.process_index, epoch, i))
                    x = mix_images(x, mix).contiguous(memory_format=memory)
                    target, mix_kl = batch_target(batch, mix, teacher, kd, temperature, accelerator)
                    pair = batch[2] if store.mixed else None  # the store's own mixing: each row's partner and λ
                    parts = student_loss(model(x), y, target, kd, temperature, num_classes, cfg.label_smoothing, mix,
                                         weights, imb.focal_gamma, pair)
                    if mix_kl is not None:  # online KD: how far the cached target is from the truth on mixed images
                        prog.mix_kl.append(mix_kl)
                    if prog.mix_kl:
                        parts["mix_approx_kl"] = torch.tensor(prog.mix_kl[-1], device=accelerator.device)
                    if not training.finite(parts["loss"], accelerator, prog, cfg.optim.max_bad_steps, where, out_dir):
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
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=prog.step)
                training.log_step(accelerator, parts, optimizer, prog.step, recipe.log.every_steps, total_updates)
                batches.report(parts["loss"])  # a plain line where no progress bar shows
                training.save_when_due(checkpoints, stop, prog, epoch, i + 1, ema)
            training.end_epoch(prog, epoch, started, images)

            if training.eval_due(cfg, epoch):
                metrics = evaluate(ema.module if ema is not None else model, val_loader, accelerator, num_classes)
                if training.select(accelerator, prog, metrics, epoch, cfg, cfg.name) and accelerator.is_main_process:
                    # with `ema`, the EMA weights are the student that is kept
                    save_model(ema.module if ema is not None else accelerator.unwrap_model(model), pre, out_dir,
                               classes, extra={"student": cfg.name})
                training.schedule_after_eval(scheduler, metrics, epoch, cfg)
            training.save_epoch(checkpoints, stop, prog, epoch, ema)
            if training.stopped_early(accelerator, prog, epoch, cfg, where, cfg.name):
                break
    best, mix_kl = prog.best, prog.mix_kl

    if accelerator.is_main_process:
        write_metrics(
            out_dir / "metrics.json", best, params=count_params(model),
            train_images_per_sec=prog.train_images / max(prog.train_seconds, 1e-9), epochs=cfg.epochs, seed=seed,
            wall_seconds=prog.clock(), classes=classes, fingerprint=fingerprint,
            best_epoch=best["epoch"], select_by=cfg.select_by, mixed_precision=accelerator.mixed_precision,
            num_processes=accelerator.num_processes, lr=lr, student=cfg.name, model=cfg.model,
            resolution=pre.input_size, kd_loss=kd.loss, kd_targets=kd.targets, temperature=temperature,
            kd_weight=kd.weight, kd_standardize=kd.standardize, label_smoothing=cfg.label_smoothing,
            mix={"mixup_alpha": cfg.mix.mixup_alpha, "cutmix_alpha": cfg.mix.cutmix_alpha,
                 "fmix_alpha": cfg.mix.fmix_alpha, "prob": cfg.mix.prob},
            ema=cfg.ema, imbalance=to_plain(imb), epochs_trained=prog.epoch, stopped_early=prog.stopped_early,
            **decision, mix_approx_kl=float(np.mean(mix_kl)) if mix_kl else None, train_images=len(train_ds),
            teacher_top1_center=store.manifest.get("diagnostics", {}).get("top1_center"), history=prog.history)
        accelerator.print(f"student {cfg.name} saved to {out_dir} (best epoch {best['epoch']}: top1 {best['top1']:.4f})")
    checkpoints.complete(prog)  # the student is complete: its files above are the result
    log_hparams(accelerator, hparams(recipe, "student", cfg), {k: best[k] for k in SCORES})
    accelerator.free_memory()
    return best


if __name__ == "__main__":
    exit_on_error(main)()  # `distill <command>` wraps it in cli.main
