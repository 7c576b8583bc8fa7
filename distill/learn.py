"""Entry: train each student of a recipe on the teacher's soft targets (cached or online), keep its best checkpoint.

    accelerate launch distill/learn.py recipe.yaml [--student NAME] [--resume] [key.path=value ...]
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
    # `python distill/learn.py`: import the package, not the sibling files as top-level modules
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from distill import loop, losses
from distill.checkpoint import Checkpoints, epoch_batches
from distill.data import ImageDataset, build_transform, load_splits, load_unlabeled
from distill.errors import DistillError, exit_on_error
from distill.evaluate import evaluate
from distill.mix import mix_images, mix_targets, rescale
from distill.models import build_model, check_model_name, count_params, load_model, param_groups, save_model
from distill.recipe import OptimConfig, dump_recipe, load_recipe, to_plain
from distill.runs import (
    hparams,
    log_hparams,
    make_loader,
    make_optimizer,
    make_scheduler,
    stage_fingerprint,
    start_tracking,
    write_json,
    write_text,
)
from distill.targets import ReplayDataset, Samples, TargetStore, dataset_fingerprint


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="distill learn", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. students.small.epochs=3")
    p.add_argument("--student", action="append", help="train only this student (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted student from its saved state (students/<name>/resume/), if any")
    p.add_argument("--fixres-only", action="store_true",
                   help="run only the FixRes stage of students already trained (those with `fixres:`)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


# --- the label-smoothing / KD policy (DESIGN.md) ---------------------------------------------
def ls_policy(kd, teacher: dict, diagnostics: dict) -> tuple[float, dict]:
    """The temperature to distil at, and the decision with its reason.

    A teacher trained with label smoothing erases the between-class information KD transfers, and
    distilling it at T > 1 hurts the student (Müller et al. 2019; Chandrasegaran et al. 2022). The teacher
    counts as such if its fine-tune used smoothing, its card says its pre-training did and its targets come
    from that pre-trained head (no fine-tune), or the store's diagnostic sees the signature. A fine-tune trains
    the head again on this data, so then the card's pre-training smoothing is only noted: measured on
    Fashion-MNIST with the lite0 card (README), T = 4 was no worse than T = 1 after a fine-tune without
    smoothing, and the diagnostic still catches a fine-tuned teacher that kept the signature.
    Then `auto` distils at T = 1, `warn` keeps T and warns, `off` keeps T.
    The KD target itself is never smoothed: smoothing only ever touches the label term.
    """
    evidence, notes = [], []
    if teacher.get("label_smoothing"):
        evidence.append(f"fine-tuned with label smoothing {teacher['label_smoothing']}")
    if teacher.get("pretrain_label_smoothing"):
        card = f"pre-trained with label smoothing {teacher['pretrain_label_smoothing']} (teacher card)"
        if teacher.get("fine_tuned"):
            notes.append(f"{card}, but fine-tuned without it: the targets come from the fine-tuned head")
        else:
            evidence.append(card)
    if diagnostics.get("label_smoothing_suspected"):
        evidence.append(f"store diagnostic: confidence ceiling implies alpha ≈ {diagnostics['implied_alpha']:.3f} "
                        f"and non-target probabilities are even ({diagnostics['nontarget_uniformity']:.2f})")
    temperature, requested = kd.temperature, kd.temperature
    if kd.loss in ("none", "hard"):
        decision, reason = "not applicable", f"kd.loss {kd.loss} uses no temperature"
    elif not evidence:
        decision, reason = "keep", "; ".join(["no sign that the teacher was trained with label smoothing", *notes])
    elif requested <= 1:
        decision, reason = "keep", f"T = {requested} <= 1 already; teacher: {'; '.join(evidence)}"
    elif kd.ls_policy == "auto":
        temperature = 1.0
        decision, reason = "T=1", f"label-smoothed teacher ({'; '.join(evidence)}): distilling it at T > 1 hurts"
    elif kd.ls_policy == "warn":
        decision, reason = "warn", f"kept T = {requested} for a label-smoothed teacher ({'; '.join(evidence)})"
    else:
        decision, reason = "off", f"policy off: kept T = {requested}; teacher: {'; '.join(evidence) or 'no evidence'}"
    return temperature, {"ls_policy": kd.ls_policy, "teacher_label_smoothed": bool(evidence), "ls_evidence": evidence,
                         "ls_decision": decision, "ls_reason": reason, "temperature_requested": requested}


def teacher_probs(logits: torch.Tensor, kd, temperature: float) -> torch.Tensor:
    """What the student matches, before mixing: softmax(t / T) (of standardised t), or one-hot argmax for hard."""
    if kd.loss == "hard":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    z = losses.standardize(logits) if kd.standardize else logits.float()
    return F.softmax(z / temperature, dim=-1)


def batch_target(batch, mix, teacher, kd, temperature: float, accelerator, mix_kl: list | None = None):
    """The KD target of a (student image, label, cached logits[, teacher image]) batch mixed by `mix`.

    None for the baseline. Online: the teacher's output on the very (mixed) image, exact; then, when the
    batch is mixed, the KL from it to the cached approximation is appended to `mix_kl`. Cached: the stored
    logits at temperature T, mixed in probability space with the same λ.
    """
    if kd.loss == "none":
        return None
    x, cached = batch[0], batch[2]
    if teacher is None:
        return mix_targets(teacher_probs(cached, kd, temperature), mix)
    xt = mix_images(batch[3], rescale(mix, x.shape[-2:], batch[3].shape[-2:]))
    with torch.inference_mode(), accelerator.autocast():
        target = teacher_probs(teacher(xt).float(), kd, temperature)
    target = target.clone()  # leave inference mode: the loss needs a normal tensor
    if mix is not None and mix_kl is not None:  # how far the cached approximation is from the truth
        approx = mix_targets(teacher_probs(cached, kd, temperature), mix)
        mix_kl.append(F.kl_div(approx.clamp_min(1e-12).log(), target, reduction="batchmean").item())
    return target


def student_loss(logits, labels, target_probs, kd, temperature, num_classes, smoothing, mix, weights=None,
                 gamma=0.0) -> dict:
    """(1 - w) · CE(smoothed, mixed labels) + w · KD(student, teacher probabilities); named parts.

    The CE term takes the class weights and focal γ of `imbalance` (`losses.weighted_cross_entropy`); the KD
    term is left as it is: it transfers the teacher's distribution, whose class balance is the teacher's.
    Unlabeled samples (label -1), and samples mixed with one, contribute only the KD term.
    """
    w = 0.0 if kd.loss == "none" else kd.weight
    if kd.standardize and kd.loss != "none":
        logits_kd = losses.standardize(logits)
    else:
        logits_kd = logits
    known = labels >= 0
    if mix is not None:
        known = known & known.flip(0)
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = zero
    if w < 1 and known.any():
        target = mix_targets(losses.smooth_one_hot(labels.clamp(min=0), num_classes, smoothing), mix)
        ce = losses.weighted_cross_entropy(logits[known], target[known], weights, gamma)
    kd_term = zero
    if w > 0:
        if kd.loss == "kl":
            kd_term = losses.kd_kl(logits_kd, target_probs, temperature)
        elif kd.loss == "hard":
            kd_term = losses.kd_hard(logits, target_probs)
        elif kd.loss == "dkd":
            g = torch.where(labels >= 0, labels, target_probs.argmax(-1))
            kd_term = losses.kd_dkd(logits_kd, target_probs, g, temperature, kd.dkd_alpha, kd.dkd_beta)
        elif kd.loss == "dist":
            kd_term = losses.kd_dist(logits_kd, target_probs, temperature, kd.dist_beta, kd.dist_gamma)
    loss = (1 - w) * ce + w * kd_term
    return {"loss": loss, "loss_ce": ce.detach(), "loss_kd": kd_term.detach()}


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    students = [s for s in recipe.students if not args.student or s.name in args.student]
    for name in args.student or ():
        if name not in {s.name for s in recipe.students}:
            raise DistillError(f"--student: no student {name!r} in the recipe (its students: "
                               f"{', '.join(s.name for s in recipe.students) or 'none'})")
    if not students:
        raise DistillError("students: the recipe has no students; add a list of {name, model, kd, ...}")
    precisions = {s.mixed_precision for s in students}
    for student in students:
        check_model_name(student.model, f"students.{recipe.students.index(student)}")
    if len(precisions) > 1:
        raise DistillError("students.*.mixed_precision: one process runs one precision; train students with "
                           "different precisions separately (--student NAME)")
    run_dir = recipe.run_dir
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=precisions.pop(),
        log_with="tensorboard" if recipe.log.tensorboard else None,
        project_dir=str(run_dir / "tb"),
    )

    # The data and the store, checked against each other before anything is trained or written.
    store = TargetStore(run_dir / "targets")
    store.verify(accelerator)  # a truncated or altered shard is refused here, not read as targets
    train_split, val_split = load_splits(recipe.data)
    samples = Samples(train_split, load_unlabeled(recipe.data, train_split, val_split))
    classes, num_classes = train_split.classes, len(train_split.classes)
    store.check({"dataset.fingerprint": dataset_fingerprint(samples, classes), "num_classes": num_classes})
    teacher_dir = run_dir / "teacher"
    if (teacher_dir / "model.json").is_file():
        store.check({"teacher.sha256": json.loads((teacher_dir / "model.json").read_text())["sha256"]})
    if args.fixres_only:
        students = [st for st in students if st.fixres is not None]
        for st in students:
            if not (run_dir / "students" / st.name / "metrics.json").is_file():
                raise DistillError(f"--fixres-only: student {st.name!r} has not been trained yet "
                                   f"({run_dir / 'students' / st.name} has no metrics.json); run learn without it")
    for student in students:
        index = recipe.students.index(student)
        if not args.fixres_only:
            train_student(recipe, student, index, store, samples, val_split, classes, accelerator, args.resume)
        if student.fixres is not None:
            fixres_student(recipe, student, index, store, samples, val_split, classes, accelerator)
    accelerator.end_training()


def sample_classes(store, samples, n: int) -> np.ndarray:
    """The class of each of the first `n` store samples for class-balanced sampling: its label, or for an
    unlabeled image the teacher's prediction on its center view (the class it teaches)."""
    classes = samples.labels[:n].copy()
    unlabeled = np.flatnonzero(classes < 0)
    if len(unlabeled):
        views = np.full(len(unlabeled), store.manifest["center_view"])
        classes[unlabeled] = store.rows(unlabeled, views)["logits"].argmax(-1)
    return classes


