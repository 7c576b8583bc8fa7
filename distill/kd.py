"""The student's side of distillation, shared by learn and fixres: the students chosen and their accelerator, the
store opened against the data, the teacher's target for a batch (cached or online), the student's loss, and what
a student stage depends on."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distill import losses, trackers
from distill.data import attach_cache, load_splits, load_unlabeled
from distill.errors import DistillError
from distill.mix import mix_enabled, mix_images, mix_targets, rescale
from distill.models import check_model_name, load_model
from distill.runs import stage_fingerprint
from distill.store import Samples, TargetStore, dataset_fingerprint


def open_store(recipe, accelerator):
    """(store, samples, val split, classes): the soft-target store, checked against the data and the saved
    teacher before anything is trained or written. A truncated or altered shard is refused here."""
    run_dir = recipe.run_dir
    store = TargetStore(run_dir / "targets")
    store.verify(accelerator)
    train_split, val_split = load_splits(recipe.data)
    unlabeled = load_unlabeled(recipe.data, train_split, val_split)
    attach_cache(recipe, train_split, val_split, unlabeled, accelerator=accelerator)  # data.cache: decode once
    samples = Samples(train_split, unlabeled)
    classes = train_split.classes
    store.check({"dataset.fingerprint": dataset_fingerprint(samples, classes), "num_classes": len(classes)})
    teacher_dir = run_dir / "teacher"
    if (teacher_dir / "model.json").is_file():
        store.check({"teacher.sha256": json.loads((teacher_dir / "model.json").read_text())["sha256"]})
    return store, samples, val_split, classes


def chosen_students(recipe, names: list[str] | None) -> list:
    """The recipe's students named by --student (all without it), checked before anything starts."""
    for name in names or ():
        if name not in {s.name for s in recipe.students}:
            raise DistillError(f"--student: no student {name!r} in the recipe (its students: "
                               f"{', '.join(s.name for s in recipe.students) or 'none'})")
    students = [s for s in recipe.students if not names or s.name in names]
    if not students:
        raise DistillError("students: the recipe has no students; add a list of {name, model, kd, ...}")
    for student in students:
        check_model_name(student.model, f"students.{recipe.students.index(student)}")
    if len({s.mixed_precision for s in students}) > 1:
        raise DistillError("students.*.mixed_precision: one process runs one precision; train students with "
                           "different precisions separately (--student NAME)")
    return students


def check_kd(recipe, students, num_classes: int, store=None) -> None:
    """What the recipe alone cannot check, once the class count (and the store) is known: refuse it before
    anything trains."""
    for student in students:
        kd, i = student.kd, recipe.students.index(student)
        if store is not None and store.mixed and mix_enabled(student.mix):
            raise DistillError(f"students.{i}.mix: the store at {store.path} mixes its views already (targets.mix); "
                               f"mixing the batch again would mix twice: leave students.{i}.mix out, or export a "
                               "store without targets.mix for in-batch mixing")
        if kd.standardize and kd.loss != "none" and num_classes == 2:
            # (z - mean) / std of two logits is always (+1/√2, -1/√2): the student's standardised logits are
            # constant, and so the KD term gives it no gradient at all
            raise DistillError(f"students.{i}.kd.standardize: with 2 classes standardised logits are always "
                               "±1/√2, so the KD term has no gradient; set kd.standardize: false")


def student_accelerator(recipe, students) -> Accelerator:
    return Accelerator(
        # without a GPU, accelerate only goes multi-process (gloo) under torchrun when told it is on CPU
        cpu=not torch.accelerator.is_available(),
        mixed_precision=students[0].mixed_precision,
        log_with=trackers.log_with(recipe),  # log.trackers, each checked installed before anything is written
        project_dir=str(recipe.run_dir / "tb"),  # trackers.start_tracking: the run dir is its parent
    )


def online_teacher(recipe, kd, accelerator):
    """(teacher, its preprocessing) for online KD, else (None, None)."""
    if kd.targets != "online" or kd.loss == "none":
        return None, None
    teacher, teacher_pre, _ = load_model(recipe.run_dir / "teacher")
    # The teacher, frozen in this one place: eval mode, no gradients, inference mode in the loop.
    return teacher.eval().requires_grad_(False).to(accelerator.device), teacher_pre


def sample_classes(store, samples, n: int) -> np.ndarray:
    """The class of each of the first `n` store samples for class-balanced sampling: its label, or for an
    unlabeled image the teacher's prediction on its center view (the class it teaches)."""
    classes = samples.labels[:n].copy()
    unlabeled = np.flatnonzero(classes < 0)
    if len(unlabeled):
        views = np.full(len(unlabeled), store.manifest["center_view"])
        classes[unlabeled] = store.rows(unlabeled, views)["logits"].argmax(-1)
    return classes


def class_balance(store, samples, n: int, imb, num_classes: int):
    """A student's `imbalance` settings made concrete (training and FixRes alike): the class of each of the first
    `n` store samples for the balanced sampler (None without one), and the label term's class weights, counted
    on the labeled images only."""
    classes = sample_classes(store, samples, n) if imb.sampler != "none" else None
    counts = np.bincount(samples.labels[:samples.num_labeled], minlength=num_classes)
    return classes, losses.class_weights(counts, imb.class_weights, imb.effective_beta)


