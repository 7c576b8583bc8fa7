"""Losses and MixUp/CutMix: formulas checked against hand computations and direct implementations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill import losses
from distill.kd import student_loss, teacher_probs
from distill.losses import smooth_one_hot, soft_cross_entropy
from distill.mix import mix_images, mix_targets, sample_mix
from distill.policy import decide as ls_policy
from distill.recipe import KDConfig, MixConfig


def test_smooth_one_hot():
    q = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert torch.isclose(q[0, 2], torch.tensor(0.9 + 0.025)) and torch.isclose(q[0, 1], torch.tensor(0.025))


def test_soft_cross_entropy_matches_torch_label_smoothing():
    z, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ours = soft_cross_entropy(z, smooth_one_hot(y, 5, 0.2))
    assert torch.isclose(ours, F.cross_entropy(z, y, label_smoothing=0.2), atol=1e-6)
    # float32 even when the logits come in bfloat16
    assert soft_cross_entropy(z.bfloat16(), smooth_one_hot(y, 5)).dtype == torch.float32


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    rng = np.random.default_rng(0)
    p = sample_mix(MixConfig(mixup_alpha=0.4), (8, 8), rng)
    x, t = torch.rand(4, 3, 8, 8), smooth_one_hot(torch.tensor([0, 1, 2, 3]), 4)
    assert p is not None and p.box is None
    assert torch.allclose(mix_images(x.clone(), p), p.lam * x + (1 - p.lam) * x.flip(0))
    mixed = mix_targets(t, p)
    assert torch.allclose(mixed[0], torch.tensor([p.lam, 0, 0, 1 - p.lam]))


def test_cutmix_lambda_is_the_area_kept():
    rng = np.random.default_rng(1)
    x = torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16)])
    for _ in range(20):
        p = sample_mix(MixConfig(cutmix_alpha=1.0), (16, 16), rng)
        out = mix_images(x, p)
        # sample 0 (zeros) got the partner's ones in the box: its own share is λ
        assert np.isclose(1 - out[0].mean().item(), p.lam)


def test_no_mix_when_off_or_prob_zero():
    rng = np.random.default_rng(0)
    assert sample_mix(MixConfig(), (8, 8), rng) is None
    assert sample_mix(MixConfig(mixup_alpha=1.0, prob=0.0), (8, 8), rng) is None


# --- knowledge distillation losses -------------------------------------------------------


def test_kd_kl_by_hand():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.softmax(t / 2, -1)  # [σ(-0.5), σ(0.5)]
    q = torch.softmax(s / 2, -1)
    expected = 4 * (p * (p / q).log()).sum()
    assert torch.isclose(losses.kd_kl(s, p, 2.0), expected)
    a, b = 1 / (1 + math.exp(0.5)), 1 / (1 + math.exp(-0.5))
    assert math.isclose(losses.kd_kl(s, p, 2.0).item(), 4 * (a * math.log(a / b) + b * math.log(b / a)), rel_tol=1e-5)
    # matches torch's batch-mean KL times T²
    s, t = torch.randn(16, 7), torch.randn(16, 7)
    ref = 9 * F.kl_div(F.log_softmax(s / 3, -1), torch.softmax(t / 3, -1), reduction="batchmean")
    assert torch.isclose(losses.kd_kl(s, torch.softmax(t / 3, -1), 3.0), ref, atol=1e-6)


def test_t_squared_keeps_the_gradient_scale():
    # for large T the gradient of T²·KL w.r.t. the logits tends to (s - t)/K·(centred): independent of T
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    grads = []
    for temperature in (50.0, 200.0):
        x = s.clone().requires_grad_(True)
        losses.kd_kl(x, torch.softmax(t / temperature, -1), temperature).backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).norm() < 0.05 * grads[1].norm()  # without T² they would differ 4x


@pytest.mark.parametrize("name", ["kl", "dkd", "dist", "hard"])
def test_zero_loss_when_the_student_equals_the_teacher(name):
    z = torch.randn(32, 10) * 3
    p = teacher_probs(z, KDConfig(loss=name), 4.0)
    value = {"kl": lambda: losses.kd_kl(z, p, 4.0), "dist": lambda: losses.kd_dist(z, p, 4.0),
             "dkd": lambda: losses.kd_dkd(z, p, z.argmax(1), 4.0),
             # hard targets are one-hot: the loss vanishes for a student certain of the teacher's argmax
             "hard": lambda: losses.kd_hard(50 * F.one_hot(z.argmax(1), 10).float(), p)}[name]()
    assert value.abs() < 1e-3, value
    # and positive otherwise
    other = torch.randn(32, 10)
    worse = {"kl": losses.kd_kl(other, p, 4.0), "dist": losses.kd_dist(other, p, 4.0),
             "dkd": losses.kd_dkd(other, p, z.argmax(1), 4.0), "hard": losses.kd_hard(other, p)}[name]
    assert worse > value + 1e-3


def test_dkd_by_hand_and_its_decomposition():
    # α·TCKD + β·NCKD with α = β = 1 equals KL plus a non-negative correction (Zhao et al., eq. 3-4)
    s, t = torch.randn(8, 6), torch.randn(8, 6)
    y = torch.randint(0, 6, (8,))
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    g = y.unsqueeze(1)
    b_t = torch.cat([p_t.gather(1, g), 1 - p_t.gather(1, g)], 1)
    b_s = torch.cat([p_s.gather(1, g), 1 - p_s.gather(1, g)], 1)
    tckd = (b_t * (b_t / b_s).log()).sum(1)
    mask = F.one_hot(y, 6).bool()
    hat_t = (p_t / (1 - p_t.gather(1, g))).masked_fill(mask, 0)
    hat_s = (p_s / (1 - p_s.gather(1, g))).masked_fill(mask, 1)
    nckd = (hat_t * (hat_t.clamp_min(1e-12) / hat_s).log()).sum(1)
    expected = (2.0 * tckd + 3.0 * nckd).mean()
    assert torch.isclose(losses.kd_dkd(s, p_t, y, 1.0, alpha=2.0, beta=3.0), expected, atol=1e-5)
    kl = (p_t * (p_t / p_s).log()).sum(1)
    assert torch.allclose(tckd + (1 - p_t.gather(1, g)).squeeze(1) * nckd, kl, atol=1e-5)


def test_dist_by_hand():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([p_s[i], p_t[i]]))[0, 1] for i in range(6)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([p_s[:, c], p_t[:, c]]))[0, 1] for c in range(5)]).mean()
    assert torch.isclose(losses.kd_dist(s, p_t, 1.0, beta=2.0, gamma=0.5), 2 * inter + 0.5 * intra, atol=1e-5)


def test_standardize():
    z = losses.standardize(torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]))
    assert torch.allclose(z[0], z[1], atol=1e-5) and torch.allclose(z.mean(1), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("name", ["kl", "dkd", "dist", "hard"])
def test_no_gradient_reaches_the_teacher_and_float32_under_bf16(name):
    student = torch.randn(8, 10, requires_grad=True)
    teacher_logits = torch.randn(8, 10, requires_grad=True)
    kd = KDConfig(loss=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = student.bfloat16() * 1.0
        p = teacher_probs(teacher_logits.detach().bfloat16(), kd, 4.0)
        parts = student_loss(s, torch.randint(0, 10, (8,)), p, kd, 4.0, 10, 0.1, None)
    assert parts["loss"].dtype == torch.float32 and parts["loss_kd"].dtype == torch.float32
    parts["loss"].backward()
    assert student.grad is not None and teacher_logits.grad is None


def test_the_kd_target_ignores_label_smoothing():
    """Smoothing touches only the label term: the KD target, and the KD part of the loss, are bit-identical."""
    z, s = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    kd = KDConfig(loss="kl", weight=0.5)
    target = teacher_probs(z, kd, 4.0)
    parts = {ls: student_loss(s, y, target, kd, 4.0, 10, ls, None) for ls in (0.0, 0.1, 0.3)}
    assert all(torch.equal(parts[0.0]["loss_kd"], p["loss_kd"]) for p in parts.values())
    assert torch.equal(teacher_probs(z, kd, 4.0), target)
    assert parts[0.0]["loss_ce"] != parts[0.3]["loss_ce"]  # while the label term does change


def test_unlabeled_samples_only_contribute_the_kd_term():
    s, z = torch.randn(4, 3), torch.randn(4, 3)
    kd = KDConfig(loss="kl", weight=0.5)
    p = teacher_probs(z, kd, 2.0)
    y = torch.tensor([0, 1, -1, -1])
    parts = student_loss(s, y, p, kd, 2.0, 3, 0.0, None)
    assert torch.isclose(parts["loss_ce"], F.cross_entropy(s[:2], y[:2]))
    assert torch.isclose(parts["loss_kd"], losses.kd_kl(s, p, 2.0))
    assert torch.isclose(parts["loss"], 0.5 * parts["loss_ce"] + 0.5 * parts["loss_kd"])
    only_kd = student_loss(s, torch.full((4,), -1), p, kd, 2.0, 3, 0.0, None)
    assert only_kd["loss_ce"] == 0 and torch.isclose(only_kd["loss"], 0.5 * parts["loss_kd"])


def test_ls_policy_decisions():
    ls_teacher = {"label_smoothing": 0.1, "pretrain_label_smoothing": None}
    plain = {"label_smoothing": 0.0, "pretrain_label_smoothing": 0.0}
    t, d = ls_policy(KDConfig(temperature=4.0, ls_policy="auto"), ls_teacher, {})
    assert t == 1.0 and d["ls_decision"] == "T=1" and "fine-tuned with label smoothing 0.1" in d["ls_reason"]
    t, d = ls_policy(KDConfig(temperature=4.0, ls_policy="warn"), ls_teacher, {})
    assert t == 4.0 and d["ls_decision"] == "warn"
    t, d = ls_policy(KDConfig(temperature=4.0, ls_policy="off"), ls_teacher, {})
    assert t == 4.0 and d["ls_decision"] == "off"
    t, d = ls_policy(KDConfig(temperature=4.0), plain, {})
    assert t == 4.0 and d["ls_decision"] == "keep" and not d["teacher_label_smoothed"]
    # the measured signature alone is enough
    diag = {"label_smoothing_suspected": True, "implied_alpha": 0.1, "nontarget_uniformity": 0.95}
    t, d = ls_policy(KDConfig(temperature=4.0), plain, diag)
    assert t == 1.0 and "store diagnostic" in d["ls_reason"]
    # and a card's pre-training smoothing too
    t, d = ls_policy(KDConfig(temperature=2.0), {"pretrain_label_smoothing": 0.1}, {})
    assert t == 1.0 and "teacher card" in d["ls_reason"]
    # ... unless a fine-tune trained the head again without smoothing: then it is noted, not counted
    t, d = ls_policy(KDConfig(temperature=2.0), {"pretrain_label_smoothing": 0.1, "fine_tuned": True}, {})
    assert t == 2.0 and d["ls_decision"] == "keep" and "fine-tuned without it" in d["ls_reason"]
    t, d = ls_policy(KDConfig(temperature=2.0), {"pretrain_label_smoothing": 0.1, "fine_tuned": True}, diag)
    assert t == 1.0 and "store diagnostic" in d["ls_reason"] and "teacher card" not in d["ls_reason"]


# --- stability on extreme logits, against float64 references written from the formulas ------------------------
# Inputs are produced under bf16 autocast (the losses cast to float32 themselves); the references see the same
# bf16 values in float64 and never subtract a mass from 1.
REF_RTOL, REF_ATOL = 1e-4, 1e-5  # on the loss / T² per sample (DKD, KL) or per batch (DIST)


def _ref_dkd(s, t, g, temperature, alpha=1.0, beta=8.0):
    """Per-sample DKD / T² in float64 from logits: b = [p_g, Σ_{k≠g} p_k], p̂ = p / Σ_{k≠g} p_k off g."""
    p_s, p_t = torch.softmax(s.double() / temperature, -1), torch.softmax(t.double() / temperature, -1)
    mask = F.one_hot(g, s.shape[-1]).bool()

    def split(p):
        other = p.masked_fill(mask, 0).sum(-1, keepdim=True)
        return torch.cat([p.gather(1, g[:, None]), other], 1), p / other

    (b_s, hat_s), (b_t, hat_t) = split(p_s), split(p_t)
    tckd = (torch.xlogy(b_t, b_t) - b_t * b_s.log()).sum(-1)
    nckd = (torch.xlogy(hat_t, hat_t) - hat_t * hat_s.log()).masked_fill(mask, 0).sum(-1)
    return alpha * tckd + beta * nckd


def _ref_kl(s, t, temperature):
    p_s, p_t = torch.softmax(s.double() / temperature, -1), torch.softmax(t.double() / temperature, -1)
    return (torch.xlogy(p_t, p_t) - p_t * p_s.log()).sum(-1)


def _ref_dist(s, t, temperature, eps=1e-8):
    p_s, p_t = torch.softmax(s.double() / temperature, -1), torch.softmax(t.double() / temperature, -1)

    def rho(a, b, dim):
        a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
        return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)

    return (1 - rho(p_s, p_t, 1).mean()) + (1 - rho(p_s, p_t, 0).mean())


def _extreme_batch(num_classes, gap, seed):
    """(student logits, teacher logits, target classes) in bf16, made under autocast. The teacher puts `gap` on
    its argmax over the next logit; the students: random, as confident as the teacher on the same class, as
    confident on another class; the target class: the teacher's argmax, or (last rows) another class."""
    gen = torch.Generator().manual_seed(seed)
    n = 6
    t = torch.randn(n, num_classes, generator=gen)
    top = torch.randint(0, num_classes, (n,), generator=gen)
    other = (top + 1 + torch.randint(0, num_classes - 1, (n,), generator=gen)) % num_classes
    t[torch.arange(n), top] = t.max(1).values + gap
    s = torch.randn(n, num_classes, generator=gen) * 2
    s[2:4] = t[2:4] + torch.randn(2, num_classes, generator=gen)
    s[4:, :] = t[4:] * 0.5
    s[torch.arange(4, n), other[4:]] = s[4:].max(1).values + gap
    g = torch.where(torch.arange(n) < 4, top, other)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eye = torch.eye(num_classes)
        return torch.mm(s, eye), torch.mm(t, eye), g  # matmuls run in bf16 under autocast