def online_teacher(recipe, kd, accelerator):
    """(teacher, its preprocessing) for online KD, else (None, None)."""
    if kd.targets != "online" or kd.loss == "none":
        return None, None
    teacher, teacher_pre, _ = load_model(recipe.run_dir / "teacher")
    # The teacher, frozen in this one place: eval mode, no gradients, inference mode in the loop.
    return teacher.eval().requires_grad_(False).to(accelerator.device), teacher_pre


def train_student(recipe, cfg, index, store, samples, val_split, classes, accelerator, resume=False):
    num_classes, where = len(classes), f"students.{index}"
    seed = recipe.seed if cfg.seed is None else cfg.seed
    set_seed(seed)
    out_dir = recipe.run_dir / "students" / cfg.name
    kd = cfg.kd
    temperature, decision = ls_policy(kd, store.manifest["teacher"], store.manifest.get("diagnostics", {}))
    if decision["ls_decision"] == "warn":
        accelerator.print(f"warning: {cfg.name}: {decision['ls_reason']}")

    model, pre = build_model(cfg, num_classes, where=where, classes=classes)
    teacher, teacher_pre = online_teacher(recipe, kd, accelerator)
    train_ds = ReplayDataset(store, samples, pre, view="random", seed=seed, teacher_pre=teacher_pre)
    if kd.loss == "none" or not kd.use_unlabeled:
        train_ds = Subset(train_ds, range(samples.num_labeled))  # labels only: the baseline's data
    val_ds = ImageDataset(val_split, build_transform(None, "eval", pre, where=f"{where}.eval"))
    imb = cfg.imbalance
    train_loader = make_loader(train_ds, cfg.batch_size, recipe, train=True, world_size=accelerator.num_processes,
                               seed=seed, balance=imb.sampler,
                               classes=sample_classes(store, samples, len(train_ds)) if imb.sampler != "none" else None)
    sampler = train_loader.sampler
    counts = np.bincount(samples.labels[:samples.num_labeled], minlength=num_classes)  # labeled images only
    weights = losses.class_weights(counts, imb.class_weights, imb.effective_beta)
    val_loader = make_loader(val_ds, cfg.eval_batch_size or cfg.batch_size, recipe, train=False,
                             world_size=accelerator.num_processes)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.optim.grad_accum
    optimizer, lr = make_optimizer(param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, where=where),
                                   cfg.optim, global_batch)
    accelerator.gradient_accumulation_steps = cfg.optim.grad_accum
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    # warm-up: the decay ramps up, so a short run is not dominated by the random initial weights
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=cfg.ema, use_warmup=True) if cfg.ema else None
    updates_per_epoch = math.ceil(len(train_loader) / cfg.optim.grad_accum)
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = make_scheduler(optimizer, cfg.optim, lr, total_updates, updates_per_epoch)

    if accelerator.is_main_process:
        write_text(out_dir / "config.yaml", dump_recipe(recipe))
    start_tracking(accelerator, cfg.name)
    accelerator.print(f"student {cfg.name} ({cfg.model}): {count_params(model) / 1e6:.2f}M params, "
                      f"{len(train_ds)} train images at {pre.input_size}px, kd {kd.loss} "
                      f"({kd.targets}, T={temperature:g}, w={kd.weight:g}), LS policy: {decision['ls_decision']} "
                      f"({decision['ls_reason']})")

    checkpoints = Checkpoints(accelerator, out_dir, student_fingerprint(recipe, cfg, store.manifest["fingerprint"]),
                              recipe.checkpoint.every_steps, where)
    prog = checkpoints.start(resume, ema)
    replay = train_ds.dataset if isinstance(train_ds, Subset) else train_ds  # the one with set_epoch

    def loss_fn(batch, mix):
        x = mix_images(batch[0], mix)
        target = batch_target(batch, mix, teacher, kd, temperature, accelerator, prog.mix_kl)
        parts = student_loss(model(x), batch[1], target, kd, temperature, num_classes, cfg.label_smoothing, mix,
                             weights, imb.focal_gamma)
        if prog.mix_kl:  # online KD: how far the cached-mixing approximation is from the teacher's output
            parts["mix_approx_kl"] = torch.tensor(prog.mix_kl[-1], device=accelerator.device)
        return parts

    def save_best():
        save_model(ema.module if ema is not None else accelerator.unwrap_model(model), pre, out_dir, classes,
                   extra={"student": cfg.name})

    prog = loop.train(accelerator, recipe, cfg, where, cfg.name, model=model, optimizer=optimizer,
                      scheduler=scheduler, train_loader=train_loader, sampler=sampler, dataset=replay,
                      val_loader=val_loader, num_classes=num_classes, total_updates=total_updates, seed=seed,
                      out_dir=out_dir, checkpoints=checkpoints, prog=prog, loss_fn=loss_fn, save_best=save_best,
                      ema=ema)
    best, mix_kl = prog.best, prog.mix_kl

    settings = {
        "student": cfg.name, "model": cfg.model, "resolution": pre.input_size,
        "kd_loss": kd.loss, "kd_targets": kd.targets, "temperature": temperature, "kd_weight": kd.weight,
        "kd_standardize": kd.standardize, "label_smoothing": cfg.label_smoothing,
        "mix": {"mixup_alpha": cfg.mix.mixup_alpha, "cutmix_alpha": cfg.mix.cutmix_alpha, "prob": cfg.mix.prob},
        "ema": cfg.ema, "imbalance": to_plain(imb), "epochs_trained": prog.epoch, "stopped_early": prog.stopped_early,
        **decision,
        "mix_approx_kl": float(np.mean(mix_kl)) if mix_kl else None,
        "train_images": len(train_ds), "teacher_top1_center": store.manifest.get("diagnostics", {}).get("top1_center"),
    }
    if accelerator.is_main_process:
        write_json(out_dir / "metrics.json", {
            **best, "best_epoch": best["epoch"], "select_by": cfg.select_by, "params": count_params(model),
            "train_images_per_sec": prog.train_images / max(prog.train_seconds, 1e-9), "epochs": cfg.epochs,
            "seed": seed, "wall_seconds": prog.clock(), "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes, "lr": lr, **settings, "classes": classes,
            "history": prog.history, "fingerprint": checkpoints.fingerprint,
        })
        accelerator.print(f"student {cfg.name} saved to {out_dir} (best epoch {best['epoch']}: top1 {best['top1']:.4f})")
    checkpoints.clear()  # the student is complete: its files above are the result
    log_hparams(accelerator, hparams(recipe, "student", cfg),
                {k: best[k] for k in ("top1", "top5", "macro_f1", "nll", "ece")})
    accelerator.free_memory()
    return best


