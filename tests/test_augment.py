"""targets.augment: per-view augmentation drawn from a stored seed and replayed exactly by every model, at any size."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from distill import store
from distill.data import Preprocess, load_splits
from distill.errors import DistillError
from distill.recipe import DataConfig, TargetsConfig, load_recipe
from distill.store import augment as aug
from distill.store.views import TeacherViews, view_seeds

RECIPE = "recipes/tiny-vit.yaml"
# every replayable transform, always applied (p: 1), with parameters that change the image visibly
SPECS = {
    "Rotate": {"name": "Rotate", "limit": 30, "p": 1.0},
    "Affine": {"name": "Affine", "rotate": [-20, 20], "scale": [0.8, 1.2], "translate_percent": [-0.1, 0.1], "p": 1.0},
    "ColorJitter": {"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1,
                    "p": 1.0},
    "RandomBrightnessContrast": {"name": "RandomBrightnessContrast", "brightness_limit": 0.3, "contrast_limit": 0.3,
                                 "p": 1.0},
    "HueSaturationValue": {"name": "HueSaturationValue", "p": 1.0},
    "ToGray": {"name": "ToGray", "p": 1.0},
    "GaussianBlur": {"name": "GaussianBlur", "sigma_frac": [0.01, 0.04], "p": 1.0},
    "CoarseDropout": {"name": "CoarseDropout", "num_holes_range": [1, 3], "hole_height_range": [0.1, 0.3],
                      "hole_width_range": [0.1, 0.3], "fill": [255, 0, 0], "p": 1.0},
    "Erasing": {"name": "Erasing", "scale": [0.05, 0.2], "fill": 128, "p": 1.0},
}
PRE32 = Preprocess(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic", crop_pct=1.0)


def test_every_replayable_transform_is_tested():
    assert set(SPECS) == set(aug.REPLAYABLE)


def smooth_image(seed: int, h: int = 96, w: int = 80) -> np.ndarray:
    """A colour image without pixel-level detail (blobs of colour): resizing it loses little."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


class FakeSamples:
    def __init__(self, n):
        self.images = [smooth_image(i) for i in range(n)]
        self.labels = np.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def load(self, i, need=None):
        return self.images[i]

    def scalable(self, i):  # in memory: nothing to decode at a smaller scale
        return False


class FakeStore:
    """What ReplayDataset reads of a store: the manifest's view spec, and per row its params and seed."""

    mixed = False

    def __init__(self, spec, seed, samples):
        self.spec, self.seed, self.samples, self.views = spec, seed, samples, spec.views
        self.manifest = {"view_spec": store.view_spec(spec, seed), "center_view": spec.views}

    def __len__(self):
        return len(self.samples)

    def row(self, i, v, temperature=1.0, standardized=False):
        image = self.samples.load(i)
        return {"params": store.view_params(self.spec, self.seed, i, *image.shape[:2])[v],
                "seed": view_seeds(self.spec, self.seed, i)[v], "label": self.samples.labels[i],
                "logits": np.zeros(3, np.float32), "logit_mean": np.float32(0), "logit_std": np.float32(1)}


@pytest.mark.parametrize("name", list(SPECS))
def test_teacher_and_student_render_the_same_view(name):
    spec, samples = TargetsConfig(views=3, augment=[SPECS[name]]), FakeSamples(4)
    teacher = TeacherViews(samples, spec, 7, PRE32, 0, len(samples))
    student = store.ReplayDataset(FakeStore(spec, 7, samples), samples, PRE32, teacher_pre=PRE32)
    plain = TeacherViews(samples, TargetsConfig(views=3), 7, PRE32, 0, len(samples))
    changed = 0
    for i in range(len(samples)):
        x, _, seeds, *_ = teacher[i]
        assert seeds[-1] == aug.NO_AUGMENT and (seeds[:-1] >= 0).all()  # the center view is never augmented
        changed += int(not torch.equal(x[:-1], plain[i][0][:-1]))
        assert torch.equal(x[-1], plain[i][0][-1])
        for v in range(spec.views + 1):
            student.view_of = lambda i, v=v: v
            s_x, _, _, t_x = student[i]
            assert torch.equal(s_x, x[v]) and torch.equal(t_x, x[v])  # pixel-identical, student and online teacher
    assert changed == len(samples)  # the augmentation did something