EXTREME = [(k, temperature, gap) for k in (2, 10, 1000) for temperature in (1.0, 4.0)
           for gap in (0.0, 15.0, 18.0, 40.0, 80.0)]


def _loss_and_reference(name, s, t, p, g, temperature):
    """(the loss / T², its float64 reference) of student logits `s` (any dtype; for the reference, a float64
    tensor), teacher logits `t` and their probabilities `p`."""
    if name == "dkd":
        return losses.kd_dkd(s, p, g, temperature, 1.0, 8.0) / temperature**2, _ref_dkd(s, t, g, temperature).mean()
    if name == "kl":
        return losses.kd_kl(s, p, temperature) / temperature**2, _ref_kl(s, t, temperature).mean()
    return losses.kd_dist(s, p, temperature) / temperature**2, _ref_dist(s, t, temperature)


@pytest.mark.parametrize("num_classes,temperature,gap", EXTREME)
def test_kd_losses_are_stable_on_extreme_logits(num_classes, temperature, gap):
    s_bf, t_bf, g = _extreme_batch(num_classes, gap, seed=num_classes + int(gap))
    assert s_bf.dtype == t_bf.dtype == torch.bfloat16
    for name in ("dkd", "kl", "dist"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = teacher_probs(t_bf, KDConfig(loss=name), temperature)
        # DKD and KL row by row (an error is not averaged away); DIST's intra term needs the whole batch
        for rows in [[i] for i in range(len(g))] if name != "dist" else [list(range(len(g)))]:
            leaf = s_bf[rows].detach().requires_grad_(True)  # bf16, as a model's output under autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value, _ = _loss_and_reference(name, leaf, t_bf[rows], p[rows], g[rows], temperature)
            assert value.dtype == torch.float32
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(leaf.grad).all(), (name, rows, value)
            # value and gradient against float64 (a float32 leaf: a bf16 one would round its gradient to bf16)
            s32 = s_bf[rows].float().requires_grad_(True)
            s64 = s_bf[rows].double().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                value, _ = _loss_and_reference(name, s32, t_bf[rows], p[rows], g[rows], temperature)
            _, ref = _loss_and_reference(name, s64, t_bf[rows].double(), p[rows], g[rows], temperature)
            (value.backward(), ref.backward())
            assert math.isclose(value.item(), ref.item(), rel_tol=REF_RTOL, abs_tol=REF_ATOL), (name, rows, value, ref)
            assert torch.allclose(s32.grad.double(), s64.grad, rtol=REF_RTOL, atol=REF_ATOL), (name, rows)


@pytest.mark.parametrize("num_classes,temperature,gap", [(2, 4.0, 40.0), (10, 1.0, 10.0), (10, 1.0, 15.0),
                                                          (1000, 4.0, 60.0)])
def test_dist_of_a_batch_confident_in_one_class(num_classes, temperature, gap):
    """Every sample confident in class 0: its column's correlation across the batch lives in differences of
    probabilities near 1 (old: 1.1e-3 relative error at K = 2, T = 4, gap 40; now ~1e-7)."""
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(16, num_classes, generator=gen), torch.randn(16, num_classes, generator=gen)
    t[:, 0] = t.max(1).values + gap + 2 * torch.rand(16, generator=gen)
    s[:, 0] = s.max(1).values + gap + 2 * torch.rand(16, generator=gen)
    s, t = s.bfloat16(), t.bfloat16()
    leaf = s.float().requires_grad_(True)
    value = losses.kd_dist(leaf, teacher_probs(t, KDConfig(loss="dist"), temperature), temperature) / temperature**2
    value.backward()
    s64 = s.double().requires_grad_(True)
    ref = _ref_dist(s64, t, temperature)
    ref.backward()
    assert math.isclose(value.item(), ref.item(), rel_tol=REF_RTOL, abs_tol=REF_ATOL), (value, ref)
    assert torch.allclose(leaf.grad.double(), s64.grad, rtol=REF_RTOL, atol=REF_ATOL)


def test_dkd_for_a_confident_teacher_is_its_limit_not_nan():
    """The issue's example (K = 10, T = 1, teacher logit gap 15 ... 18): 1 - p_g from float32 probabilities gave
    wrong values, then NaN; the summed non-target mass gives the float64 value at every gap. With this student:
    old 6.62 / 7.87 / NaN / NaN / NaN at gaps 15 / 16 / 17 / 18 / 30, float64 and now 8.6917 at every gap."""
    student = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, -2.0, 0.25, 1.0]])
    values, refs = [], []
    for gap in (15.0, 16.0, 17.0, 18.0, 30.0):
        t = torch.zeros(1, 10)
        t[0, 0] = gap
        value = losses.kd_dkd(student, torch.softmax(t, -1), torch.tensor([0]), 1.0)
        assert torch.isfinite(value)
        values.append(value.item())
        refs.append(_ref_dkd(student, t, torch.tensor([0]), 1.0).item())
    assert all(math.isclose(v, r, rel_tol=1e-5) for v, r in zip(values, refs, strict=True)), (values, refs)
    # the gap only moves the tiny non-target mass: the loss is all but constant, at its one-hot limit
    limit = -F.log_softmax(student, -1)[0, 0] + 8 * _ref_kl(student[:, 1:], torch.zeros(1, 9), 1.0)[0]
    assert all(math.isclose(v, limit.item(), rel_tol=1e-4) for v in values), (values, limit)


