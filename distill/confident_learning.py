"""Confident learning on a teacher's logits (pure numpy): per-class thresholds, suspect labels ranked by margin.

Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70; the
scoring `distill audit` (distill.audit) runs on the teacher's predictions for the training split.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so large logits do not overflow."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_sample(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """What the audit keeps of each sample: p_given = p[y], teacher = argmax p, p_teacher = max p.

    All of confident learning needs only these three numbers per sample, so a large store is read in
    chunks and never held whole.
    """
    rows = np.arange(len(labels))
    teacher = probs.argmax(axis=1)
    return {"p_given": probs[rows, labels], "teacher": teacher, "p_teacher": probs[rows, teacher]}


def class_thresholds(p_given: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """t_j = mean of p_j(x) over the samples x labeled j (Northcutt et al. 2021, the per-class threshold).

    The teacher's average self-confidence on class j: a per-class bar, so a class the teacher is
    generally unsure of (similar-looking classes, few samples) still has suspects, and an easy one
    needs a confident contradiction. The mean includes the mislabeled samples, as in the paper. A class
    with no labeled sample gets t = 1: nothing can be confidently assigned to it.
    """
    sums = np.bincount(labels, weights=p_given, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def margin(p_given: np.ndarray, p_teacher: np.ndarray) -> np.ndarray:
    """score = p_j - p_i, with j the teacher's label and i the given one: 0 when they agree, up to 1.

    The order confident learning prunes by ("Prune by Noise Rate": the examples of an off-diagonal entry
    of the confident joint with the largest margin p_j - p_i). It rewards both a confident teacher and
    a given label it finds unlikely, unlike p_j alone (blind to a close second) or p_i alone (cleanlab's
    self-confidence, blind to whether one other class, or many, takes the mass).
    """
    return p_teacher - p_given


def estimated_errors(teacher: np.ndarray, p_teacher: np.ndarray, labels: np.ndarray, thresholds: np.ndarray,
                     num_classes: int) -> float:
    """Confident learning's estimate of how many given labels are wrong: Σ_{i≠j} C̃[i][j].

    C[i][j] counts the samples labeled i whose teacher label j clears its threshold t_j (the confident
    joint); each row is calibrated to the samples labeled i, C̃[i][j] = C[i][j] / Σ_j' C[i][j'] · n_i,
    since the rows of C count only the confident samples. More than the suspects when many of the wrong
    labels are contradicted without confidence.
    """
    confident = p_teacher >= thresholds[teacher]
    joint = np.zeros((num_classes, num_classes))
    np.add.at(joint, (labels[confident], teacher[confident]), 1)
    n = np.bincount(labels, minlength=num_classes)
    calibrated = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * n[:, None]
    return float(calibrated.sum() - np.trace(calibrated))


def suspects(p_given: np.ndarray, teacher: np.ndarray, p_teacher: np.ndarray, labels: np.ndarray,
             thresholds: np.ndarray, min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, scores) of the suspect labels, highest score first (ties: lower index first).

    Sample x labeled i is a suspect when the teacher's label j = argmax p(x) differs from i, clears its
    class threshold, p_j(x) >= t_j, and p_j(x) >= `min_confidence`. That is the off-diagonal of
    confident learning's confident joint, restricted to the teacher's top class (the paper takes the
    most probable class among those above threshold; they differ only when the top class misses its own
    threshold, and then the teacher is not confident anyway). Score: `margin`.
    """
    flagged = (teacher != labels) & (p_teacher >= thresholds[teacher]) & (p_teacher >= min_confidence)
    index = np.flatnonzero(flagged)
    score = margin(p_given[index], p_teacher[index])
    order = np.lexsort((index, -score))
    return index[order], score[order]


def precision_at(ranked: np.ndarray, truly_wrong: np.ndarray, k: int) -> float:
    """Of the first k ranked samples, the fraction whose label is truly wrong (k beyond the list: of all)."""
    top = ranked[:k]
    return float(np.isin(top, truly_wrong).mean()) if len(top) else 0.0


def teacher_stats(chunks: Iterable[np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """`per_sample` over every chunk of logits, joined: three numbers per sample, whatever K is."""
    parts, lo = [], 0
    for logits in chunks:
        parts.append(per_sample(softmax(logits), labels[lo:lo + len(logits)]))
        lo += len(logits)
    if not parts:
        return {"p_given": np.zeros(0), "teacher": np.zeros(0, np.int64), "p_teacher": np.zeros(0)}
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
