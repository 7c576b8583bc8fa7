"""The imbalance tools: class weights, focal loss, class-balanced sampling, the long-tail selection, early stopping."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.data import long_tail_indices
from distill.loaders import EpochSampler
from distill.losses import class_weights, soft_cross_entropy, weighted_cross_entropy
from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_class_weights_keep_the_average_sample_weight_at_one():
    counts = [500, 50, 5, 0]
    for mode in ("balanced", "effective"):
        w = class_weights(counts, mode, beta=0.99)
        assert float((w * torch.tensor(counts, dtype=torch.float32)).sum()) == pytest.approx(sum(counts), rel=1e-5)
        assert w[0] < w[1] < w[2] and w[3] == w[:3].max()  # an absent class gets the largest weight
    balanced = class_weights(counts, "balanced")
    assert balanced[1] / balanced[0] == pytest.approx(10.0)  # ∝ 1 / n
    effective = class_weights(counts, "effective", beta=0.99)
    assert 1 < effective[1] / effective[0] < 10  # between none and balanced
    assert class_weights(counts, "none") is None


def test_weighted_cross_entropy_reduces_to_the_known_losses():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    onehot = F.one_hot(labels, 5).float()
    soft = torch.softmax(torch.randn(16, 5, generator=g), -1)
    assert weighted_cross_entropy(logits, soft) == pytest.approx(float(soft_cross_entropy(logits, soft)), rel=1e-6)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    assert weighted_cross_entropy(logits, onehot, w) == pytest.approx(
        float(F.cross_entropy(logits, labels, weight=w, reduction="none").mean()), rel=1e-6)
    p_y = torch.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    focal = (-(1 - p_y) ** 2 * p_y.log()).mean()  # Lin et al. 2017 with γ = 2
    assert weighted_cross_entropy(logits, onehot, gamma=2.0) == pytest.approx(float(focal), rel=1e-5)


def test_balanced_samplers_draw_every_class_equally_and_depend_on_seed_and_epoch_only():
    classes = np.repeat(np.arange(3), [600, 60, 6])
    over = EpochSampler(len(classes), seed=1, classes=classes, balance="oversample")
    drawn = classes[list(over)]
    assert len(drawn) == 666 and (np.abs(np.bincount(drawn) / 666 - 1 / 3) < 0.06).all()
    under = EpochSampler(len(classes), seed=1, classes=classes, balance="undersample")
    order = list(under)
    assert len(under) == len(order) == 18 and np.bincount(classes[order]).tolist() == [6, 6, 6]
    assert len(set(order)) == 18  # without replacement
    again = EpochSampler(len(classes), seed=1, classes=classes, balance="oversample")
    assert list(again) == list(over)
    again.set_epoch(1)
    assert list(again) != list(over)
    plain = EpochSampler(10, seed=0)
    assert sorted(plain) == list(range(10))


def test_long_tail_follows_the_exponential_profile():
    labels = np.repeat(np.arange(10), 1000)
    picked = long_tail_indices(labels, 10, ratio=100, seed=0)
    counts = np.bincount(labels[picked], minlength=10)
    assert counts[0] == 1000 and counts[9] == 10
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)
    assert counts[3] == round(1000 * 100 ** (-3 / 9))
    assert np.array_equal(picked, long_tail_indices(labels, 10, ratio=100, seed=0))
    assert np.bincount(labels[long_tail_indices(labels, 10, ratio=1, seed=0)]).tolist() == [1000] * 10


def test_recipe_keys_and_their_errors():
    base = ["teacher.model=timm:resnet10t"]
    recipe = load_recipe(ROOT / "recipes/tiny-timm.yaml", [
        "data.long_tail=50", "teacher.patience=2", "teacher.imbalance.class_weights=effective",
        "teacher.imbalance.focal_gamma=2", "teacher.imbalance.sampler=oversample", "teacher.select_by=macro_f1"])
    assert recipe.data.long_tail == 50 and recipe.teacher.patience == 2
    assert recipe.teacher.imbalance.sampler == "oversample" and recipe.teacher.select_by == "macro_f1"
    for bad, message in (("data.long_tail=0.5", "data.long_tail: expected a ratio >= 1"),
                         ("teacher.imbalance.sampler=smote", "teacher.imbalance.sampler: expected one of"),
                         ("teacher.imbalance.focal_gamma=-1", "teacher.imbalance.focal_gamma: expected a number"),
                         ("teacher.patience=0", "teacher.patience: expected an integer >= 1")):
        with pytest.raises(Exception, match=message):
            load_recipe(ROOT / "recipes/tiny-timm.yaml", [*base, bad])


@pytest.mark.slow
def test_a_long_tailed_teacher_with_every_tool_trains_and_stops_early(tmp_path):
    """Long-tailed data, class-weighted focal loss, an oversampling sampler, selection by macro-F1; with a
    learning rate of 1e-12 nothing changes (a LayerNorm ViT: no running statistics either), so patience 1 stops
    after epoch 2 of 5."""
    overrides = [f"output_dir={tmp_path}", "targets.export=false", "data.subset=600", "data.long_tail=20",
                 "teacher.epochs=5", "teacher.patience=1", "teacher.optim.lr=1e-12", "teacher.optim.warmup_epochs=0",
                 "teacher.imbalance.class_weights=balanced", "teacher.imbalance.focal_gamma=2",
                 "teacher.imbalance.sampler=oversample", "teacher.select_by=macro_f1", "log.progress=false"]
    r = subprocess.run(["distill", "teach", "recipes/tiny-vit.yaml", *overrides], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "tiny-vit" / "teacher" / "metrics.json").read_text())
    assert m["stopped_early"] is True and m["epochs_trained"] == 2 and len(m["history"]) == 2
    assert m["best_epoch"] == 1 and m["select_by"] == "macro_f1"
    assert m["imbalance"] == {"class_weights": "balanced", "effective_beta": 0.999, "focal_gamma": 2.0,
                              "sampler": "oversample"}
    assert "stopped after epoch 2 (teacher.patience)" in r.stdout
    assert m["num_images"] == 600  # validation keeps its balanced size; only the training split is long-tailed
