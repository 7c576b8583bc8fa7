"""Teacher diagnostics over a store: top-1 on its own views, and the evidence for the label-smoothing signature."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from distill import policy

if TYPE_CHECKING:
    from distill.store.reader import TargetStore


def diagnostics(store: TargetStore, chunk: int = 4096) -> dict:
    """Teacher quality on its own views, and the label-smoothing signature of its center-view outputs.

    The loop over the store gathers the signature's evidence: every labeled sample's center-view max-probability,
    and the normalised entropy of the non-argmax probabilities over confidently right samples (1 = perfectly
    even); `policy.smoothing_signature` turns them into implied_alpha, nontarget_uniformity and the verdict.
    """
    n_lab, k = store.manifest["num_labeled"], store.num_classes
    correct_views = correct_center = 0
    max_probs, uniformity = [], []
    for lo in range(0, n_lab, chunk):
        samples = np.arange(lo, min(n_lab, lo + chunk))
        for v in range(store.rows_per_sample):
            r = store.rows(samples, np.full(len(samples), v))
            p = torch.from_numpy(r["logits"]).softmax(-1)
            conf, pred = p.max(-1)
            right = pred.numpy() == r["label"]
            if v == store.manifest["center_view"]:
                correct_center += right.sum()
                max_probs.append(conf.numpy())
                sure = right & (conf.numpy() > 0.5)
                if sure.any() and k > 2:
                    rest = p[torch.from_numpy(sure)].clone()
                    rest.scatter_(1, pred[torch.from_numpy(sure)].unsqueeze(1), 0.0)
                    rest = rest / rest.sum(1, keepdim=True).clamp(min=1e-12)
                    ent = -(rest * rest.clamp(min=1e-12).log()).sum(1) / math.log(k - 1)
                    uniformity.append(ent.numpy())
            else:
                correct_views += right.sum()
    max_probs = np.concatenate(max_probs) if max_probs else np.zeros(0)
    return {
        "top1_views": float(correct_views / max(n_lab * store.views, 1)),
        "top1_center": float(correct_center / max(n_lab, 1)),
        "mean_max_prob": float(max_probs.mean()) if len(max_probs) else None,
        **policy.smoothing_signature(max_probs, uniformity, k),
    }
