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

    Computed as the authors' code does (mdistiller, DKD.py), stable for confident teachers: 1 - p_g is
    never formed by a subtraction. Student, in log space with z = s / T:
        log p_g = z_g - lse_k z_k,   log(1 - p_g) = lse_{k≠g} z_k - lse_k z_k,   log p̂_k = z_k - lse_{k≠g} z_k.
    Teacher (probabilities, possibly mixed): its non-target mass is the *sum* Σ_{k≠g} p_k and p̂_k = p_k / that
    sum; 0 · log 0 = 0 (xlogy). A teacher with no non-target mass at all (one-hot) has no p̂ and NCKD = 0.
    """
    z = student_logits.float() / temperature
    p_t = teacher_probs.float()
    g = target.long().unsqueeze(1)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, g, True)
    # student: log p_g, log(1 - p_g) and log p̂ from log-sum-exps, never from probabilities
    lse = torch.logsumexp(z, -1, keepdim=True)
    lse_other = torch.logsumexp(z.masked_fill(mask, float("-inf")), -1, keepdim=True)
    log_b_s = torch.cat([z.gather(1, g) - lse, lse_other - lse], 1)
    log_hat_s = (z - lse_other).masked_fill(mask, 0.0)
    # teacher: the target mass and the summed non-target mass (small masses summed, not 1 minus a large one)
    other_t = p_t.masked_fill(mask, 0.0)
    mass_other = other_t.sum(1, keepdim=True)
    b_t = torch.cat([p_t.gather(1, g), mass_other], 1)
    hat_t = other_t / mass_other.clamp_min(torch.finfo(torch.float32).tiny)
    tckd = (torch.xlogy(b_t, b_t) - b_t * log_b_s).sum(1)
    nckd = (torch.xlogy(hat_t, hat_t) - hat_t * log_hat_s).sum(1)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def _split_at_one(probs: torch.Tensor, complement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = o + r with o ∈ {0, 1} exact and r small and precise: a row's class above 1/2 becomes 1 - (the summed
    mass of the others, `complement`), so differences between probabilities near 1 keep their digits."""
    top = probs.argmax(-1, keepdim=True)
    big = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, probs.gather(1, top) > 0.5)
    return big.float(), torch.where(big, -complement.expand_as(probs), probs)


def _pearson_distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], dim: int,
                      eps: float = 1e-8) -> torch.Tensor:
    # centred as (o - mean o) + (r - mean r): exact where a class is near 1 all along `dim`
    a = (a[0] - a[0].mean(dim, keepdim=True)) + (a[1] - a[1].mean(dim, keepdim=True))
    b = (b[0] - b[0].mean(dim, keepdim=True)) + (b[1] - b[1].mean(dim, keepdim=True))
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return 1 - r.mean()


def kd_dist(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
            beta: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al. 2022): T² · (β · inter + γ · intra) on p = softmax(z / T).

    inter = 1 - mean_i ρ(p_s[i, :], p_t[i, :])   (Pearson correlation across classes, per sample)
    intra = 1 - mean_c ρ(p_s[:, c], p_t[:, c])   (Pearson correlation across the batch, per class)
    with ρ(a, b) = Σ (a - ā)(b - b̄) / (‖a - ā‖ ‖b - b̄‖ + 1e-8). A probability near 1 is taken as 1 minus the summed
    mass of the other classes (the student's from log-sum-exps), so a batch confident in one class keeps the
    small differences its correlation across the batch is made of.
    """
    z = student_logits.float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    top = z.argmax(-1, keepdim=True)
    other = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
    s = _split_at_one((z - lse).exp(), (torch.logsumexp(z.masked_fill(other, float("-inf")), -1, True) - lse).exp())
    p_t = teacher_probs.float()
    top_t = torch.zeros_like(p_t, dtype=torch.bool).scatter_(1, p_t.argmax(-1, keepdim=True), True)
    t = _split_at_one(p_t, p_t.masked_fill(top_t, 0.0).sum(-1, keepdim=True))
    return temperature**2 * (beta * _pearson_distance(s, t, 1) + gamma * _pearson_distance(s, t, 0))


# --- the KD losses a recipe can name (`students.N.kd.loss`) ------------------------------
# One signature: (student logits, teacher probabilities, labels, T, the `kd` section) → float32 scalar. `labels` is
# the batch's target class after mixing (`kd.student_loss`: under MixUp/CutMix the label with the larger weight),
# -1 where it is unknown (unlabeled); a loss that needs a class then takes the teacher's argmax. `soft` losses
# match softmax(t / T) (standardised with `kd.standardize`, which then applies to the student's logits too); the
# others match the teacher's one-hot decision (argmax). Their parameters are `kd` keys, documented with `KDConfig`
# in distill/recipe: kl: temperature; dkd: dkd_alpha, dkd_beta; dist: dist_beta, dist_gamma. A new loss is a
# function here, an entry below, and its test.
@dataclass(frozen=True)
class KDLoss:
    fn: Callable[..., torch.Tensor]
    soft: bool = True  # False: the target is the teacher's argmax, and no temperature applies


def _kl(student_logits, teacher_probs, labels, temperature, kd):
    return kd_kl(student_logits, teacher_probs, temperature)


def _hard(student_logits, teacher_probs, labels, temperature, kd):
    return kd_hard(student_logits, teacher_probs)


def _dkd(student_logits, teacher_probs, labels, temperature, kd):
    # the target class: the (mixed batch's) label, or where it is unknown the decision of the (mixed) teacher
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
