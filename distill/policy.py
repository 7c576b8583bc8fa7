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

# the store diagnostic's thresholds, set between the simulated teachers of tests/test_policy.py. A smoothed teacher
# cannot pass the confidence ceiling 1 - α + α/K (implied α >= SUSPECT_ALPHA: a ceiling under 0.99 at K = 2), at
# least SUSPECT_PILEUP of its right samples sit within PILEUP_BAND (relative, in log-odds) under that ceiling, and
# with K >= 3 the non-target classes beyond the FAVOURED_CLASSES most probable hold at least SUSPECT_UNIFORMITY of
# their even share. Simulated (K = 2..1000, full and top-k): smoothed teachers give pile-up >= 0.68 and uniformity
# >= 0.88; teachers without smoothing (calibrated, or temperature-scaled to max-prob 0.6-0.8) pile-up <= 0.22, and
# uniformity <= 0.67 at K = 10 but up to 0.97 at K = 1000, where temperature raises a diffuse tail into a floor:
# there the ceiling and the pile-up are what tell them apart.
SUSPECT_ALPHA = 0.02
FAVOURED_CLASSES = 3
SUSPECT_UNIFORMITY = 0.7
PILEUP_BAND = 0.25
SUSPECT_PILEUP = 0.35


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


def smoothing_signature(max_prob: np.ndarray, gap: np.ndarray, right: np.ndarray, evenness: np.ndarray | None,
                        num_classes: int) -> dict:
    """The label-smoothing signature of a teacher's center-view outputs (`store.diagnostics.center_evidence`).

    A teacher trained with label smoothing α on K classes cannot be more confident than 1 - α + α/K, its right
    samples pile up just under that ceiling, and it spreads the rest of its mass evenly (Müller et al. 2019).
    `max_prob` and `gap` (= 1 - max_prob, summed from the other probabilities) of every labeled sample, `right`
    whether it was right, `evenness` one value per confidently right sample (None when K = 2 or the store's k
    leaves nothing to test). Each measure below is a ratio, so it reads the same at any K:
    - `implied_alpha`: the α whose ceiling is the 99th percentile of max-prob, (1 - p99)·K/(K - 1).
    - `ceiling_pileup`: the fraction of right samples whose log-odds log(p1 / (1 - p1)) is within PILEUP_BAND of
      its 99th percentile (relatively): training with smoothing stops every right sample at the ceiling, while a
      teacher without it, however under-confident, keeps its spread of margins (temperature scales them all).
    - `nontarget_uniformity`: the median evenness, the mean probability of the non-target classes outside the
      FAVOURED_CLASSES most probable over the mean of all non-target ones: ≈ 1 for an even floor at any K, even
      when the smoothed teacher's similar classes keep some mass; near 0 when the doubt sits on a few classes.
    `label_smoothing_suspected` when all that can be measured agrees: implied_alpha >= SUSPECT_ALPHA, ceiling_pileup
    >= SUSPECT_PILEUP and, with K >= 3, nontarget_uniformity >= SUSPECT_UNIFORMITY. Exact for top-k stores (see
    center_evidence). None (JSON null), never NaN, where a measure is undefined.
    """
    k = num_classes
    # the 1st percentile of the gap rather than 1 - p99: a confident teacher's gaps are below float resolution at 1
    g01 = float(np.quantile(gap, 0.01)) if len(gap) else 0.0
    implied_alpha = g01 * k / (k - 1) if k > 1 else 0.0
    pileup = None
    if right.any() and g01 > 0:
        with np.errstate(divide="ignore"):
            odds = np.log(max_prob[right]) - np.log(gap[right])  # +inf where the gap underflowed: far from a ceiling
        top = float(np.quantile(odds, 0.99))
        pileup = float((odds >= (1 - PILEUP_BAND) * top).mean()) if np.isfinite(top) and top > 0 else 0.0
    uniform = float(np.median(evenness)) if evenness is not None and len(evenness) else None
    even = evenness is None or (uniform is not None and uniform >= SUSPECT_UNIFORMITY)
    return {
        "max_prob_p99": 1 - g01,
        "implied_alpha": implied_alpha,
        "ls_ceiling": 1 - implied_alpha + implied_alpha / k,
        "nontarget_uniformity": uniform,
        "ceiling_pileup": pileup,
        "label_smoothing_suspected": bool(implied_alpha >= SUSPECT_ALPHA and pileup is not None
                                          and pileup >= SUSPECT_PILEUP and even),
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
        even = diagnostics.get("nontarget_uniformity")
        shape = (f"non-target probabilities are even ({even:.2f})" if even is not None else
                 f"right samples pile up under it ({diagnostics.get('ceiling_pileup') or 0:.2f})")
        evidence.append(f"store diagnostic: confidence ceiling implies alpha ≈ {diagnostics['implied_alpha']:.3f} "
                        f"and {shape}")
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