@pytest.mark.parametrize("name", list(SPECS))
def test_a_view_agrees_across_resolutions(name):
    """Rendered at 64 and at 32 px, then brought to 32 px: they differ by interpolation only."""
    specs = aug.check_augment([SPECS[name]])
    spec = TargetsConfig(views=4, augment=[SPECS[name]])
    diffs, base = [], []
    for i in range(6):
        image = smooth_image(i)
        params = store.view_params(spec, 0, i, *image.shape[:2])
        for p, seed in zip(params[:-1], view_seeds(spec, 0, i)[:-1]):
            small = store.render(image, p, 32, "bicubic")
            big = cv2.resize(store.render(image, p, 64, "bicubic"), (32, 32), interpolation=cv2.INTER_AREA)
            base.append(np.abs(small.astype(float) - big).mean())  # interpolation alone, no augmentation
            small, big = aug.augment(small, specs, seed), aug.augment(store.render(image, p, 64, "bicubic"), specs,
                                                                      seed)
            big = cv2.resize(big, (32, 32), interpolation=cv2.INTER_AREA)
            diffs.append(np.abs(small.astype(float) - big).mean())
    # mean absolute difference on 0..255: within 2 levels of the interpolation error without augmentation
    # (hole edges and rotated borders fall on whole pixels at each size)
    print(f"{name}: mean abs difference {np.mean(diffs):.2f} (interpolation alone {np.mean(base):.2f}), "
          f"largest {max(diffs):.2f}")
    assert np.mean(diffs) < np.mean(base) + 2.0, (np.mean(diffs), np.mean(base))
    assert max(diffs) < 8.0


