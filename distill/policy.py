"""The label-smoothing / KD policy: what the teacher's record says, the store diagnostic's signature, the decision.

A teacher trained with label smoothing erases the between-class information KD transfers, and distilling it at
T > 1 hurts the student (Müller et al. 2019; Chandrasegaran et al. 2022). Three pieces of evidence meet here:
the teacher's own record (`teacher_record`, written with the teacher), the signature its outputs leave in the
store (`smoothing_signature`, computed by the store's diagnostics), and the decision a student takes from both
(`decide`). The KD target itself is never smoothed: smoothing only ever touches the label term.
"""
from __future__ import annotations

import numpy as np

from distill.losses import KD_LOSSES

# the store diagnostic's thresholds: the confidence ceiling a smoothed teacher cannot pass, and how evenly it
# spreads the rest of its mass (1 = perfectly even); both must hold to suspect smoothing
SUSPECT_ALPHA = 0.03
SUSPECT_UNIFORMITY = 0.85


def teacher_record(cfg) -> dict:
    """What later stages must know about how the teacher's targets were shaped, from the recipe's `teacher`.

    A card's pre-training smoothing shaped the targets only while its own head makes them: a fine-tune
    (epochs > 0) trains the head on this data with `label_smoothing`, so then that setting is what counts.
    """
    fine_tuned = cfg.epochs > 0
    if cfg.label_smoothing > 0 or (not fine_tuned and (cfg.pretrain_label_smoothing or 0) > 0):
        smoothed = True
    elif fine_tuned or cfg.pretrained is False:
        smoothed = False
    else:  # the card's own head, and the card does not say how it was trained
        smoothed = None if cfg.pretrain_label_smoothing is None else False
    return {
        "label_smoothing": cfg.label_smoothing,
        "pretrain_label_smoothing": cfg.pretrain_label_smoothing,
        "fine_tuned": fine_tuned,
        "trained_with_label_smoothing": smoothed,
    }


def smoothing_signature(max_probs: np.ndarray, uniformity: list[np.ndarray], num_classes: int) -> dict:
    """The label-smoothing signature of a teacher's center-view outputs.

    A teacher trained with label smoothing α cannot be more confident than 1 - α + α/K, and spreads its
    remaining mass evenly over the other classes (Müller et al. 2019). So: `implied_alpha` = the α whose
    ceiling is the 99th percentile of max-probability (`max_probs`), and `nontarget_uniformity` = the mean
    normalised entropy of the non-argmax probabilities over confidently right samples (`uniformity`, one array
    per chunk). `label_smoothing_suspected` when implied_alpha >= SUSPECT_ALPHA and nontarget_uniformity >=
    SUSPECT_UNIFORMITY: the measure does not depend on the class count, and with a top-k store it is exact,
    because the top-1 probability and the tail's mass are both kept.
    """
    k = num_classes
    p99 = float(np.quantile(max_probs, 0.99)) if len(max_probs) else 1.0
    implied_alpha = max(0.0, (1 - p99) * k / (k - 1))
    # None (JSON null), not NaN, when no sample is confidently right: an untrained teacher shows no signature
    uniform = float(np.concatenate(uniformity).mean()) if uniformity else None
    return {
        "max_prob_p99": p99,
        "implied_alpha": implied_alpha,
        "ls_ceiling": 1 - implied_alpha + implied_alpha / k,
        "nontarget_uniformity": uniform,
        "label_smoothing_suspected": bool(implied_alpha >= SUSPECT_ALPHA and uniform is not None
                                          and uniform >= SUSPECT_UNIFORMITY),
    }


def decide(kd, teacher: dict, diagnostics: dict) -> tuple[float, dict]:
    """The temperature to distil at, and the decision with its reason, for a student's `kd` section.

    `teacher` is the store manifest's teacher entry (its record above), `diagnostics` the store's. The teacher
    counts as smoothed if its fine-tune used smoothing, its card says its pre-training did and its targets come
    from that pre-trained head (no fine-tune), or the store's diagnostic sees the signature. A fine-tune trains
    the head again on this data, so then the card's pre-training smoothing is only noted: measured on
    Fashion-MNIST with the lite0 card (README), T = 4 was no worse than T = 1 after a fine-tune without
    smoothing, and the diagnostic still catches a fine-tuned teacher that kept the signature.
    Then `auto` distils at T = 1, `warn` keeps T and warns, `off` keeps T.
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
    if kd.loss == "none" or not KD_LOSSES[kd.loss].soft:
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
