"""The store's label-smoothing diagnostic on simulated teachers: every smoothed one flagged, no unsmoothed one, at any
class count, from a full store and from a top-k one."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from distill import policy, store
from distill.recipe import KDConfig
from distill.store.diagnostics import center_evidence, evenness_testable

N = 2000


def sharp_logits(rng, k, cv):
    """A confident teacher: class c resembles the next 1-3 classes; ~90% right with margin |N(8, 8·cv)| over the
    best other class, the wrong ones lose to a similar class. cv 0.8 is what 10% errors give a normal margin;
    cv 0.25 a teacher whose confidence hardly varies (the hard case for the pile-up)."""
    labels = rng.integers(0, k, N)
    rows = np.arange(N)
    z = rng.normal(0.0, 1.0, (N, k))
    n_similar = np.minimum(1 + labels % 3, k - 1)
    for j in range(1, 4):
        on = j <= n_similar
        z[rows[on], (labels[on] + j) % k] = rng.uniform(3.0, 6.0, on.sum())
    others = z.copy()
    others[rows, labels] = -np.inf
    right = rng.random(N) < 0.9
    margin = np.where(right, np.abs(rng.normal(8.0, 8.0 * cv, N)), -np.abs(rng.normal(0.0, 2.0, N)))
    z[rows, labels] = others.max(1) + margin
    return z, labels


def softmax(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def smoothed(rng, z, alpha, noise=0.2):
    """(1 - α)·softmax(sharp logits) + the α/K floor, each floor value off by ~20% (log-normal)."""
    k = z.shape[1]
    p = (1 - alpha) * softmax(z) + alpha / k * np.exp(rng.normal(-noise**2 / 2, noise, z.shape))
    return p / p.sum(1, keepdims=True)


def tempered(z, mean_max_prob):
    """softmax(z / T) with T found so the mean max-prob is `mean_max_prob` (= accuracy: calibrated)."""
    lo, hi = 0.05, 500.0
    for _ in range(60):
        t = (lo * hi) ** 0.5
        lo, hi = (t, hi) if softmax(z / t).max(1).mean() > mean_max_prob else (lo, t)
    return softmax(z / t)


def as_stored(p, kept=None):
    """The logits the reader returns: float16 logits; with top-k the k largest exact and the tail's exact total
    mass spread evenly over the other classes."""
    lp = np.log(p)
    if kept is not None and kept < p.shape[1]:
        order = np.argsort(-p, 1)
        top, tail = order[:, :kept], np.take_along_axis(p, order[:, kept:], 1).sum(1)
        out = np.repeat(np.log(tail / (p.shape[1] - kept))[:, None], p.shape[1], 1)
        np.put_along_axis(out, top, np.take_along_axis(lp, top, 1), 1)
        lp = out
    return (lp - lp.mean(1, keepdims=True)).astype(np.float16).astype(np.float32)


def signature(logits, labels, kept=None):
    e = center_evidence(logits, labels, kept)
    k = logits.shape[1]
    return policy.smoothing_signature(e["max_prob"], e["gap"], e["right"],
                                      e["evenness"] if evenness_testable(k, kept) else None, k)


def teachers(k, cv):
    rng = np.random.default_rng(k * 10 + int(cv * 10))
    z, labels = sharp_logits(rng, k, cv)
    accuracy = (z.argmax(1) == labels).mean()
    out = {f"smoothed α={a}": (a, smoothed(rng, z, a)) for a in (0.05, 0.1, 0.2)}
    out.update({"calibrated": (0.0, tempered(z, accuracy)), "under-confident 0.8": (0.0, tempered(z, 0.8)),
                "under-confident 0.6": (0.0, tempered(z, 0.6)), "raw (over-confident)": (0.0, softmax(z))})
    return out, labels


@pytest.mark.parametrize("cv", [0.8, 0.25])
@pytest.mark.parametrize("k", [2, 10, 100, 1000])
def test_flags_every_smoothed_teacher_and_no_other(k, cv):
    found, labels = teachers(k, cv)
    stores = {"full": None, **{f"top-{kept}": kept for kept in {5, min(k, 20)} if kept < k}}
    for name, (alpha, p) in found.items():
        for store_name, kept in stores.items():
            s = signature(as_stored(p, kept), labels, kept)
            what = f"K={k} cv={cv} {name}, {store_name}: {s}"
            assert s["label_smoothing_suspected"] == (alpha > 0), what
            if alpha > 0:  # the ceiling gives α back, up to the floor's noise
                assert 0.5 * alpha < s["implied_alpha"] < 1.1 * alpha, what
            assert (s["nontarget_uniformity"] is None) == (k == 2), what
            json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_top_k_store_reads_as_its_full_store(k):
    """p1, the gap and the mass beyond the top 4 are all exact in a top-k store with k >= 4: the same numbers."""
    found, labels = teachers(k, 0.8)
    for _, p in found.values():
        full = signature(as_stored(p), labels)
        for kept in (4, 5, 20):
            top = signature(as_stored(p, kept), labels, kept)
            for key in ("implied_alpha", "ceiling_pileup", "nontarget_uniformity"):
                assert top[key] == pytest.approx(full[key], rel=2e-3, abs=2e-3), (kept, key)


def test_the_readers_own_top_k_gives_the_same_numbers():
    """Through store.reconstruct_topk (an even tail, never above the k-th kept class, with its mass exact at
    T = 1): the same verdicts and, for k >= 4, the full store's numbers."""
    found, labels = teachers(100, 0.8)
    for alpha, p in found.values():
        z = np.log(p).astype(np.float32)
        full = signature(z, labels)
        for kept in (5, 20):
            top = np.argsort(-z, 1)[:, :kept]
            tail = np.ones_like(z, bool)
            np.put_along_axis(tail, top, False, 1)
            z64 = z.astype(np.float64)
            tail_lse = np.log(np.where(tail, np.exp(z64), 0).sum(1)).astype(np.float32)
            tail_mean = (np.where(tail, z64, 0).sum(1) / (100 - kept)).astype(np.float32)
            rec = store.reconstruct_topk(np.take_along_axis(z, top, 1), top, tail_lse, tail_mean, 100)
            s = signature(rec, labels, kept)
            assert s["label_smoothing_suspected"] == (alpha > 0)
            for key in ("implied_alpha", "ceiling_pileup", "nontarget_uniformity"):
                assert s[key] == pytest.approx(full[key], rel=1e-3, abs=1e-3), (kept, key)


