"""Pure loss functions with their formulas; every one returns a float32 batch mean."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed targets: q = (1 - α) · onehot(y) + α / K.

    The true class gets 1 - α + α/K, every other class α/K (Szegedy et al. 2016).
    """
    q = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)
    return q.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + smoothing / num_classes)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution: mean over the batch of -Σ_k q_k · log softmax(z)_k.

    Computed in float32 even under autocast: log-softmax in bf16 loses the small
    probabilities that smoothed and mixed targets carry.
    """
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