# --- FixRes (Touvron et al. 2019) ------------------------------------------------------------
def student_fingerprint(recipe, cfg, store_fp) -> str:
    """What a student's training depends on. Its FixRes stage is not part of it: changing `fixres:` redoes
    only that stage (`fixres_fingerprint`)."""
    return stage_fingerprint(recipe.seed, recipe.data, dataclasses.replace(cfg, fixres=None), store_fp)


def fixres_fingerprint(recipe, cfg, store_fp) -> str:
    return stage_fingerprint(student_fingerprint(recipe, cfg, store_fp), cfg.fixres)


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


def fixres_student(recipe, cfg, index, store, samples, val_split, classes, accelerator):
    """Fine-tune a trained student at the test resolution with the test transform, keeping the KD signal.

    Training images are the store's center views (the test-time crop) rendered at `fixres.resolution`; the KD
    target is the teacher's stored logits on that very view (cached) or its live output on it (online).
    Writes students/<name>/fixres/ (the model, at the test resolution, and metrics.json with accuracy before
    and after at both resolutions).
    """
    fx, kd, where = cfg.fixres, cfg.kd, f"students.{index}"
    num_classes = len(classes)
    seed = recipe.seed if cfg.seed is None else cfg.seed
    set_seed(seed)
    student_dir = recipe.run_dir / "students" / cfg.name
    out_dir = student_dir / "fixres"
    start = time.perf_counter()
    model, train_pre, _ = load_model(student_dir)  # its selected checkpoint (the EMA weights with `ema`)
    student = json.loads((student_dir / "metrics.json").read_text())
    test_pre = dataclasses.replace(train_pre, input_size=fx.resolution, crop_pct=fx.crop_pct or train_pre.crop_pct)
    temperature = student["temperature"]  # the student's own, as the LS policy decided it
    teacher, teacher_pre = online_teacher(recipe, kd, accelerator)
    train_ds = ReplayDataset(store, samples, test_pre, view="center", seed=seed, teacher_pre=teacher_pre)
    if kd.loss == "none" or not kd.use_unlabeled:
        train_ds = Subset(train_ds, range(samples.num_labeled))
    batch_size = fx.batch_size or cfg.batch_size
    train_loader = make_loader(train_ds, batch_size, recipe, train=True, world_size=accelerator.num_processes,
                               seed=seed)
    sampler = train_loader.sampler
    replay = train_ds.dataset if isinstance(train_ds, Subset) else train_ds
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
    model, optimizer, train_loader, *loaders = accelerator.prepare(model, optimizer, train_loader,
                                                                  *val_loaders.values())
    val_loaders = dict(zip(val_loaders, loaders))
    scheduler = make_scheduler(optimizer, optim, lr, fx.epochs * len(train_loader), len(train_loader))

    def evaluate_both() -> dict:
        return {res: evaluate(model, loader, accelerator, num_classes) for res, loader in val_loaders.items()}

    before = evaluate_both()
    bn = [m for m in norms if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    for m in bn:  # re-estimate from scratch: a cumulative average over every FixRes batch
        m.reset_running_stats()
        m.momentum = None
    start_tracking(accelerator, f"{cfg.name}-fixres")
    accelerator.print(f"fixres {cfg.name}: {train_pre.input_size}px -> {fx.resolution}px, {fx.epochs} epoch(s) "
                      f"on {len(train_ds)} center views, {sum(p.numel() for p in params)} trainable parameters, "
                      f"{len(bn)} normalisation layer(s) re-estimated, kd {kd.loss} ({kd.targets}, T={temperature:g})")
    step, train_images, train_seconds = 0, 0, 0.0
    for epoch in range(fx.epochs):
        model.eval()  # frozen layers keep their statistics; only the parts FixRes adapts run in train mode
        for m in trained:
            m.train()
        epoch_start = time.perf_counter()
        batches = epoch_batches(accelerator, train_loader, sampler, replay, epoch, 0)
        for batch in tqdm(batches, desc=f"{cfg.name} fixres {epoch + 1}/{fx.epochs}", leave=False,
                          disable=None if recipe.log.progress and accelerator.is_local_main_process else True):
            x, y = batch[:2]
            target = batch_target(batch, None, teacher, kd, temperature, accelerator)
            parts = student_loss(model(x), y, target, kd, temperature, num_classes, cfg.label_smoothing, None)
            accelerator.backward(parts["loss"])
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            scheduler.step_update(step)
            train_images += len(y) * accelerator.num_processes
            if step % recipe.log.every_steps == 0:
                accelerator.log({f"fixres/{k}": accelerator.reduce(v.detach(), "mean").item()
                                 for k, v in parts.items()}, step=step)
        train_seconds += time.perf_counter() - epoch_start
    for m in bn:
        m.momentum = 0.1  # torch's default, so that the saved model behaves like any other
    model.eval()
    after = evaluate_both()
    keys = ("top1", "top5", "macro_f1", "nll", "ece")
    table = {f"{when}_{res}px": {k: m[res][k] for k in keys} for when, m in (("before", before), ("after", after))
             for res in m}
    for name, values in table.items():
        accelerator.log({f"fixres/{name}/{k}": v for k, v in values.items()}, step=step)
    lo, hi = train_pre.input_size, fx.resolution
    accelerator.print(f"fixres {cfg.name}: top1 at {hi}px {before[hi]['top1']:.4f} -> {after[hi]['top1']:.4f}"
                      + (f" (at {lo}px {before[lo]['top1']:.4f} -> {after[lo]['top1']:.4f})" if lo != hi else ""))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_model(unwrapped, test_pre, out_dir, classes, extra={"student": cfg.name, "fixres": True})
        inherited = {k: student.get(k) for k in ("model", "kd_loss", "kd_targets", "temperature", "kd_weight",
                                                  "kd_standardize", "label_smoothing", "mix", "ema", "seed",
                                                  "ls_policy", "ls_decision", "ls_reason", "ls_evidence")}
        fixres_seconds = time.perf_counter() - start
        write_json(out_dir / "metrics.json", {
            **after[hi], **inherited, "student": f"{cfg.name}+fixres", "resolution": hi, "train_resolution": lo,
            "params": count_params(unwrapped), "fixres": {**to_plain(fx), **table},
            "trainable_params": sum(p.numel() for p in params), "renormalised_layers": len(bn),
            "train_images_per_sec": train_images / max(train_seconds, 1e-9), "fixres_seconds": fixres_seconds,
            # the cost of this model is the student's training plus its FixRes stage
            "wall_seconds": student.get("wall_seconds", 0.0) + fixres_seconds, "classes": classes,
            "num_processes": accelerator.num_processes,
            "fingerprint": fixres_fingerprint(recipe, cfg, store.manifest["fingerprint"]),
        })
    accelerator.wait_for_everyone()
    log_hparams(accelerator, {**hparams(recipe, "student", cfg), "fixres_resolution": hi},
                {k: after[hi][k] for k in keys})
    accelerator.free_memory()
    return after[hi]


if __name__ == "__main__":
    main()