def test_the_same_seed_draws_the_same_parameters_in_any_process():
    specs = aug.check_augment(list(SPECS.values()))
    seed = aug.view_seed(3, 17, 2)
    code = ("import json; from distill.store import augment as a; "
            f"print(json.dumps(a.draw(a.check_augment({list(SPECS.values())!r}), a.view_seed(3, 17, 2))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(json.dumps(aug.draw(specs, seed)))


def test_views_get_different_parameters():
    specs = aug.check_augment([SPECS["Rotate"], SPECS["GaussianBlur"]])
    seeds = {aug.view_seed(0, i, v) for i in range(50) for v in range(4)}
    assert len(seeds) == 200
    angles = {aug.draw(specs, s)[0][1]["angle"] for s in seeds}
    assert len(angles) == 200
    assert aug.view_seed(0, 1, 2) != aug.view_seed(1, 1, 2)  # the targets seed counts


def test_p_skips_a_transform_without_shifting_the_others():
    rotate = {"name": "Rotate", "limit": 30, "p": 0.5}
    on, off = aug.check_augment([{**rotate, "p": 1.0}, SPECS["Erasing"]]), aug.check_augment([rotate, SPECS["Erasing"]])
    applied = [aug.draw(off, aug.view_seed(0, i, 0))[0] is not None for i in range(400)]
    assert 0.4 < np.mean(applied) < 0.6
    for i in range(20):
        assert aug.draw(on, aug.view_seed(0, i, 0))[1] == aug.draw(off, aug.view_seed(0, i, 0))[1]


def test_no_augment_renders_exactly_as_before():
    spec, samples = TargetsConfig(views=3), FakeSamples(3)
    assert spec.augment == [] and "augment" not in store.view_spec(spec, 0)
    assert store.view_spec(spec, 0) == {"sampler": "rrc-flip-v1", "columns": list(store.PARAM_COLUMNS), "views": 3,
                                        "seed": 0, "scale": [0.25, 1.0], "ratio": [3 / 4, 4 / 3], "hflip": 0.5,
                                        "center_crop_pct": 1.0}
    teacher = TeacherViews(samples, spec, 0, PRE32, 0, len(samples))
    for i in range(len(samples)):
        x, _, seeds, *_ = teacher[i]
        image = samples.load(i)
        # today's path: the crop box and flip rendered, normalised
        want = np.stack([store.render(image, p, 32, "bicubic") for p in store.view_params(spec, 0, i, 96, 80)])
        assert torch.equal(x, store.to_tensor(want, PRE32)) and (seeds == aug.NO_AUGMENT).all()
    image = smooth_image(0)
    assert aug.augment(image, aug.check_augment([SPECS["Rotate"]]), aug.NO_AUGMENT) is image


def test_the_augment_list_is_part_of_the_view_spec():
    a = store.view_spec(TargetsConfig(augment=[SPECS["Rotate"]]), 0)
    b = store.view_spec(TargetsConfig(augment=[{**SPECS["Rotate"], "limit": 10}]), 0)
    assert a["augment"] == [{"name": "Rotate", "p": 1.0, "limit": 30, "fill": 0}] and a["seed_column"] == "seed"
    assert store.fingerprint("t", "d", a, {}, 1) != store.fingerprint("t", "d", b, {}, 1)


@pytest.mark.parametrize("override, match", [
    ("[{name: Sharpen}]", r"targets\.augment\.0\.name: 'Sharpen' cannot be replayed .*replayable transforms: Rotate"),
    ("[{name: ToGray}, {name: GaussianBlur, blur_limit: 5}]",
     r"targets\.augment\.1\.blur_limit: GaussianBlur: sizes in pixels .*sigma_frac.*replayable transforms: Rotate"),
    ("[{name: CoarseDropout, hole_height_range: [4, 8]}]", r"targets\.augment\.0\.hole_height_range: .* in pixels"),
    ("[{name: Affine, translate_px: 3}]", r"targets\.augment\.0\.translate_px: .*translate_percent"),
    ("[{name: Rotate, interpolation: 1}]", r"targets\.augment\.0\.interpolation: Rotate: not a replayable parameter"),
    ("[{name: Rotate, p: 1.5}]", r"targets\.augment\.0\.p: Rotate: expected a number in \[0, 1\]"),
])
def test_a_transform_that_cannot_be_replayed_is_refused_at_load(override, match):
    with pytest.raises(DistillError, match=match) as e:
        load_recipe(RECIPE, [f"targets.augment={override}"])
    assert "\n" not in str(e.value)


def test_export_and_replay_on_digits(tmp_path):
    """A real export with targets.augment: the store keeps a seed per row and the student replays the views."""
    from accelerate import Accelerator

    train, _ = load_splits(DataConfig(source="digits"))
    samples = store.Samples(train.subset(np.arange(24)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, len(train.classes)))
    pre = Preprocess(input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=1.0)
    spec = TargetsConfig(views=2, shard_size=10, batch_size=4, augment=[SPECS["Rotate"], SPECS["CoarseDropout"]])
    out = tmp_path / "targets"
    store.export(model, pre, samples, train.classes, spec, 5, out, Accelerator(cpu=True), {"sha256": "x"},
                 progress=False)
    reader = store.TargetStore(out)
    assert reader.manifest["view_spec"]["augment"][0]["name"] == "Rotate"
    rows = reader.rows(np.repeat(np.arange(24), 3), np.tile(np.arange(3), 24))
    assert (rows["seed"].reshape(24, 3)[:, -1] == aug.NO_AUGMENT).all()
    assert np.array_equal(rows["seed"].reshape(24, 3), np.stack([view_seeds(spec, 5, i) for i in range(24)]))
    per_view = store.bytes_per_view(reader.manifest["logits"], len(train.classes), augmented=True)
    assert (out / "shard-00000.safetensors").stat().st_size >= 10 * 3 * per_view
    ds = store.ReplayDataset(reader, samples, pre, seed=0)
    for i in range(0, 24, 5):
        row = reader.row(i, ds.view_of(i))
        x, label, *_ = ds[i]
        with torch.no_grad():
            z = model(x[None])[0]
        # the student's input at the teacher's size is the teacher's very view: the stored logits are its output
        assert torch.allclose(z, torch.from_numpy(row["logits"]), atol=2e-2) and label == int(train.labels[i])
    # another augment list is another view spec: the store is refused until rebuilt
    other = TargetsConfig(views=2, shard_size=10, batch_size=4, augment=[SPECS["Rotate"]])
    with pytest.raises(DistillError, match="another view spec"):
        store.export(model, pre, samples, train.classes, other, 5, out, Accelerator(cpu=True), {"sha256": "x"},
                     progress=False)
    # without targets.augment the shards hold no seed column and rows read -1
    plain = tmp_path / "plain"
    store.export(model, pre, samples, train.classes, TargetsConfig(views=2, shard_size=10, batch_size=4), 5, plain,
                 Accelerator(cpu=True), {"sha256": "x"}, progress=False)
    from safetensors import safe_open
    with safe_open(str(plain / "shard-00000.safetensors"), "np") as f:
        keys = list(f.keys())
    assert "seed" not in keys
    assert (store.TargetStore(plain).rows(np.arange(24), np.zeros(24, np.int64))["seed"] == aug.NO_AUGMENT).all()