def test_small_stores_and_degenerate_teachers_give_null_not_nan():
    labels = np.arange(40) % 2
    s = signature(np.zeros((40, 2), np.float32), labels)  # an untrained teacher: nothing confidently right
    assert not s["label_smoothing_suspected"] and s["nontarget_uniformity"] is None
    json.dumps(s, allow_nan=False)
    s = signature(np.where(np.eye(10)[labels] > 0, 800.0, 0.0).astype(np.float32), labels)  # gaps underflow to 0
    assert not s["label_smoothing_suspected"] and s["implied_alpha"] == 0.0
    json.dumps(s, allow_nan=False)
    s = policy.smoothing_signature(np.zeros(0), np.zeros(0), np.zeros(0, bool), None, 2)  # no labeled sample
    assert not s["label_smoothing_suspected"]
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("storage", ["full", "topk"])
def test_diagnostics_reads_the_store_k_from_the_manifest(storage):
    found, labels = teachers(100, 0.8)
    for alpha, p in (found["smoothed α=0.05"], found["under-confident 0.6"]):
        logits = as_stored(p, 5 if storage == "topk" else None)
        manifest = {"num_labeled": N, "center_view": 1,
                    "logits": {"storage": storage, **({"k": 5} if storage == "topk" else {})}}
        fake = SimpleNamespace(manifest=manifest, num_classes=100, rows_per_sample=2, views=1,
                               rows=lambda s, v, z=logits: {"logits": z[s], "label": labels[s]})
        d = store.diagnostics(fake, chunk=700)
        assert d["label_smoothing_suspected"] == (alpha > 0)
        assert d["top1_center"] == pytest.approx((p.argmax(1) == labels).mean())
        json.dumps(d, allow_nan=False)


def test_decide_explains_the_two_class_signature():
    diag = {"label_smoothing_suspected": True, "implied_alpha": 0.1, "nontarget_uniformity": None,
            "ceiling_pileup": 0.8}
    t, d = policy.decide(KDConfig(temperature=4.0), {}, diag)
    assert t == 1.0 and "pile up" in d["ls_reason"]
