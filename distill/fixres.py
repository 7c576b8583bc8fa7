"""Entry: FixRes (Touvron et al. 2019) for trained students: fine-tune the classifier and re-estimate the last
normalisation statistics at the test resolution with the test transform, keeping the distillation signal.

    accelerate launch distill/fixres.py recipe.yaml [--student NAME] [--resume] [key.path=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python distill/fixres.py`: import the package, not the sibling files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Subset

from distill import threads, training
from distill.checkpoint import Checkpoints, StopSignal
from distill.data import ImageDataset, build_transform
from distill.errors import DistillError, exit_on_error
from distill.evaluate import evaluate
from distill.kd import (
    batch_target,
    check_kd,
    chosen_students,
    class_balance,
    fixres_fingerprint,
    online_teacher,
    open_store,
    student_accelerator,
    student_loss,
)
from distill.loaders import make_loader
from distill.models import count_params, load_model, save_model
from distill.optim import make_optimizer, make_scheduler
from distill.recipe import OptimConfig, load_recipe, to_plain
from distill.record import SCORES, write_metrics
from distill.runlock import one_writer
from distill.runs import hparams, log_hparams, start_tracking
from distill.store import ReplayDataset

# what the FixRes model inherits from its student's metrics.json: how it was distilled
INHERITED = ("model", "kd_loss", "kd_targets", "temperature", "kd_weight", "kd_standardize", "label_smoothing", "mix",
             "ema", "imbalance", "ls_policy", "ls_decision", "ls_reason", "ls_evidence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill fixres", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. students.kd.fixres.epochs=3")
    p.add_argument("--student", action="append", help="only this student's FixRes stage (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted FixRes stage from its saved state (students/<name>/fixres/resume/)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv=None):
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    threads.apply(recipe.threads)  # before any parallel work (distill/threads.py)
    with one_writer(recipe.run_dir):
        fixres_stages(recipe, args)


def fixres_stages(recipe, args):
    students = [s for s in chosen_students(recipe, args.student) if s.fixres is not None]
    for st in students:
        if not (recipe.run_dir / "students" / st.name / "metrics.json").is_file():
            raise DistillError(f"fixres: student {st.name!r} has not been trained yet "
                               f"({recipe.run_dir / 'students' / st.name} has no metrics.json); run `distill learn` "
                               "first")
    if not students:
        raise DistillError("fixres: none of the chosen students has a `fixres:` section")
    accelerator = student_accelerator(recipe, students)
    store, samples, val_split, classes = open_store(recipe, accelerator)
    check_kd(recipe, students, len(classes), store)
    for student in students:
        fixres_student(recipe, student, recipe.students.index(student), store, samples, val_split, classes,
                       accelerator, args.resume)
    accelerator.end_training()


def fixres_parts(model: nn.Module, train_last_block: bool, where: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(modules that train, normalisation layers re-estimated) in the FixRes fine-tune; the rest stays frozen.

    "Last block" is the last group of timm's finest parameter grouping before the classifier's group (a
    ResNet's last bottleneck, an EfficientNet's last block with conv_head and bn2). The classifier's group
    trains; the normalisation layers of the last block and the head are re-estimated at the test resolution
    and their affine parameters train (the paper fine-tunes the classifier and the batch norm before
    pooling); with `train_last_block` the whole last block trains too.
    """
    from timm.models import group_modules

    if not hasattr(model, "group_matcher"):
        raise DistillError(f"{where}.fixres: FixRes needs a timm student (`timm:<name>`); {type(model).__name__} "
                           "has no block structure to find its last block")
    groups = group_modules(model, model.group_matcher(coarse=False))
    ids = sorted(groups)
    last_block, head = ([model.get_submodule(n) for n in groups[i]] for i in (ids[-2], ids[-1]))
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norms = [m for part in (*last_block, *head) for m in part.modules() if isinstance(m, norm_types)]
    return (last_block if train_last_block else []) + head + norms, norms


