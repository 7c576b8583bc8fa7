"""Pure loss functions with their formulas; every one returns a float32 batch mean."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def class_weights(counts, mode: str, beta: float = 0.999) -> torch.Tensor | None:
    """Per-class weights of the label term, scaled so that the average training sample weighs 1
    (Σ_c n_c w_c = N, so the loss keeps its scale and the learning rate its meaning); None for "none".

    balanced: w_c ∝ 1 / n_c. effective (Cui et al. 2019): w_c ∝ (1 - β) / (1 - β^n_c), the inverse of the
    "effective number" of samples, between no weighting (β → 0) and balanced (β → 1).
    A class without training samples gets the largest weight of the others (it never occurs in a batch anyway).
    """
    if mode == "none":
        return None
    n = torch.as_tensor(counts, dtype=torch.float64)
    seen = n > 0
    w = torch.zeros_like(n)
    w[seen] = 1 / n[seen] if mode == "balanced" else (1 - beta) / (1 - beta ** n[seen])
    w[~seen] = w[seen].max()
    return (w * n.sum() / (w * n).sum()).float()


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                           gamma: float = 0.0) -> torch.Tensor:
    """Class-weighted focal cross-entropy against a target distribution:
    mean over the batch of -Σ_k w_k · q_k · (1 - p_k)^γ · log p_k, with p = softmax(z).

    w = 1 and γ = 0 give `soft_cross_entropy`; a one-hot q gives Lin et al.'s focal loss -w_y (1 - p_y)^γ log p_y,
    and a mixed or smoothed q weighs each class's share the same way.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    per_class = target.float() * log_p
    if gamma:
        per_class = per_class * (1 - log_p.exp()).pow(gamma)
    if weights is not None:
        per_class = per_class * weights.to(per_class.device)
    return -per_class.sum(-1).mean()


# --- knowledge distillation ----------------------------------------------------------
# Every KD loss takes the student's logits and the teacher's *probabilities at temperature T*
# (p_t = softmax(t / T), possibly mixed by MixUp/CutMix in probability space), so cached and online
# targets, mixed or not, go through one path. Inputs are cast to float32 first.

def standardize(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Logit standardisation (Sun et al. 2024): z ↦ (z - mean(z)) / std(z), per sample, before softmax(·/T)."""
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T² · KL(p_t ‖ softmax(s / T)), summed over classes, mean over the batch.

    KL(p ‖ q) = Σ_k p_k (log p_k - log q_k); classes where p_t = 0 contribute 0. The T² keeps the
    gradient scale independent of T.
    """
    p = teacher_probs.float()
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return temperature**2 * kl.mean()


def kd_hard(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """DeiT hard distillation (Touvron et al. 2021): CE(s, argmax t), mean over the batch.

    With MixUp/CutMix the one-hot teacher decisions are mixed like labels, so pass the mixed
    one-hot targets as `teacher_probs`; the cross-entropy is then -Σ_k q_k log softmax(s)_k.
    """
    return soft_cross_entropy(student_logits, teacher_probs)


def kd_dkd(student_logits: torch.Tensor, teacher_probs: torch.Tensor, target: torch.Tensor, temperature: float,
           alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): T² · (α · TCKD + β · NCKD), mean over the batch.

    With g the target class, b = [p_g, 1 - p_g] the binary target/non-target split and p̂ the
    distribution over the non-target classes renormalised:
        TCKD = KL(b_t ‖ b_s),   NCKD = KL(p̂_t ‖ p̂_s).
    `target` holds g per sample (the label; for unlabeled samples the teacher's argmax).
    """
    p_t = teacher_probs.float()
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_s = log_p_s.exp()
    g = target.long().unsqueeze(1)
    mask = torch.zeros_like(p_t, dtype=torch.bool).scatter_(1, g, True)
    eps = 1e-12
    pt_g, ps_g = p_t.gather(1, g).clamp(eps, 1 - eps), p_s.gather(1, g).clamp(eps, 1 - eps)
    b_t, b_s = torch.cat([pt_g, 1 - pt_g], 1), torch.cat([ps_g, 1 - ps_g], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1)
    # non-target distributions, renormalised: log p̂ = log p - log(1 - p_g) on the other classes
    log_hat_s = (log_p_s - (1 - ps_g).log()).masked_fill(mask, 0.0)
    hat_t = (p_t / (1 - pt_g)).masked_fill(mask, 0.0)
    nckd = (torch.xlogy(hat_t, hat_t) - hat_t * log_hat_s).sum(1)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return 1 - r.mean()


def kd_dist(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
            beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): T² · (β · inter + γ · intra) on p = softmax(z / T).

    inter = 1 - mean_i ρ(p_s[i, :], p_t[i, :])   (Pearson correlation across classes, per sample)
    intra = 1 - mean_c ρ(p_s[:, c], p_t[:, c])   (Pearson correlation across the batch, per class)
    """
    p_s = F.softmax(student_logits.float() / temperature, dim=-1)
    p_t = teacher_probs.float()
    return temperature**2 * (beta * _pearson_distance(p_s, p_t, 1) + gamma * _pearson_distance(p_s, p_t, 0))


# --- the KD losses a recipe can name (`students.N.kd.loss`) ------------------------------
# One signature: (student logits, teacher probabilities, labels (-1: unlabeled), T, the `kd` section) → float32
# scalar. `soft` losses match softmax(t / T) (standardised with `kd.standardize`, which then applies to the
# student's logits too); the others match the teacher's one-hot decision (argmax). Their parameters are `kd`
# keys, documented with `KDConfig` in distill/recipe: kl: temperature; dkd: dkd_alpha, dkd_beta; dist:
# dist_beta, dist_gamma. A new loss is a function here, an entry below, and its test.
@dataclass(frozen=True)
class KDLoss:
    fn: Callable[..., torch.Tensor]
    soft: bool = True  # False: the target is the teacher's argmax, and no temperature applies


def _kl(student_logits, teacher_probs, labels, temperature, kd):
    return kd_kl(student_logits, teacher_probs, temperature)


def _hard(student_logits, teacher_probs, labels, temperature, kd):
    return kd_hard(student_logits, teacher_probs)


def _dkd(student_logits, teacher_probs, labels, temperature, kd):
    # the target class: the label, or for an unlabeled sample the teacher's decision
    g = torch.where(labels >= 0, labels, teacher_probs.argmax(-1))
    return kd_dkd(student_logits, teacher_probs, g, temperature, kd.dkd_alpha, kd.dkd_beta)


def _dist(student_logits, teacher_probs, labels, temperature, kd):
    return kd_dist(student_logits, teacher_probs, temperature, kd.dist_beta, kd.dist_gamma)


KD_LOSSES: dict[str, KDLoss] = {
    "kl": KDLoss(_kl),
    "hard": KDLoss(_hard, soft=False),
    "dkd": KDLoss(_dkd),
    "dist": KDLoss(_dist),
}