def teacher_probs(logits, kd, temperature: float) -> torch.Tensor:
    """What the student matches, before mixing: softmax(t / T) (of standardised t), or one-hot argmax for a
    loss that is not `soft` (hard).

    `logits` is the teacher's output [B, K] (online), or what a store batch carries (`ReplayDataset`): a dict of
    "logits" [B, K] and the row's "logit_mean" / "logit_std" [B] over all K float32 logits. Standardisation then
    uses those stored statistics (as `losses.standardize`: (t - mean) / (std + 1e-6)), not the stored row's own,
    which for top-k storage would be the reconstruction's and for full storage the float16 row's.
    """
    stats = None
    if isinstance(logits, dict):
        stats, logits = logits, logits["logits"]
    if not losses.KD_LOSSES[kd.loss].soft:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if kd.standardize and stats is not None:
        z = (logits.float() - stats["logit_mean"].float()[:, None]) / (stats["logit_std"].float()[:, None] + 1e-6)
    else:
        z = losses.standardize(logits) if kd.standardize else logits.float()
    return F.softmax(z / temperature, dim=-1)


def batch_target(batch, mix, teacher, kd, temperature: float, accelerator) -> tuple[torch.Tensor | None, float | None]:
    """(KD target, cached-target error) of a (student image, label, cached logits[, teacher image]) batch mixed
    by `mix` (in-batch mixing; None when the batch is not mixed, or the store mixes its views itself).

    The target is None for the baseline. Online: the teacher's output on the very (mixed) image, exact; then the
    error is the KL from it to what a cached student would have used on the batch's mixed samples: the in-batch
    mixture of the cached targets (an approximation), or the stored output on the store's mixed view (exact up to
    float16 rounding); None when nothing is mixed. Cached: the stored logits at temperature T, mixed in
    probability space with the same λ when the batch is mixed in-batch.
    """
    if kd.loss == "none":
        return None, None
    x, cached = batch[0], batch[2]
    if teacher is None:
        return mix_targets(teacher_probs(cached, kd, temperature), mix), None
    xt = mix_images(batch[3], rescale(mix, x.shape[-2:], batch[3].shape[-2:]))
    with torch.inference_mode(), accelerator.autocast():
        target = teacher_probs(teacher(xt).float(), kd, temperature)
    target = target.clone()  # leave inference mode: the loss needs a normal tensor
    mixed = torch.ones(len(target), dtype=torch.bool, device=target.device) if mix is not None else \
        cached["lam"] < 1 if isinstance(cached, dict) and "lam" in cached else None
    if mixed is None or not mixed.any():
        return target, None
    approx = mix_targets(teacher_probs(cached, kd, temperature), mix)  # what a cached student learns from
    return target, F.kl_div(approx[mixed].clamp_min(1e-12).log(), target[mixed], reduction="batchmean").item()


def student_loss(logits, labels, target_probs, kd, temperature, num_classes, smoothing, mix, weights=None,
                 gamma=0.0, pair=None) -> dict:
    """(1 - w) · CE(smoothed, mixed labels) + w · KD(student, teacher probabilities); named parts.

    KD is `losses.KD_LOSSES[kd.loss]`. The CE term takes the class weights and focal γ of `imbalance`
    (`losses.weighted_cross_entropy`); the KD term is left as it is: it transfers the teacher's distribution,
    whose class balance is the teacher's. Unlabeled samples (label -1), and samples mixed with one, contribute
    only the KD term. Smoothing only ever touches the label term, never the KD target. The KD loss gets each
    sample's target class after mixing (the label with the larger weight, -1 unknown), which only DKD uses.

    `mix` mixes the batch with its flip (in-batch mixing); `pair`, a mixed store's per-sample "partner_label" and
    "lam" [B] (`ReplayDataset`), mixes each sample's label with its own partner's instead.
    """
    kd_loss = None if kd.loss == "none" else losses.KD_LOSSES[kd.loss]
    w = 0.0 if kd_loss is None else kd.weight
    # a soft target is standardised with `kd.standardize`, so the student's logits are too. Built before the CE
    # term: the order of the graph's branches fixes the order in which their gradients add up, bit for bit
    logits_kd = losses.standardize(logits) if kd_loss is not None and kd.standardize and kd_loss.soft else logits
    known = labels >= 0
    if mix is not None:
        known = known & known.flip(0)
    if pair is not None:
        partner, lam = pair["partner_label"], pair["lam"].float()
        known = known & (partner >= 0)
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = zero
    if w < 1 and known.any():
        target = mix_targets(losses.smooth_one_hot(labels.clamp(min=0), num_classes, smoothing), mix)
        if pair is not None:
            other = losses.smooth_one_hot(partner.clamp(min=0), num_classes, smoothing)
            target = target * lam[:, None] + other * (1.0 - lam)[:, None]
        ce = losses.weighted_cross_entropy(logits[known], target[known], weights, gamma)
    kd_term = zero
    if w > 0:
        # the target class of a mixed sample is the label with the larger weight (own: λ, partner B-1-i: 1 - λ);
        # -1 (unlabeled) leaves it to the loss, which takes the mixed teacher's argmax
        target_class = labels if mix is None or mix.lam >= 0.5 else labels.flip(0)
        if pair is not None:
            target_class = torch.where(lam >= 0.5, labels, partner)
        kd_term = kd_loss.fn(logits_kd, target_probs, target_class, temperature, kd)
    loss = (1 - w) * ce + w * kd_term
    return {"loss": loss, "loss_ce": ce.detach(), "loss_kd": kd_term.detach()}


def student_fingerprint(recipe, cfg, store_fp) -> str:
    """What a student's training depends on. Its FixRes stage is not part of it: changing `fixres:` redoes
    only that stage (`fixres_fingerprint`)."""
    return stage_fingerprint(recipe.seed, recipe.data, dataclasses.replace(cfg, fixres=None), store_fp)


def fixres_fingerprint(recipe, cfg, store_fp) -> str:
    return stage_fingerprint(student_fingerprint(recipe, cfg, store_fp), cfg.fixres)
