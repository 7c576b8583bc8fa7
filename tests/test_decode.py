"""Scaled decoding (distill.data.decode, data.decode_scaled): a JPEG decoded at 1/2, 1/4 or 1/8 of its size when the
crops taken of it need no more, on real photos; what it picks, how close its views stay to a full decode's, and
what it leaves alone."""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from distill import store
from distill.data import ImageDataset, Preprocess, Split, build_transform, idx, load_splits
from distill.data.decode import need_for, rrc_fractions, transform_need
from distill.data.images import read_image
from distill.errors import DistillError
from distill.recipe import DataConfig, TargetsConfig
from distill.store.views import TeacherViews

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("photos", ROOT / "benchmarks" / "photos.py")
photos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(photos)

PRE = Preprocess(input_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
FULL = np.array([0.0, 0.0, 1.0, 1.0, 0.0], np.float32)  # the whole image, no flip
# The tolerance: views of real photos (the 1600x1200 astronaut and the benchmark's photo set, the store's default
# random views and center view) rendered from the scaled decode against the full decode, bicubic, in uint8 levels.
# Mean over views of the mean |difference| (measured: 5.0 / 3.5 / 1.2 at 64 / 112 / 224 px on the photo set). Most
# of it at small sizes is the full decode's own aliasing (a bicubic resize 10-20x down reads a few pixels of each
# output pixel's area; libjpeg's 1/8 decode averages them): at 64 px the scaled views are the closer ones to an
# anti-aliased (area) resize of the full decode. Single pixels (stars in the Hubble photo) differ by up to ~200.
MEAN_TOLERANCE = {64: 6.5, 112: 4.5, 224: 2.0}


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> str:
    """skimage's astronaut as a 1600 x 1200 JPEG, quality 90."""
    path = tmp_path_factory.mktemp("astronaut") / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((1600, 1200), Image.BICUBIC).save(path, quality=90)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 photos of the benchmark's photo set (3 of each of its 8 classes), 375 x 500 ... 1600 x 1200."""
    return photos.make_photos(tmp_path_factory.mktemp("photos"), count=24, seed=0)


def paths_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*/*.jpg"))


# --- what is decoded ----------------------------------------------------------
def test_need_for_picks_the_largest_reduction_that_keeps_each_crop_at_the_models_size(astronaut):
    assert read_image(astronaut).shape == (1200, 1600, 3)
    # a 224-px view of the whole image needs 224 x 224: 1/4 (400 x 300) keeps the shorter side above it
    assert need_for([FULL], 224, 1200, 1600) == (224, 224)
    assert read_image(astronaut, need=need_for([FULL], 224, 1200, 1600)).shape == (300, 400, 3)
    assert read_image(astronaut, need=need_for([FULL], 64, 1200, 1600)).shape == (150, 200, 3)  # 1/8
    assert read_image(astronaut, need=need_for([FULL], 112, 1200, 1600)).shape == (150, 200, 3)  # 1/8: 150 >= 112
    # a square 10%-area box (438 x 438 px): 224 px of it need the full 1200 rows
    side = np.sqrt(0.1 * 1200 * 1600)
    small = np.array([0.3, 0.3, 0.3 + side / 1200, 0.3 + side / 1600, 0.0], np.float32)
    need = need_for([small], 224, 1200, 1600)
    assert need == (818, 614) and read_image(astronaut, need=need).shape == (1200, 1600, 3)
    # the smallest box of several rows and the largest of several models' sizes count; capped at the image
    assert need_for([FULL, small], [64, 224], 1200, 1600) == need
    assert need_for([small], 2000, 1200, 1600) == (1600, 1200)
    half = np.array([0.0, 0.0, 0.5, 0.5, 1.0], np.float32)
    assert need_for(np.stack([FULL, half]), 100) == (200, 200)


def test_the_crop_stays_at_least_the_models_size_after_the_scaled_decode(folder):
    spec = TargetsConfig(views=8)
    for k, path in enumerate(paths_of(folder)):
        height, width = Image.open(path).size[::-1]
        for row in store.view_params(spec, 0, k, height, width):
            for size in (64, 112, 224):
                image = read_image(path, need=need_for([row], size, height, width))
                h, w = image.shape[:2]
                crop_h, crop_w = (row[2] - row[0]) * h, (row[3] - row[1]) * w
                # at least `size` pixels (less a rounding pixel), or the full image when the crop is smaller
                assert (h, w) == (height, width) or min(crop_h, crop_w) >= size - 1
                # and the largest reduction: one more halving (up to libjpeg's 1/8) would make it smaller
                reduction = round(width / w)
                assert reduction == 8 or min(crop_h, crop_w) / 2 < size + 1


def test_scaled_views_stay_within_the_tolerance_of_a_full_decode(astronaut, folder):
    spec = TargetsConfig(views=4)  # the store's default boxes: scale (0.25, 1), ratio (3/4, 4/3), and the center
    figures = {}
    for size in (64, 112, 224):
        means, worst, closer = [], 0, []
        for k, path in enumerate([astronaut] + paths_of(folder)):
            full = read_image(path)
            for row in store.view_params(spec, 0, k, *full.shape[:2]):
                scaled = read_image(path, need=need_for([row], size, *full.shape[:2]))
                a, b = (store.render(im, row, size, "bicubic").astype(np.int16) for im in (full, scaled))
                diff = np.abs(a - b)
                means.append(diff.mean())
                worst = max(worst, int(diff.max()))
                area = store.render(full, row, size, "area").astype(np.int16)
                closer.append((np.abs(b - area).mean(), np.abs(a - area).mean()))
        figures[size] = (float(np.mean(means)), worst)
        assert np.mean(means) <= MEAN_TOLERANCE[size], figures
        assert worst <= 255
        if size == 64:  # the full decode's aliasing: the scaled decode is nearer an anti-aliased resize
            scaled_err, full_err = np.mean(closer, axis=0)
            assert scaled_err < full_err, (scaled_err, full_err)
    print("mean |scaled - full| and max, by size:", figures)


def test_png_and_other_formats_decode_at_full_size(tmp_path):
    image = np.asarray(Image.fromarray(skimage.data.coffee()).resize((800, 600)))
    for ext in ("png", "bmp", "webp", "tiff"):
        path = tmp_path / f"coffee.{ext}"
        Image.fromarray(image).save(path)
        full = read_image(path)
        assert np.array_equal(read_image(path, need=(50, 50)), full) and full.shape == (600, 800, 3)


def test_the_pixel_limit_is_checked_on_the_full_size_before_a_scaled_decode(astronaut):
    with pytest.raises(DistillError, match="over data.max_image_pixels"):
        read_image(astronaut, max_pixels=1600 * 1200 - 1, need=(64, 64))


def test_in_memory_builtins_are_untouched():
    train, _ = load_splits(DataConfig(source="digits"))
    for i in range(5):
        assert np.array_equal(train.load(i, need=(1, 1)), train.load(i)) and train.size(i) == (8, 8)
    if idx._idx_folder(idx.FASHION_MNIST_DIR) is not None:
        fashion, _ = load_splits(DataConfig(source="fashion-mnist", subset=50))
        for i in range(5):
            assert np.array_equal(fashion.load(i, need=(1, 1)), fashion.load(i))


def test_decode_scaled_false_decodes_every_image_at_full_size(folder):
    scaled, _ = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25))
    full, _ = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25, decode_scaled=False))
    assert scaled.decode_scaled and not full.decode_scaled and not full.subset([0, 1]).decode_scaled
    i = int(np.argmax([np.prod(full.size(j)) for j in range(len(full))]))
    assert full.load(i, need=(64, 64)).shape[:2] == full.size(i)
    assert scaled.load(i, need=(64, 64)).shape[0] == -(-full.size(i)[0] // 8)  # the largest photo at 1/8


# --- the stages' data paths ---------------------------------------------------
class Spy:
    """Records the `need` of every load of a split."""

    def __init__(self, split: Split):
        self.needs, load = [], split.load

        def spy(i, need=None):
            self.needs.append(need)
            return load(i, need)
        split.load = spy


def photo_split(folder: Path, scaled: bool = True) -> Split:
    split, _ = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25,
                                      decode_scaled=scaled))
    return split


def test_eval_transform_decodes_to_its_resize_target(folder):
    eval_tf = build_transform(None, "eval", PRE)
    assert transform_need(eval_tf) == (73, 73)  # SmallestMaxSize to int(64 / 0.875)
    split, full = photo_split(folder), photo_split(folder, scaled=False)
    spy = Spy(split)
    ds, ds_full = ImageDataset(split, eval_tf), ImageDataset(full, eval_tf)
    diffs = []
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 64, 64) and label == ds_full[i][1]
        diffs.append((x - ds_full[i][0]).abs().mean().item() * 255 * 0.226)  # back to uint8 levels (about)
    print(f"eval path: mean |scaled - full| {np.mean(diffs):.2f} levels")
    assert set(spy.needs) == {(73, 73)} and np.mean(diffs) < MEAN_TOLERANCE[64], np.mean(diffs)
    # a transform that starts with a pixel-sized step sees the full image
    assert transform_need(build_transform([{"name": "CenterCrop", "height": 64, "width": 64}], "eval", PRE)) is None


def test_train_transform_decodes_to_its_smallest_random_crop(folder):
    train_tf = build_transform(None, "train", PRE, seed=0)
    need = transform_need(train_tf)
    pickle.loads(pickle.dumps(need))  # loader workers
    # RandomResizedCrop scale (0.25, 1), ratio (3/4, 4/3) on 1600 x 1200: the smallest box is 0.375 x 0.5
    assert rrc_fractions((0.25, 1.0), (3 / 4, 4 / 3), 1200, 1600) == pytest.approx((0.5, 0.375))
    assert need(1200, 1600) == (171, 128)
    split = photo_split(folder)
    spy = Spy(split)
    ds = ImageDataset(split, train_tf, seed=0)
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 64, 64)
    assert all(n == need(*split.size(i)) for i, n in enumerate(spy.needs))
    rng = np.random.default_rng(0)  # every box the transform draws keeps at least 64 px on each side
    for _ in range(2000):
        s, a = rng.uniform(0.25, 1), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = np.sqrt(s * 1200 * 1600 * a), np.sqrt(s * 1200 * 1600 / a)
        if w <= 1600 and h <= 1200:
            assert w / 1600 * 171 >= 64 - 1e-6 and h / 1200 * 128 >= 64 - 1e-6


def test_teacher_views_draw_the_same_boxes_and_decode_once_for_all_views(folder):
    spec = TargetsConfig(views=4)
    split, full = photo_split(folder), photo_split(folder, scaled=False)
    spy = Spy(split)
    scaled_views = TeacherViews(store.Samples(split), spec, 0, PRE, 0, len(split))
    full_views = TeacherViews(store.Samples(full), spec, 0, PRE, 0, len(full))
    diffs = []
    for i in range(len(split)):
        x, params, *_ = scaled_views[i]
        x_full, params_full, *_ = full_views[i]
        assert torch.equal(params, params_full)  # the stored boxes are exactly the full decode's
        assert torch.equal(params, torch.from_numpy(store.view_params(spec, 0, i, *read_image(full.paths[i]).shape[:2])))
        assert spy.needs[-1] == need_for(params.numpy(), 64, *split.size(i))  # one decode, all V + 1 views
        diffs.append((x - x_full).abs().mean().item() * 255 * 0.226)
    assert len(spy.needs) == len(split) and np.mean(diffs) < MEAN_TOLERANCE[64], np.mean(diffs)


def test_replay_decodes_what_the_rows_view_needs_at_the_students_and_teachers_size(folder, tmp_path):
    split, full = photo_split(folder), photo_split(folder, scaled=False)
    spy = Spy(split)
    samples = store.Samples(split)
    reader = photos.tiny_store(tmp_path / "targets", samples, TargetsConfig(views=4))
    teacher = Preprocess(input_size=112, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = store.ReplayDataset(reader, samples, PRE, seed=0, teacher_pre=teacher)
    ds_full = store.ReplayDataset(reader, store.Samples(full), PRE, seed=0, teacher_pre=teacher)
    diffs = []
    for i in range(len(ds)):
        x, _, _, t_x = ds[i]
        x_full, _, _, t_full = ds_full[i]
        row = reader.row(i, ds.view_of(i))
        assert spy.needs[-1] == need_for([row["params"]], 112)  # the larger of the two models
        assert x.shape == (3, 64, 64) and t_x.shape == (3, 112, 112)
        diffs.append([(x - x_full).abs().mean().item() * 255 * 0.226, (t_x - t_full).abs().mean().item() * 255 * 0.5])
    student, online = np.mean(diffs, axis=0)
    assert student < MEAN_TOLERANCE[64] and online < MEAN_TOLERANCE[112], (student, online)


def test_make_photos_is_deterministic_and_kept(tmp_path, folder):
    again = photos.make_photos(tmp_path / "again", count=24, seed=0)
    names = paths_of(folder)
    assert len(names) == 24 and len({Path(p).parent.name for p in names}) == 8
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(names, paths_of(again)))
    sizes = {Image.open(p).size for p in names}
    assert len(sizes) > 3 and all(min(s) >= 375 and max(s) <= 1600 for s in sizes)
    before = (again / "astronaut" / "00000.jpg").stat().st_mtime_ns
    photos.make_photos(again, count=24, seed=0)  # the marker says it is there: nothing rewritten
    assert (again / "astronaut" / "00000.jpg").stat().st_mtime_ns == before
    assert cv2.imread(names[0]) is not None
