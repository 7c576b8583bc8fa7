"""K-fold and ensemble teachers: scoring saved members with their own eval transform, the out-of-fold logits
file, and the ensemble's metrics.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from distill.data import ImageDataset
from distill.evaluate import evaluate, predict
from distill.loaders import make_loader
from distill.models import load_for_eval, read_model_info
from distill.policy import teacher_record
from distill.record import SCORES, write_metrics


def saved_model_batches(recipe, accelerator, model_dir: Path, split):
    """A saved model (or ensemble) on this process's device, and a prepared loader of `split` through the model's
    own eval transform (the one saved with it), as the teacher is evaluated while it trains."""
    model, _, _, transform = load_for_eval(model_dir)
    loader = make_loader(ImageDataset(split, transform), recipe.teacher.eval_batch_size or recipe.teacher.batch_size,
                         recipe, train=False, world_size=accelerator.num_processes)
    return model.to(accelerator.device), accelerator.prepare(loader)


def evaluate_dir(recipe, accelerator, model_dir: Path, split, num_classes: int) -> dict:
    """The validation metrics of a saved model (or ensemble), with its own eval transform."""
    model, loader = saved_model_batches(recipe, accelerator, model_dir, split)
    with torch.inference_mode(), accelerator.autocast():
        return evaluate(model, loader, accelerator, num_classes)


def write_oof(recipe, accelerator, train_split, folds: np.ndarray, fold_dirs: list[Path], path: Path) -> None:
    """teacher/oof.safetensors: `logits` [N, K] float32, row i from the fold teacher that held image i out,
    and `fold` [N]: honest predictions on the training images, for `distill audit`."""
    logits = None
    for f, d in enumerate(fold_dirs):
        rows = np.flatnonzero(folds == f)
        model, loader = saved_model_batches(recipe, accelerator, d, train_split.subset(rows))
        with torch.inference_mode(), accelerator.autocast():
            fold_logits, _ = predict(model, loader, accelerator)
        if logits is None:
            logits = torch.zeros(len(train_split), fold_logits.shape[1])
        logits[torch.from_numpy(rows)] = fold_logits.float()
    if accelerator.is_main_process:
        save_file({"logits": logits.contiguous(), "fold": torch.from_numpy(folds)}, str(path))
    accelerator.wait_for_everyone()


def write_ensemble_metrics(recipe, accelerator, out_dir: Path, members: list[Path], scores: dict, heldout: list,
                           fingerprint: str) -> None:
    """teacher/metrics.json of an ensemble: its validation `scores[out_dir]`, every member's (`members`), and with
    folds their held-out metrics with mean ± std (`folds`)."""
    cfg, best = recipe.teacher, scores[out_dir]
    ensemble_info = read_model_info(out_dir)
    fold_summary = None
    if heldout:
        fold_summary = {"k": cfg.folds, "heldout": [{k: m[k] for k in SCORES} for m in heldout],
                        **{f"{k}_mean": float(np.mean([m[k] for m in heldout])) for k in SCORES},
                        **{f"{k}_std": float(np.std([m[k] for m in heldout], ddof=1)) for k in SCORES}}
    trained_here = [json.loads((d / "metrics.json").read_text()) for d in members if d.parent == out_dir]
    write_metrics(
        out_dir / "metrics.json", best, params=ensemble_info["params"],  # the members' parameter count
        # the members trained here (members trained elsewhere are not counted): their mean throughput, the
        # sum of their wall time as the cost of this teacher
        train_images_per_sec=(float(np.mean([m["train_images_per_sec"] for m in trained_here]))
                              if trained_here else None),
        epochs=cfg.epochs, seed=recipe.seed, wall_seconds=sum(m.get("wall_seconds", 0.0) for m in trained_here),
        classes=ensemble_info["classes"], fingerprint=fingerprint,
        model=f"ensemble of {len(members)}", card=cfg.card, ensemble_combine=cfg.ensemble_combine,
        # dirs relative to teacher/ (as in model.json), so the run directory can move
        members=[{"dir": os.path.relpath(d.resolve(), out_dir.resolve()),
                  "name": d.name if d.parent == out_dir else str(d),
                  **{k: scores[d][k] for k in SCORES}} for d in members],
        folds=fold_summary, input_size=ensemble_info["preprocess"]["input_size"],  # the largest member input
        num_processes=accelerator.num_processes, **teacher_record(cfg))
