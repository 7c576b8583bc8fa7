"""The seeds' remaining tricks: FMix, repeated augmentation, step / plateau lr schedules, hard-voting ensembles."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard
from timm.data.mixup import cutmix_bbox_and_lam
from timm.scheduler import CosineLRScheduler
from torch.utils.data import BatchSampler, Subset

from distill import store, training
from distill.data import ImageDataset, Preprocess, build_transform, load_splits
from distill.errors import DistillError
from distill.kd import student_loss
from distill.loaders import REPEAT_STREAM, EpochSampler, RepeatedViews, batch_rng, make_loader
from distill.losses import smooth_one_hot
from distill.mix import MixParams, fmix_mask, mix_images, mix_targets, rescale, sample_mix
from distill.models.ensemble import Ensemble, vote_log_probs
from distill.optim import DecayScheduler, make_scheduler
from distill.recipe import DataConfig, KDConfig, MixConfig, OptimConfig, TargetsConfig, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny-timm.yaml"
PRE16 = Preprocess(input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0)


@pytest.fixture(scope="module")
def digits():
    train, _ = load_splits(DataConfig(source="digits"))
    return train


def digit_batch(train, n=8, size=16) -> tuple[torch.Tensor, torch.Tensor]:
    """n real digits as a normalised batch at `size` px, with their labels."""
    pre = Preprocess(size, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    ds = ImageDataset(train.subset(np.arange(n)), build_transform(None, "eval", pre))
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


# --- FMix --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(16, 16), (28, 28), (15, 22)])
def test_the_fmix_mask_keeps_lambda_of_the_pixels(hw):
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.1, 0.37, 0.5, 0.93, 1.0):
        mask = fmix_mask(lam, hw, 3.0, rng)
        assert mask.dtype == torch.bool and mask.shape == hw
        assert mask.sum().item() == round(lam * hw[0] * hw[1])


def boundary(mask: torch.Tensor) -> int:
    """Neighbouring pixel pairs on different sides of the mask: low for a few smooth blobs."""
    return int((mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum())


def test_a_larger_decay_power_gives_smoother_masks():
    rng = np.random.default_rng(1)
    edges = {d: np.mean([boundary(fmix_mask(0.5, (32, 32), d, rng)) for _ in range(30)]) for d in (0.5, 1.5, 3.0)}
    assert edges[3.0] < edges[1.5] < edges[0.5]
    # white noise halved has about half its 2·32·31 neighbour pairs split; δ = 3 a few blobs' outlines
    assert edges[0.5] > 400 and edges[3.0] < 150


def test_fmix_mixes_real_images_and_their_targets_consistently(digits):
    x, y = digit_batch(digits)
    p = sample_mix(MixConfig(fmix_alpha=1.0), x.shape[-2:], batch_rng(0, 0, 0, 3))
    assert p.mask is not None and p.box is None and p.lam == pytest.approx(p.mask.float().mean().item())
    out = mix_images(x, p)
    own, other = p.mask.expand_as(x), ~p.mask.expand_as(x)
    assert torch.equal(out[own], x[own]) and torch.equal(out[other], x.flip(0)[other])
    # every sample keeps λ of its own pixels, and its target gives its own label λ, the partner's 1 - λ
    t = mix_targets(smooth_one_hot(y, 10), p)
    for i in range(len(y)):
        if y[i] != y.flip(0)[i]:
            assert t[i, y[i]].item() == pytest.approx(p.lam) and t[i, y.flip(0)[i]].item() == pytest.approx(1 - p.lam)
    parts = student_loss(torch.randn(len(y), 10), y, None, KDConfig(loss="none"), 1.0, 10, 0.0, p)
    assert torch.isfinite(parts["loss"])


def test_fmix_is_drawn_from_the_batch_generator_alone():
    cfg = MixConfig(fmix_alpha=1.0, fmix_decay_power=2.0)
    a, b = (sample_mix(cfg, (24, 24), batch_rng(3, 0, 2, 5)) for _ in range(2))
    assert a.lam == b.lam and torch.equal(a.mask, b.mask)
    np.random.seed(123)  # numpy's global generator plays no part
    c = sample_mix(cfg, (24, 24), batch_rng(3, 0, 2, 5))
    assert torch.equal(a.mask, c.mask)
    others = [sample_mix(cfg, (24, 24), batch_rng(3, 0, 2, i)).mask for i in range(6, 12)]
    assert not any(torch.equal(a.mask, m) for m in others)


def old_sample_mix(cfg, image_hw, rng):
    """sample_mix as it was before FMix (MixUp / CutMix only): the golden runs depend on its draws."""
    if not (cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)) or rng.random() >= cfg.prob:
        return None
    if cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < cfg.switch_prob):
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        np.random.seed(int(rng.integers(2**31)))
        box, lam = cutmix_bbox_and_lam((1, 1) + tuple(image_hw), lam, correct_lam=True)
        return MixParams(lam=float(lam), box=tuple(int(v) for v in box))
    return MixParams(lam=float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)))


@pytest.mark.parametrize("cfg", [MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0), MixConfig(mixup_alpha=0.4),
                                 MixConfig(cutmix_alpha=1.0, prob=0.6), MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0,
                                                                                  switch_prob=0.3)])
def test_without_fmix_the_draws_are_those_of_before(cfg):
    for batch in range(60):
        assert sample_mix(cfg, (28, 28), batch_rng(0, 0, 1, batch)) == old_sample_mix(cfg, (28, 28),
                                                                                        batch_rng(0, 0, 1, batch))


def mode_counts(cfg, n=3000) -> dict:
    counts = {"mixup": 0, "cutmix": 0, "fmix": 0}
    for b in range(n):
        p = sample_mix(cfg, (8, 8), batch_rng(1, 0, 0, b))
        counts["fmix" if p.mask is not None else "cutmix" if p.box is not None else "mixup"] += 1
    return counts


def test_switch_prob_leaves_mixup_for_a_region_mode_and_cutmix_and_fmix_share_it():
    c = mode_counts(MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, fmix_alpha=1.0, switch_prob=0.6))
    assert c["mixup"] == pytest.approx(1200, abs=120)
    assert c["cutmix"] == pytest.approx(900, abs=110) and c["fmix"] == pytest.approx(900, abs=110)
    c = mode_counts(MixConfig(mixup_alpha=0.4, fmix_alpha=1.0, switch_prob=0.25), 2000)
    assert c["cutmix"] == 0 and c["fmix"] == pytest.approx(500, abs=80)
    c = mode_counts(MixConfig(cutmix_alpha=1.0, fmix_alpha=1.0), 2000)
    assert c["mixup"] == 0 and c["fmix"] == pytest.approx(1000, abs=110)
    assert mode_counts(MixConfig(fmix_alpha=0.5), 50)["fmix"] == 50


def test_rescale_resizes_the_mask_nearest_neighbour_for_the_teacher():
    p = sample_mix(MixConfig(fmix_alpha=1.0), (16, 16), batch_rng(0, 0, 0, 1))
    big = rescale(p, (16, 16), (32, 32))
    assert big.mask.shape == (32, 32) and torch.equal(big.mask, p.mask.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert big.lam == pytest.approx(p.lam)
    odd = rescale(p, (16, 16), (24, 20))
    assert odd.mask.shape == (24, 20) and abs(odd.lam - p.lam) < 0.1
    assert rescale(p, (16, 16), (16, 16)) is p
    x = torch.rand(4, 3, 24, 20)
    assert torch.equal(mix_images(x, odd)[:, :, odd.mask], x[:, :, odd.mask])


def test_fmix_in_the_store_is_refused_at_load():
    with pytest.raises(DistillError, match=r"^targets\.mix\.fmix_alpha: .*students\.N\.mix"):
        load_recipe(TINY, ["targets.mix.fmix_alpha=1.0"])
    r = load_recipe(TINY, ["students=[{name: s, model: 'timm:resnet10t', mix: {fmix_alpha: 1.0}}]"])
    assert r.students[0].mix.fmix_alpha == 1.0 and r.students[0].mix.fmix_decay_power == 3.0


# --- repeated augmentation -------------------------------------------------------------------------------------
def test_the_repeated_sampler_yields_each_index_r_times_in_an_epoch_of_the_same_length():
    s = EpochSampler(50, seed=3, repeats=3, batch_size=5)
    s.set_epoch(2)
    pairs = list(s)
    assert len(pairs) == len(s) == 50
    idx = [i for i, _ in pairs]
    counts = np.bincount(idx, minlength=50)
    assert sorted(set(counts.tolist())) == [0, 2, 3] and (counts == 3).sum() == 16  # ⌈50/3⌉ = 17, the last twice
    for i in set(idx):
        assert sorted(r for j, r in pairs if j == i) == list(range(counts[i]))
    assert list(s) == pairs  # a function of (seed, epoch)
    s.set_epoch(3)
    assert list(s) != pairs
    # one process: a sample's copies sit side by side (the batch holds them together, as DeiT on one GPU)
    assert [i for i, _ in pairs[:6]] == [pairs[0][0]] * 3 + [pairs[3][0]] * 3
    plain = EpochSampler(50, seed=3)
    plain.set_epoch(2)
    assert [i for i, _ in pairs[::3]][:16] == list(plain)[:16]  # the same order, each image repeated


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_copies_of_a_sample_go_to_different_processes(world_size):
    """Through accelerate's own sharding of the loader's batches: DeiT's per-process lists, copy c of a sample at
    process (its position + c) mod W."""
    batch, n, repeats = 4, 120, world_size
    sampler = EpochSampler(n, seed=0, repeats=repeats, batch_size=batch, world_size=world_size)
    sampler.set_epoch(1)
    per_process = [[pair for b in BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), world_size, p)
                    for pair in b] for p in range(world_size)]
    assert sum(map(len, per_process)) == n // (batch * world_size) * batch * world_size
    where = {}
    for p, pairs in enumerate(per_process):
        for i, r in pairs:
            where.setdefault(i, []).append(p)
    assert all(sorted(ps) == list(range(world_size)) for ps in where.values() if len(ps) == repeats)
    deit = [(i, c) for i in np.random.default_rng([0, 1]).permutation(n)[:n // repeats] for c in range(repeats)]
    for p in range(world_size):
        assert per_process[p] == deit[p::world_size][:len(per_process[p])]


def test_repeated_views_augment_each_copy_apart_on_real_images(digits):
    pre = Preprocess(16, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    ds = ImageDataset(digits.subset(np.arange(40)), build_transform(None, "train", pre), seed=7)
    wrapped = RepeatedViews(Subset(ds, range(30)))
    ds.set_epoch(4)
    first, second, again = wrapped[(5, 0)][0], wrapped[(5, 1)][0], wrapped[(5, 1)][0]
    assert torch.equal(first, ds[5][0])  # copy 0 is the plain item
    assert not torch.equal(first, second) and torch.equal(second, again)  # copy 1 another draw, reproducible
    assert ds.epoch == 4 and len(wrapped) == 30
    loader = make_loader(ds, 8, SimpleNamespace(seed=7, data=SimpleNamespace(num_workers=0)), train=True, repeats=2)
    loader.sampler.set_epoch(4)
    x, y = next(iter(loader))
    assert torch.equal(y[0::2], y[1::2]) and not torch.equal(x[0], x[1])


def test_repeated_copies_replay_stored_views(digits, tmp_path):
    """A cached student's copies come from the store's views (rows drawn per copy; see the README for when two
    copies can meet on one view)."""
    samples = store.Samples(digits.subset(np.arange(12)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    store.export(model, PRE16, samples, digits.classes, TargetsConfig(views=8, shard_size=8, batch_size=4), 5,
                 tmp_path / "targets", Accelerator(cpu=True), {"sha256": "x"}, progress=False)
    reader = store.TargetStore(tmp_path / "targets")
    replay = store.ReplayDataset(reader, samples, PRE16, seed=1)
    wrapped = RepeatedViews(replay)
    views = []
    for i in range(12):
        replay.set_epoch(2)
        assert torch.equal(wrapped[(i, 0)][0], replay[i][0])
        for r in range(4):
            replay.set_epoch(2 + r * REPEAT_STREAM)
            views.append(replay.view_of(i))
            replay.set_epoch(2)
            # copy r replays the stored view its stream picks: the teacher's logits on that very view
            want = reader.rows(np.array([i]), np.array([views[-1]]))["logits"][0]
            assert np.allclose(wrapped[(i, r)][2]["logits"].numpy(), want)
    distinct = [len(set(views[k:k + 4])) for k in range(0, 48, 4)]
    assert np.mean(distinct) > 2.5  # 4 copies over 8 views: mostly different views (3.3 expected)


# --- learning-rate schedules -------------------------------------------------------------------------------------
def optimizer(lr_scales=(1.0,)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in lr_scales]
    return torch.optim.SGD(groups, lr=1.0, momentum=0.9)


def lrs(opt, sched, updates) -> list[list[float]]:
    out = []
    for t in range(updates):
        out.append([g["lr"] for g in opt.param_groups])  # the lr of update t + 1
        sched.step_update(t + 1)
    return out


def test_cosine_stays_the_default_schedule():
    opt = optimizer()
    sched = make_scheduler(opt, OptimConfig(warmup_epochs=1), 0.1, 40, 10)
    assert type(sched) is CosineLRScheduler and OptimConfig().schedule == "cosine"


def test_step_decay_after_the_warm_up_at_the_given_epochs():
    opt = optimizer((1.0, 0.5))
    sched = make_scheduler(opt, OptimConfig(schedule="step", step_epochs=[2, 3.5], step_gamma=0.1, warmup_epochs=1,
                                            min_lr=1e-4), 1.0, 50, 10)
    got = lrs(opt, sched, 50)
    assert got[0] == pytest.approx([1e-4, 0.5e-4])  # the warm-up starts at min_lr
    assert got[5][0] == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    want = [1.0] * 10 + [0.1] * 15 + [0.01] * 15  # epochs 1-2 at the peak, × 0.1 from epoch 2, again from 3.5
    assert [g[0] for g in got[10:]] == pytest.approx(want)
    assert [g[1] for g in got[10:]] == pytest.approx([0.5 * v for v in want])  # layer decay's lr_scale kept
    floor = make_scheduler(optimizer(), OptimConfig(schedule="step", step_every=1, step_gamma=0.1, min_lr=1e-3), 1.0,
                           50, 10)
    assert floor.milestones == [10, 20, 30, 40]
    opt = floor.optimizer
    assert [g[0] for g in lrs(opt, floor, 50)][::10] == pytest.approx([1.0, 0.1, 0.01, 1e-3, 1e-3])  # min_lr floor


def plateau(patience=2, warmup_epochs=0.0, gamma=0.5) -> DecayScheduler:
    cfg = OptimConfig(schedule="plateau", plateau_patience=patience, plateau_gamma=gamma, min_lr=0.0,
                      warmup_epochs=warmup_epochs)
    return make_scheduler(optimizer(), cfg, 1.0, 100, 10)


def test_plateau_decays_the_lr_when_the_metric_stalls():
    sched = plateau(patience=2)

    def lr():
        return sched.optimizer.param_groups[0]["lr"]

    for epoch, top1 in enumerate([0.5, 0.6, 0.6, 0.55], start=1):  # two evaluations without a better top1
        sched.step_update(epoch * 10)
        sched.step(epoch, top1)
    assert lr() == pytest.approx(0.5)
    sched.step_update(45)
    assert lr() == pytest.approx(0.5)  # the decay holds between evaluations
    sched.step(5, 0.7)  # better: the count starts again
    sched.step(6, 0.7)
    assert lr() == pytest.approx(0.5)
    sched.step(7, 0.69)
    assert lr() == pytest.approx(0.25) and sched.plateau == {"best": 0.7, "stale": 0, "decays": 2}


def test_plateau_ignores_evaluations_in_the_warm_up():
    sched = plateau(patience=1, warmup_epochs=2)
    sched.step(1, 0.5)  # ends in the warm-up (10 of 20 updates): not counted
    sched.step(2, 0.4)  # at its end: the first that counts, so the best so far
    assert sched.plateau == {"best": 0.4, "stale": 0, "decays": 0}
    sched.step_update(20)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    sched.step(3, 0.4)
    assert sched.plateau["decays"] == 1 and sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_plateau_on_nll_decays_when_the_loss_stops_falling():
    sched = plateau(patience=1)
    cfg = SimpleNamespace(select_by="nll")
    for epoch, nll in enumerate([1.0, 0.8, 0.7], start=1):
        training.schedule_after_eval(sched, {"nll": nll}, epoch - 1, cfg)
    assert sched.plateau["decays"] == 0 and sched.plateau["best"] == pytest.approx(-0.7)
    training.schedule_after_eval(sched, {"nll": 0.75}, 3, cfg)
    assert sched.plateau["decays"] == 1 and sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_the_plateau_state_survives_resume_with_the_optimizer(tmp_path):
    """accelerate's save_state / load_state (what Checkpoints does) carry the plateau state in the optimizer."""
    cfg = OptimConfig(schedule="plateau", plateau_patience=2, plateau_gamma=0.5, min_lr=0.0)

    def start():
        acc = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        opt = acc.prepare(torch.optim.SGD([{"params": model.parameters(), "lr_scale": 1.0}], lr=1.0))
        return acc, opt, make_scheduler(opt, cfg, 1.0, 100, 10)

    acc, opt, sched = start()
    for epoch, top1 in enumerate([0.5, 0.7, 0.7, 0.6, 0.6], start=1):  # one decay, then one stale evaluation
        sched.step(epoch, top1)
    acc.save_state(str(tmp_path / "state"))
    sched.step(6, 0.65)
    uninterrupted = opt.param_groups[0]["lr"]
    assert uninterrupted == pytest.approx(0.25)

    acc, opt, sched = start()
    assert opt.param_groups[0]["lr"] == 1.0 and sched.plateau["decays"] == 0
    acc.load_state(str(tmp_path / "state"))
    assert sched.plateau == {"best": 0.7, "stale": 1, "decays": 1} and opt.param_groups[0]["lr"] == 0.5
    sched.step(6, 0.65)
    assert opt.param_groups[0]["lr"] == uninterrupted