def test_dkd_of_a_one_hot_teacher_has_no_non_target_term():
    s = torch.randn(4, 5)
    p = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    value = losses.kd_dkd(s, p, torch.tensor([0, 1, 2, 3]), 1.0)
    assert torch.isclose(value, -F.log_softmax(s, -1)[torch.arange(4), torch.arange(4)].mean())


def test_dkd_target_class_follows_the_larger_mixed_weight():
    """Mixed with sample B-1-i at own weight λ: the target class is the own label for λ ≥ 0.5, else the partner's;
    an unlabeled chosen label falls back to the mixed teacher's argmax. Unmixed: the label, as before."""
    from distill.mix import MixParams

    gen = torch.Generator().manual_seed(3)
    s, z = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen) * 3
    kd = KDConfig(loss="dkd", weight=1.0)
    labels = torch.tensor([0, 1, -1, 3])
    for lam in (0.3, 0.7):
        mix = MixParams(lam=lam)
        target = mix_targets(teacher_probs(z, kd, 2.0), mix)
        got = student_loss(s, labels, target, kd, 2.0, 6, 0.0, mix)["loss_kd"]
        chosen = labels if lam >= 0.5 else labels.flip(0)  # lam 0.3: [3, -1, 1, 0]
        expected_g = torch.where(chosen >= 0, chosen, target.argmax(-1))
        assert torch.isclose(got, losses.kd_dkd(s, target, expected_g, 2.0, kd.dkd_alpha, kd.dkd_beta))
        if lam < 0.5:
            # sample 0 takes its partner's class 3; sample 1's partner is unlabeled: the mixed teacher's argmax
            assert expected_g[0] == 3 and expected_g[1] == target[1].argmax() and expected_g[3] == 0
            own = torch.where(labels >= 0, labels, target.argmax(-1))
            assert not torch.isclose(got, losses.kd_dkd(s, target, own, 2.0, kd.dkd_alpha, kd.dkd_beta))
    # unmixed: the label (teacher's argmax where unlabeled), unchanged
    p = teacher_probs(z, kd, 2.0)
    got = student_loss(s, labels, p, kd, 2.0, 6, 0.0, None)["loss_kd"]
    assert torch.equal(got, losses.kd_dkd(s, p, torch.where(labels >= 0, labels, p.argmax(-1)), 2.0, 1.0, 8.0))
    # kl, hard and dist never look at the class
    for name in ("kl", "hard", "dist"):
        kd = KDConfig(loss=name, weight=1.0)
        target = mix_targets(teacher_probs(z, kd, 2.0), MixParams(lam=0.3))
        direct = losses.KD_LOSSES[name].fn(s, target, labels, 2.0, kd)
        assert torch.equal(student_loss(s, labels, target, kd, 2.0, 6, 0.0, MixParams(lam=0.3))["loss_kd"], direct)
