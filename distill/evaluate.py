"""One evaluate() for teacher and student: top1, top5, macro_f1, nll, ece, per-class recall, confusion matrix."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


@torch.inference_mode()
def predict(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits and labels of every sample, gathered from all processes, each counted once.

    `gather_for_metrics` drops the samples the distributed sampler repeated to even out the last batch.
    """
    model.eval()
    all_logits, all_labels = [], []
    for x, y in loader:
        logits = model(x).float()
        logits, y = accelerator.gather_for_metrics((logits, y))
        all_logits.append(logits.cpu())
        all_labels.append(y.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(model, loader, accelerator, num_classes: int) -> dict:
    """Metrics of `model` on `loader` (see `classification_metrics`), plus throughput."""
    start = time.perf_counter()
    logits, labels = predict(model, loader, accelerator)
    seconds = time.perf_counter() - start
    metrics = classification_metrics(logits, labels, num_classes)
    metrics["eval_images_per_sec"] = len(labels) / max(seconds, 1e-9)
    return metrics


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, n_bins: int = 15) -> dict:
    """Metrics from logits [N, K] and labels [N].

    - top1, top5: fraction of samples whose label is among the k highest logits (k = min(5, K)).
    - macro_f1: mean F1 over the classes present in the labels (distill.record.MACRO_F1_OVER): a class with no
      validation image has no F1 to average, even when predicted (sklearn's default set counts it as F1 = 0);
      macro_f1_classes is how many classes that is.
    - nll: mean -log softmax(z)_y.
    - ece: Σ_b (n_b / N) · |accuracy_b - confidence_b| over `n_bins` equal-width bins of max-probability.
    - per_class_recall[k]: recall of class k (None when class k has no sample).
    - confusion_matrix[i][j]: samples of class i predicted as j.
    """
    logits, labels = logits.float(), labels.long()
    n = len(labels)
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    correct = pred.eq(labels)
    topk = logits.topk(min(5, num_classes), dim=-1).indices
    cm = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0
    return {
        "top1": correct.double().mean().item(),
        "top5": topk.eq(labels.unsqueeze(1)).any(1).double().mean().item(),
        "macro_f1": f1[present].mean().item(),
        "macro_f1_classes": int(present.sum()),
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": expected_calibration_error(conf, correct, n_bins),
        "per_class_recall": [r.item() if s > 0 else None for r, s in zip(recall, support)],
        "confusion_matrix": cm.tolist(),
        "num_images": n,
    }


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): Σ_b (n_b / N) · |acc_b - conf_b|, bins (b-1)/B < conf ≤ b/B."""
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    acc_sum = torch.bincount(bins, weights=correct.double(), minlength=n_bins)
    conf_sum = torch.bincount(bins, weights=conf.double(), minlength=n_bins)
    return ((acc_sum - conf_sum).abs().sum() / max(len(conf), 1)).item()