def test_schedule_keys_are_checked_at_load():
    with pytest.raises(DistillError, match=r"^teacher\.optim\.step_gamma: only teacher\.optim\.schedule step"):
        load_recipe(TINY, ["teacher.optim.step_gamma=0.5"])
    with pytest.raises(DistillError, match=r"^teacher\.optim\.step_epochs: .*either"):
        load_recipe(TINY, ["teacher.optim.schedule=step"])
    with pytest.raises(DistillError, match=r"^teacher\.optim\.step_epochs\.1: expected an epoch > 0"):
        load_recipe(TINY, ["teacher.optim.schedule=step", "teacher.optim.step_epochs=[2, 0]"])
    with pytest.raises(DistillError, match=r"^teacher\.optim\.schedule: expected one of"):
        load_recipe(TINY, ["teacher.optim.schedule=linear"])
    r = load_recipe(TINY, ["teacher.optim.schedule=plateau", "teacher.optim.plateau_patience=3"])
    assert r.teacher.optim.plateau_patience == 3


# --- hard voting ---------------------------------------------------------------------------------------------
def test_the_vote_tie_goes_to_the_larger_mean_probability():
    # three members, three classes; sample 0: one vote each, class 2 has the largest mean probability;
    # sample 1: two votes for class 0 beat class 1's larger mean probability
    outs = torch.log(torch.tensor([
        [[0.50, 0.10, 0.40], [0.50, 0.49, 0.01]],
        [[0.10, 0.50, 0.40], [0.50, 0.49, 0.01]],
        [[0.05, 0.40, 0.55], [0.00001, 0.99998, 0.00001]],
    ]))
    out = vote_log_probs(outs)
    assert out.argmax(-1).tolist() == [2, 0]
    assert torch.allclose(out.exp().sum(-1), torch.ones(2))
    mean = outs.softmax(-1).mean(0)
    votes = torch.tensor([[1.0, 1, 1], [2, 1, 0]])
    assert torch.allclose(out.exp(), (votes + 0.5 * mean) / 3.5, atol=1e-6)
    # a tie of votes and of mean probabilities: the lower index
    assert vote_log_probs(torch.log(torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]]))).argmax(-1).item() == 0