def fixres_student(recipe, cfg, index, store, samples, val_split, classes, accelerator, resume=False):
    """Fine-tune a trained student at the test resolution with the test transform, keeping the KD signal.

    Training images are the store's center views (the test-time crop) rendered at `fixres.resolution`; the KD
    target is the teacher's stored logits on that very view (cached) or its live output on it (online).
    Writes students/<name>/fixres/ (the model, at the test resolution, and metrics.json with accuracy before
    and after at both resolutions). The state is saved at every epoch's end (and on SIGTERM/SIGINT), so an
    interrupted stage continues with `resume`.
    """
    fx, kd, where = cfg.fixres, cfg.kd, f"students.{index}"
    num_classes = len(classes)
    seed = recipe.seed if cfg.seed is None else cfg.seed
    set_seed(seed)
    student_dir = recipe.run_dir / "students" / cfg.name
    out_dir = student_dir / "fixres"
    model, train_pre, _ = load_model(student_dir)  # its selected checkpoint (the EMA weights with `ema`)
    student = json.loads((student_dir / "metrics.json").read_text())
    # trained on the store's center view, so tested (and saved) with that crop: objects keep their apparent size
    center_crop = store.manifest["view_spec"]["center_crop_pct"]
    test_pre = dataclasses.replace(train_pre, input_size=fx.resolution, crop_pct=center_crop)
    temperature = student["temperature"]  # the student's own, as the LS policy decided it
    teacher, teacher_pre = online_teacher(recipe, kd, accelerator)
    train_ds = ReplayDataset(store, samples, test_pre, view="center", seed=seed, teacher_pre=teacher_pre,
                             temperature=temperature, standardized=kd.standardize)
    if kd.loss == "none" or not kd.use_unlabeled:
        train_ds = Subset(train_ds, range(samples.num_labeled))
    replay = train_ds.dataset if isinstance(train_ds, Subset) else train_ds
    batch_size = fx.batch_size or cfg.batch_size
    imb = cfg.imbalance  # the student's own: its sampler, class weights and focal γ carry into this stage
    balance_classes, weights = class_balance(store, samples, len(train_ds), imb, num_classes)
    train_loader = make_loader(train_ds, batch_size, recipe, train=True, world_size=accelerator.num_processes,
                               seed=seed, balance=imb.sampler, classes=balance_classes)
    sampler = train_loader.sampler
    val_loaders = {res: make_loader(ImageDataset(val_split, build_transform(None, "eval", p, where=f"{where}.eval")),
                                    cfg.eval_batch_size or batch_size, recipe, train=False,
                                    world_size=accelerator.num_processes)
                   for res, p in ((train_pre.input_size, train_pre), (fx.resolution, test_pre))}

    trained, norms = fixres_parts(model, fx.train_last_block, where)
    model.requires_grad_(False)
    for m in trained:
        m.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimConfig(name="sgd", lr=fx.lr, weight_decay=fx.weight_decay, min_lr=0.0)
    optimizer, lr = make_optimizer([{"params": params, "weight_decay": fx.weight_decay, "lr_scale": 1.0}], optim,
                                   batch_size * accelerator.num_processes)
    # no accumulation here: accelerator.backward divides the loss by the accumulation steps, and a student trained
    # just before in this process may have left its own `optim.grad_accum` there (that halved FixRes's updates)
    accelerator.gradient_accumulation_steps = 1
    model, optimizer, train_loader, *loaders = accelerator.prepare(model, optimizer, train_loader,
                                                                  *val_loaders.values())
    val_loaders = dict(zip(val_loaders, loaders))
    total_updates = fx.epochs * len(train_loader)
    scheduler = make_scheduler(optimizer, optim, lr, total_updates, len(train_loader))

    def evaluate_both() -> dict:
        accelerator.print(f"fixres {cfg.name}: evaluating at {' and '.join(f'{r}px' for r in val_loaders)}", flush=True)
        return {res: evaluate(model, loader, accelerator, num_classes) for res, loader in val_loaders.items()}

    # the state is saved at epoch ends only (and on a signal): a FixRes stage is short
    checkpoints = Checkpoints(accelerator, out_dir, fixres_fingerprint(recipe, cfg, store.manifest["fingerprint"]),
                              0, f"{where}.fixres")
    prog = checkpoints.start(resume)
    bn = [m for m in norms if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if prog.before is None:  # a fresh start (a resumed one has its re-estimated statistics in the state)
        prog.before = {str(res): m for res, m in evaluate_both().items()}
        for m in bn:  # re-estimate from scratch: a cumulative average over every FixRes batch
            m.reset_running_stats()
    for m in bn:
        m.momentum = None
    start_tracking(accelerator, f"{cfg.name}-fixres", {**hparams(recipe, "student", cfg), "fixres_resolution": fx.resolution})
    accelerator.print(f"fixres {cfg.name}: {train_pre.input_size}px -> {fx.resolution}px, {fx.epochs} epoch(s) "
                      f"on {len(train_ds)} center views, {sum(p.numel() for p in params)} trainable "
                      f"parameters, {len(bn)} normalisation layer(s) re-estimated, kd {kd.loss} ({kd.targets}, "
                      f"T={temperature:g})")
    with StopSignal() as stop:
        for epoch in training.epochs(prog, fx.epochs):
            model.eval()  # frozen layers keep their statistics; only the parts FixRes adapts run in train mode
            for m in trained:
                m.train()
            started, images = time.perf_counter(), 0
            batches = training.resumable_batches(accelerator, train_loader, sampler, replay, prog, epoch, fx.epochs,
                                                 f"{cfg.name} fixres", recipe.log)
            for i, batch in batches:
                x, y = batch[:2]
                target, _ = batch_target(batch, None, teacher, kd, temperature, accelerator)
                parts = student_loss(model(x), y, target, kd, temperature, num_classes, cfg.label_smoothing, None,
                                     weights, imb.focal_gamma)
                if not training.finite(parts["loss"], accelerator, prog, cfg.optim.max_bad_steps, f"{where}.fixres",
                                       out_dir):
                    optimizer.zero_grad()
                    continue
                accelerator.backward(parts["loss"])
                training.clip(accelerator, model, cfg.optim.clip_grad)  # the student's own clipping
                optimizer.step()
                optimizer.zero_grad()
                images += len(y) * accelerator.num_processes
                prog.step += 1
                scheduler.step_update(prog.step)
                training.log_step(accelerator, parts, optimizer, prog.step, recipe.log.every_steps, total_updates,
                                  prefix="fixres")
                batches.report(parts["loss"])  # a plain line where no progress bar shows
                training.save_when_due(checkpoints, stop, prog, epoch, i + 1)
            training.end_epoch(prog, epoch, started, images)
            training.save_epoch(checkpoints, stop, prog, epoch)
    for m in bn:
        m.momentum = 0.1  # torch's default, so that the saved model behaves like any other
    model.eval()
    before, after = {int(res): m for res, m in prog.before.items()}, evaluate_both()
    table = {f"{when}_{res}px": {k: m[res][k] for k in SCORES} for when, m in (("before", before), ("after", after))
             for res in m}
    for name, values in table.items():
        accelerator.log({f"fixres/{name}/{k}": v for k, v in values.items()}, step=prog.step)
    lo, hi = train_pre.input_size, fx.resolution
    accelerator.print(f"fixres {cfg.name}: top1 at {hi}px {before[hi]['top1']:.4f} -> {after[hi]['top1']:.4f}"
                      + (f" (at {lo}px {before[lo]['top1']:.4f} -> {after[lo]['top1']:.4f})" if lo != hi else ""))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_model(unwrapped, test_pre, out_dir, classes, extra={"student": cfg.name, "fixres": True})
        fixres_seconds = prog.clock()  # over every session of this stage
        write_metrics(
            out_dir / "metrics.json", after[hi], params=count_params(unwrapped),
            train_images_per_sec=prog.train_images / max(prog.train_seconds, 1e-9), epochs=fx.epochs,
            seed=student.get("seed"),
            # the cost of this model is the student's training plus its FixRes stage
            wall_seconds=student.get("wall_seconds", 0.0) + fixres_seconds, classes=classes,
            fingerprint=checkpoints.fingerprint,
            **{k: student.get(k) for k in INHERITED}, student=f"{cfg.name}+fixres", resolution=hi,
            train_resolution=lo, fixres={**to_plain(fx), **table}, trainable_params=sum(p.numel() for p in params),
            renormalised_layers=len(bn), fixres_seconds=fixres_seconds, num_processes=accelerator.num_processes)
    checkpoints.complete(prog)  # the stage is complete: its files above are the result
    log_hparams(accelerator, {**hparams(recipe, "student", cfg), "fixres_resolution": hi},
                {k: after[hi][k] for k in SCORES})
    accelerator.free_memory()
    return after[hi]


if __name__ == "__main__":
    exit_on_error(main)()  # `distill <command>` wraps it in cli.main
