"""Losses and MixUp/CutMix: formulas checked against direct computations."""
import numpy as np
import torch
import torch.nn.functional as F

from distill.losses import smooth_one_hot, soft_cross_entropy
from distill.mix import mix_images, mix_targets, sample_mix
from distill.recipe import MixConfig


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