def test_the_vote_is_finite_for_confident_members():
    outs = torch.tensor([[[300.0, -300.0, 0.0]], [[-300.0, 300.0, 0.0]], [[300.0, 0.0, -300.0]]])
    out = vote_log_probs(outs)
    assert torch.isfinite(out).all() and out.argmax(-1).item() == 0
    assert out[0, 2] > -1000  # a class nobody voted for keeps its (tiny) share, no -inf


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_an_ensemble_votes():
    pre = Preprocess(8, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    members = [(Fixed([2.0, 0.0, 1.9]), pre), (Fixed([0.0, 2.0, 1.0]), pre), (Fixed([0.0, 1.0, 2.0]), pre)]
    x = torch.zeros(2, 3, 8, 8)
    assert Ensemble(members, pre, "vote")(x).argmax(-1).tolist() == [2, 2]
    assert Ensemble(members, pre, "probs")(x).shape == (2, 3)


def test_vote_is_refused_for_a_store_of_soft_targets():
    with pytest.raises(DistillError, match=r"^teacher\.ensemble_combine: vote .*targets\.export: false"):
        load_recipe(TINY, ["teacher.folds=2", "teacher.ensemble_combine=vote"])
    r = load_recipe(TINY, ["teacher.folds=2", "teacher.ensemble_combine=vote", "targets.export=false"])
    assert r.teacher.ensemble_combine == "vote"


# --- end to end ----------------------------------------------------------------------------------------------
ENV = {**{k: v for k, v in os.environ.items() if k != "DISTILL_STOP_AT"}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def teach(recipe: Path, *args, stop_at: str = "") -> subprocess.CompletedProcess:
    env = {**ENV, "DISTILL_STOP_AT": stop_at} if stop_at else ENV
    return subprocess.run([sys.executable, "-m", "distill.cli", "teach", str(recipe), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900, check=False)


def tiny(tmp: Path, teacher: dict, name="recipe.yaml") -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["subset"] = 200
    raw["teacher"].update(teacher)
    raw["targets"] = {"export": False}
    raw["log"] = {"progress": False, "every_steps": 1}
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_a_voting_fold_teacher_with_repeated_augmentation_and_fmix(tmp_path):
    recipe = tiny(tmp_path, {"epochs": 1, "folds": 2, "ensemble_combine": "vote", "repeated_aug": 2,
                             "mix": {"fmix_alpha": 1.0}})
    r = teach(recipe, f"output_dir={tmp_path / 'runs'}")
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = tmp_path / "runs" / "tiny-timm" / "teacher"
    info = json.loads((teacher / "model.json").read_text())
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert info["combine"] == "vote" and len(info["members"]) == 2
    assert 0 <= metrics["top1"] <= 1 and np.isfinite(metrics["nll"]) and len(metrics["members"]) == 2
    assert not (tmp_path / "runs" / "tiny-timm" / "targets").exists()


@pytest.mark.slow
def test_a_plateau_schedule_resumes_where_it_stopped(tmp_path):
    """A tiny lr keeps top1 flat, so the plateau decays at every evaluation after the first: a resumed run that
    lost the plateau state would train its last epochs at another lr, and end with other weights."""
    teacher = {"epochs": 4, "repeated_aug": 2,
               "optim": {"name": "sgd", "lr": 1.0e-4, "schedule": "plateau", "plateau_patience": 1}}
    recipe = tiny(tmp_path, teacher)
    whole = teach(recipe, f"output_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    history = json.loads((tmp_path / "whole" / "tiny-timm" / "teacher" / "metrics.json").read_text())["history"]
    assert history[1]["top1"] <= history[0]["top1"]  # the second evaluation decays the lr: the case under test
    steps = 200 // 64  # per epoch (the last partial batch dropped)
    killed = teach(recipe, f"output_dir={tmp_path / 'cut'}", stop_at=f"teacher:{2 * steps + 1}:SIGKILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = teach(recipe, f"output_dir={tmp_path / 'cut'}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "tiny-timm" / "teacher" / "last" / "model.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
