"""Teacher diagnostics over a store: top-1 on its own views, and the evidence for the label-smoothing signature."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from distill import policy

if TYPE_CHECKING:
    from distill.store.reader import TargetStore


def diagnostics(store: TargetStore, chunk: int = 4096) -> dict:
    """Teacher quality on its own views, and the label-smoothing signature of its center-view outputs.

    The loop over the store gathers the signature's evidence from every labeled sample's center view
    (`center_evidence`); `policy.smoothing_signature` turns it into implied_alpha, nontarget_uniformity,
    ceiling_pileup and the verdict.
    """
    n_lab, k = store.manifest["num_labeled"], store.num_classes
    logits = store.manifest.get("logits") or {}
    kept = logits.get("k") if logits.get("storage") == "topk" else None
    correct_views = correct_center = 0
    parts = {"max_prob": [], "gap": [], "right": [], "evenness": []}
    for lo in range(0, n_lab, chunk):
        samples = np.arange(lo, min(n_lab, lo + chunk))
        for v in range(store.rows_per_sample):
            r = store.rows(samples, np.full(len(samples), v))
            if v == store.manifest["center_view"]:
                e = center_evidence(r["logits"], r["label"], kept)
                correct_center += e["right"].sum()
                for key, got in parts.items():
                    got.append(e[key])
            else:
                pred = torch.from_numpy(r["logits"]).argmax(-1).numpy()
                correct_views += (pred == majority_label(store, r)).sum()
    ev = {key: np.concatenate(a) if a and a[0] is not None else None for key, a in parts.items()}
    max_prob = ev["max_prob"] if ev["max_prob"] is not None else np.zeros(0)
    return {
        "top1_views": float(correct_views / max(n_lab * store.views, 1)),
        "top1_center": float(correct_center / max(n_lab, 1)),
        "mean_max_prob": float(max_prob.mean()) if len(max_prob) else None,
        **policy.smoothing_signature(
            max_prob, ev["gap"] if ev["gap"] is not None else np.zeros(0),
            ev["right"] if ev["right"] is not None else np.zeros(0, bool),
            ev["evenness"] if evenness_testable(k, kept) else None, k),
    }


def majority_label(store: TargetStore, rows: dict) -> np.ndarray:
    """Each row's label, or in a mixed view (`targets.mix`) the label of the image with the larger share."""
    if "partner" not in rows:
        return rows["label"]
    partner = rows["partner"][:, 0]
    mixed = np.flatnonzero((partner >= 0) & (rows["mix"][:, 0] < 0.5))
    out = rows["label"].copy()
    out[mixed] = store.labels(partner[mixed])
    return out


def evenness_testable(num_classes: int, kept: int | None = None) -> bool:
    """Whether a floor can be told from favoured classes: at least one non-target class beyond the favoured ones,
    all of them kept exactly (a top-k store keeps k - 1 non-target classes)."""
    return _favoured(num_classes, kept) >= 1


def _favoured(num_classes: int, kept: int | None) -> int:
    return min(policy.FAVOURED_CLASSES, num_classes - 2, (kept or num_classes) - 1)


def center_evidence(logits: np.ndarray, labels: np.ndarray, kept: int | None = None) -> dict:
    """The signature's evidence in a chunk of center-view logits [n, K] as the reader returns them (a pure function).

    Per sample: `max_prob`, `right`, and `gap` = 1 - max-prob computed as the sum of the other probabilities (small
    masses summed in float64, never subtracted from 1); per confidently right sample (right, max-prob > 1/2):
    `evenness` = the mean probability of the non-target classes outside the m most probable ones (m =
    policy.FAVOURED_CLASSES, fewer when K or the store's k is small) over the mean of all non-target probabilities:
    1 when the non-target mass is an even floor (label smoothing), near 0 when it sits on a few similar classes.

    Exact for a top-k store with k >= m + 1, however the reader spreads the tail: the top m + 1 probabilities are
    kept, and what lies beyond them is kept classes plus the tail, whose total mass the reader keeps exact (no tail
    class rises above the k-th kept one). So a top-k store gives the value its full store would. With k < m + 1, m
    shrinks to k - 1, so no tail class is ever counted among the favoured ones; `kept` = 1 or K = 2 leaves nothing to
    test (`evenness` None).
    """
    z = np.asarray(logits, np.float64)
    n, k = z.shape
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = np.arange(n)
    pred = p.argmax(1)
    max_prob = p[rows, pred]
    rest = p.copy()
    rest[rows, pred] = 0.0
    gap = rest.sum(1)
    right = pred == np.asarray(labels)
    m = _favoured(k, kept)
    evenness = None
    if m >= 1:
        sure = right & (max_prob > 0.5)
        floor = rest[sure]
        top = np.argpartition(-floor, m - 1, axis=1)[:, :m]
        np.put_along_axis(floor, top, 0.0, axis=1)
        num, den = floor.sum(1) / (k - 1 - m), gap[sure] / (k - 1)
        # a gap that underflowed to 0 is an infinitely confident sample: no floor at all
        evenness = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return {"max_prob": max_prob, "gap": gap, "right": right, "evenness": evenness}
