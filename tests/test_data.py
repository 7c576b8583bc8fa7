"""Tests for distill.data: sources, splits, subsets, transforms and the torch dataset."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import (
    ImageDataset,
    Preprocess,
    Split,
    build_transform,
    idx,
    load_splits,
    load_unlabeled,
    stratified_indices,
)
from distill.errors import DistillError
from distill.recipe import DataConfig

HAVE_FASHION = idx._idx_folder(idx.FASHION_MNIST_DIR) is not None
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed in {idx.FASHION_MNIST_DIR}")

PRE = Preprocess(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), interpolation="bilinear")


def _no_download(monkeypatch):
    monkeypatch.setattr(idx, "download_fashion_mnist", lambda dest, timeout=10.0: "disabled in tests")


# --- fashion-mnist ------------------------------------------------------------
@pytest.fixture(scope="module")
def fashion():
    return load_splits(DataConfig(source="fashion-mnist"))


@needs_fashion
def test_fashion_mnist_given_split(fashion):
    train, val = fashion
    assert (len(train), len(val)) == (60000, 10000)
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot" and len(train.classes) == 10
    image = train.load(0)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 2]).all()  # grey replicated
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(val.labels).tolist() == [1000] * 10
    assert train.labels.dtype == np.int64
    assert train.describe(123) == "fashion-mnist:train:123" and val.describe(7) == "fashion-mnist:test:7"


@needs_fashion
def test_fashion_mnist_from_env_subfolder(tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").symlink_to(idx.FASHION_MNIST_DIR)
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path))
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    train, val = load_splits(DataConfig(subset=50))
    assert (len(train), len(val)) == (50, 50)


def test_fashion_mnist_missing_explicit_root(tmp_path):
    with pytest.raises(DistillError, match=r"^data\.root: .*nope does not exist"):
        load_splits(DataConfig(root=str(tmp_path / "nope")))
    with pytest.raises(DistillError, match=r"^data\.root: no Fashion-MNIST idx files"):
        load_splits(DataConfig(root=str(tmp_path)))


def test_fashion_mnist_not_found_anywhere(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("DISTILL_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "system")
    monkeypatch.setattr(idx, "CACHE_DIR", tmp_path / "cache")
    _no_download(monkeypatch)
    with pytest.raises(DistillError, match="apt-get install dataset-fashion-mnist") as e:
        load_splits(DataConfig())
    assert str(e.value).startswith("data.root:") and str(tmp_path / "env") in str(e.value)


def test_read_idx_plain_and_corrupt(tmp_path):
    raw = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    (tmp_path / "ok").write_bytes(raw + bytes(range(24)))
    assert idx.read_idx(tmp_path / "ok")[1, 2, 3] == 23
    (tmp_path / "short").write_bytes(raw + bytes(5))
    with pytest.raises(DistillError, match="short: truncated"):
        idx.read_idx(tmp_path / "short")


# --- digits and splits --------------------------------------------------------
def test_digits_default_split_is_stratified_and_deterministic(caplog):
    with caplog.at_level(logging.INFO, logger="distill.data"):
        train, val = load_splits(DataConfig(source="digits"))
    assert "no validation split" in caplog.text
    assert len(train) + len(val) == 1797
    assert len(val) == round(0.2 * 1797)
    assert not set(train.ids) & set(val.ids)
    counts = np.bincount(np.concatenate([train.labels, val.labels]))
    share = np.bincount(val.labels) / counts
    assert np.abs(share - 0.2).max() < 0.01
    image = train.load(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200

    again = load_splits(DataConfig(source="digits"))[1]
    assert (again.ids == val.ids).all()
    other = load_splits(DataConfig(source="digits", split_seed=1))[1]
    assert not (other.ids == val.ids).all()


def test_val_fraction_overrides_given_split():
    _, val = load_splits(DataConfig(source="digits", val_fraction=0.5))
    assert abs(len(val) - 1797 / 2) <= 1
    assert val.describe(0).startswith("digits:all:")


def test_subset_is_stratified_per_split():
    train, val = load_splits(DataConfig(source="digits", subset=100))
    assert len(train) == len(val) == 100
    assert np.bincount(train.labels, minlength=10).tolist() == [10] * 10
    assert np.bincount(val.labels, minlength=10).min() >= 9
    assert len(load_splits(DataConfig(source="digits", subset=5000))[0]) == 1797 - 359


def test_stratified_indices_edge_cases():
    labels = np.array([0] * 90 + [1] * 9 + [2])
    picked = stratified_indices(labels, 10, seed=0)
    assert len(picked) == 10 and (np.diff(picked) > 0).all()
    # proportional where possible, and the singleton class still shows up in a small subset
    assert np.bincount(labels[picked], minlength=3).tolist() == [8, 1, 1]
    assert (stratified_indices(labels, 10, seed=0) == picked).all()
    # a val split never takes a class's last image
    val = stratified_indices(labels, 50, seed=0, leave=1)
    assert 99 not in val and len(val) == 50
    assert len(stratified_indices(labels, 1000, seed=3)) == 100


def test_builtins_reject_folder_keys():
    with pytest.raises(DistillError, match=r"^data\.root: not used with data.source digits"):
        load_splits(DataConfig(source="digits", root="x"))
    with pytest.raises(DistillError, match=r"^data\.val_root: not used with data.source fashion-mnist"):
        load_splits(DataConfig(val_root="x"))


# --- imagefolder --------------------------------------------------------------
def _write(path: Path, mode: str, size=(12, 10), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    array = np.full((size[1], size[0], *channels), value, dtype=np.uint8)
    if mode == "RGB":
        array[..., 0] = 200  # red dominant, to check channel order
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    for cls in ("dog", "cat", "bird"):
        for i in range(5):
            _write(root / cls / f"{i}.png", "RGB")
    _write(root / "cat" / "grey.PNG", "L")
    _write(root / "bird" / "sub" / "alpha.png", "RGBA")
    (root / "bird" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_reads_classes_and_images(folder):
    train, val = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.2))
    assert train.classes == ["bird", "cat", "dog"]
    assert len(train) + len(val) == 17
    assert np.bincount(val.labels).tolist() == [1, 1, 1]
    split = Split(train.classes, [0, 1, 2], paths=[folder / "bird/sub/alpha.png", folder / "cat/grey.PNG",
                                                    folder / "dog/0.png"])
    for i in range(3):
        image = split.load(i)
        assert image.shape == (10, 12, 3) and image.dtype == np.uint8
    assert (split.load(1) == 100).all()
    assert split.load(2)[0, 0].tolist() == [200, 100, 100]
    assert split.describe(2) == str(folder / "dog/0.png")


def test_imagefolder_val_root(folder, tmp_path):
    val_root = tmp_path / "val"
    _write(val_root / "dog" / "a.jpg", "RGB")
    _write(val_root / "bird" / "b.bmp", "L")
    train, val = load_splits(DataConfig(source="imagefolder", root=str(folder), val_root=str(val_root)))
    assert len(train) == 17 and val.classes == train.classes
    assert sorted(val.labels.tolist()) == [0, 2]
    # val_fraction wins over a given val split
    _, val = load_splits(DataConfig(source="imagefolder", root=str(folder), val_root=str(val_root), val_fraction=0.2))
    assert len(val) == 3 and all(val.describe(i).startswith(str(folder)) for i in range(3))

    _write(val_root / "cow" / "c.png", "RGB")
    with pytest.raises(DistillError, match=r"^data\.val_root: class folder 'cow'"):
        load_splits(DataConfig(source="imagefolder", root=str(folder), val_root=str(val_root)))


def test_imagefolder_bad_roots(tmp_path):
    with pytest.raises(DistillError, match=r"^data\.root: .* does not exist"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "missing")))
    with pytest.raises(DistillError, match=r"^data\.root: .* has no class folders"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path)))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DistillError, match=r"^data\.root: class folder .*empty_class has no images"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path)))
    with pytest.raises(DistillError, match=r"^data\.root: required"):
        load_splits(DataConfig(source="imagefolder"))


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(DistillError, match="bad.png: cannot read image"):
        Split(["a"], [0], paths=[bad]).load(0)


# --- csv ----------------------------------------------------------------------
def _write_csv(path: Path, header: str, rows: list[str]):
    path.write_text("\n".join([header, *rows]) + "\n")


def test_csv_relative_paths_and_string_labels(tmp_path):
    for i in range(6):
        _write(tmp_path / "img" / f"{i}.png", "L" if i % 2 else "RGB")
    rows = [f"img/{i}.png,{'zebra' if i < 3 else 'ant'}" for i in range(6)]
    _write_csv(tmp_path / "train.csv", "file,kind", rows)
    _write_csv(tmp_path / "val.csv", "file,kind", [f"{tmp_path}/img/0.png,ant"])
    cfg = DataConfig(source="csv", root=str(tmp_path / "train.csv"), val_root=str(tmp_path / "val.csv"),
                     path_column="file", label_column="kind")
    train, val = load_splits(cfg)
    assert train.classes == ["ant", "zebra"]
    assert train.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert val.labels.tolist() == [0] and len(val) == 1
    assert train.load(1).shape == (10, 12, 3)
    assert train.describe(0) == str(tmp_path / "img" / "0.png")


def test_csv_int_labels_sort_numerically(tmp_path):
    for i in range(4):
        _write(tmp_path / f"{i}.png", "L")
    _write_csv(tmp_path / "t.csv", "path,label", ["0.png,10", "1.png,9", "2.png,10", "3.png,09"])
    train, _ = load_splits(DataConfig(source="csv", root=str(tmp_path / "t.csv"), val_fraction=0.5))
    assert train.classes == ["9", "10"]


def test_csv_errors(tmp_path):
    _write(tmp_path / "a.png", "L")
    _write_csv(tmp_path / "t.csv", "image,label", ["a.png,x"])
    with pytest.raises(DistillError, match=r"^data\.path_column: no column 'path' .*columns are: image, label"):
        load_splits(DataConfig(source="csv", root=str(tmp_path / "t.csv")))
    with pytest.raises(DistillError, match=r"^data\.label_column: no column 'y'"):
        load_splits(DataConfig(source="csv", root=str(tmp_path / "t.csv"), path_column="image", label_column="y"))

    _write_csv(tmp_path / "m.csv", "path,label", ["a.png,x", "gone.png,y", "gone2.png,y"])
    with pytest.raises(DistillError, match=r"m\.csv: line 3: image 'gone\.png' not found.*2 of 3 images"):
        load_splits(DataConfig(source="csv", root=str(tmp_path / "m.csv")))
    with pytest.raises(DistillError, match=r"^data\.root: .*nope\.csv does not exist"):
        load_splits(DataConfig(source="csv", root=str(tmp_path / "nope.csv")))

    _write_csv(tmp_path / "v.csv", "path,label", ["a.png,q"])
    _write_csv(tmp_path / "ok.csv", "path,label", ["a.png,x", "a.png,x"])
    with pytest.raises(DistillError, match=r"^data\.val_root: label 'q'"):
        load_splits(DataConfig(source="csv", root=str(tmp_path / "ok.csv"), val_root=str(tmp_path / "v.csv")))


# --- transforms ---------------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "eval"])
def test_default_transform_shape_and_dtype(stage):
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    out = build_transform(None, stage, PRE)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_transform_normalises_with_model_stats():
    out = build_transform(None, "eval", PRE)(np.full((28, 28), 153, dtype=np.uint8))  # grey → RGB
    expected = (0.6 - np.array(PRE.mean)) / np.array(PRE.std)
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(out.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_eval_transform_resizes_then_center_crops():
    # a 64x64 image with a 1-pixel border: resize to int(32 / 0.5) = 64 keeps it, crop 32 drops it
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[0, :] = image[-1, :] = image[:, 0] = image[:, -1] = 255
    pre = Preprocess(32, (0, 0, 0), (1, 1, 1), crop_pct=0.5)
    out = build_transform(None, "eval", pre)(image)
    assert out.shape == (3, 32, 32) and out.max() == 0


def test_placeholders_and_interpolation_names():
    specs = [{"name": "Resize", "height": "input_size", "width": "input_size", "interpolation": "nearest"},
             {"name": "RandomResizedCrop", "size": ["resize_size", "resize_size"]}]
    transform = build_transform(specs, "train", PRE, where="teacher.augment.train")
    resize, crop = transform.compose.transforms[:2]
    assert (resize.height, resize.width, resize.interpolation) == (32, 32, 0)
    assert crop.size == (36, 36) and crop.interpolation == 1  # int(32 / 0.875); PRE is bilinear
    assert transform(np.zeros((20, 20, 3), np.uint8)).shape == (3, 36, 36)


def test_default_interpolation_comes_from_the_model():
    transform = build_transform(None, "train", Preprocess(16, (0, 0, 0), (1, 1, 1), interpolation="area"))
    assert transform.compose.transforms[0].interpolation == 3  # cv2.INTER_AREA


@pytest.mark.parametrize("specs, message", [
    ([{"name": "Foo"}], r"^teacher\.augment\.train\.0\.name: no albumentations transform 'Foo'"),
    ([{"name": "HorizontalFlip"}, {"name": "Normalize"}], r"^teacher\.augment\.train\.1\.name: Normalize is appended"),
    ([{"name": "ToTensorV2"}], r"^teacher\.augment\.train\.0\.name: ToTensorV2 is appended"),
    ([{"name": "HorizontalFlip", "p": "often"}], r"^teacher\.augment\.train\.0\.p: HorizontalFlip: Input should be"),
    ([{"name": "Resize", "height": 8}], r"^teacher\.augment\.train\.0\.width: Resize: Field required"),
    ([{"name": "HorizontalFlip", "prob": 0.5}], r"^teacher\.augment\.train\.0: HorizontalFlip: .*'prob'"),
    ([{"p": 0.5}], r"^teacher\.augment\.train\.0: expected a mapping with 'name"),
    ([{"name": "RandomResizedCrp", "size": [8, 8]}], r"did you mean 'RandomResizedCrop'"),
])
def test_bad_specs_name_the_key(specs, message):
    with pytest.raises(DistillError, match=message):
        build_transform(specs, "train", PRE, where="teacher.augment.train")


def test_seeded_transform_repeats():
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    a = build_transform(None, "train", PRE, seed=5)
    b = build_transform(None, "train", PRE, seed=5)
    assert all(torch.equal(a(image), b(image)) for _ in range(3))


def test_seeded_transforms_decide_independently():
    """Albumentations' own seeding gives every transform the same seed, so two p=0.5 flips always agree; ours
    draws all decisions from one stream."""
    image = np.arange(4, dtype=np.uint8).reshape(2, 2)
    pre = Preprocess(2, (0.0,) * 3, (1 / 255,) * 3)  # identity normalisation: pixel values stay readable
    flips = build_transform([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], "train", pre)
    corners = []
    for i in range(400):
        flips.set_seed([0, 0, i])
        corners.append(int(flips(image)[0, 0, 0]))  # 0: none, 1: horizontal, 2: vertical, 3: both
    counts = np.bincount(corners, minlength=4)
    assert (counts > 60).all(), counts  # each of the four outcomes about 100 times; correlated: only 0 and 3


def test_training_augmentation_depends_on_seed_epoch_and_index_only():
    """Image i's augmentation in epoch e is the same whichever worker or process loads it, and in whatever order:
    results do not depend on num_workers, and a resumed run sees the images the interrupted one would have."""
    split = Split(["a"], np.zeros(8), images=np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    ds = ImageDataset(split, build_transform(None, "train", PRE), seed=3)
    forward = [ds[i][0] for i in range(8)]
    backward = [ds[i][0] for i in reversed(range(8))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    loaded = torch.cat([x for x, _ in DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(loaded, torch.stack(forward))
    ds.set_epoch(1)
    assert not any(torch.equal(ds[i][0], forward[i]) for i in range(8))


# --- unlabeled images ---------------------------------------------------------
def _unlabeled(**kwargs):
    cfg = DataConfig(**kwargs)
    train, val = load_splits(cfg)
    return train, val, load_unlabeled(cfg, train, val)


@needs_fashion
def test_unlabeled_rest_of_fashion_mnist():
    train, val, rest = _unlabeled(subset=500, unlabeled="rest")
    # val is the test split, so only train's rows are taken
    assert val.name == "fashion-mnist:test"
    assert len(rest) == 60000 - 500 and rest.name == "fashion-mnist:train"
    assert rest.labels.dtype == np.int64 and (rest.labels == -1).all()
    assert not set(rest.ids) & set(train.ids) and rest.classes == train.classes
    assert rest.describe(0) == f"fashion-mnist:train:{rest.ids[0]}"
    # its pixels are the source rows it names
    full, _ = load_splits(DataConfig())
    assert (rest.load(7) == full.load(rest.ids[7])).all()
    assert (rest.subset([3, 1]).labels == -1).all()


@needs_fashion
def test_unlabeled_rest_excludes_a_carved_val_split():
    train, val, rest = _unlabeled(subset=300, val_fraction=0.1, unlabeled="rest")
    assert val.name == rest.name == "fashion-mnist:train"
    assert len(train) + len(val) + len(rest) == 60000
    assert len(set(train.ids) | set(val.ids) | set(rest.ids)) == 60000


def test_unlabeled_rest_of_digits_and_nothing_left():
    train, val, rest = _unlabeled(source="digits", subset=100, unlabeled="rest")
    assert rest.name == "digits:all" and len(rest) == 1797 - 200 and (rest.labels == -1).all()
    assert not set(rest.ids) & (set(train.ids) | set(val.ids))
    with pytest.raises(DistillError, match=r"^data\.unlabeled: 'rest' is empty.*data\.subset"):
        _unlabeled(source="digits", unlabeled="rest")


def test_unlabeled_subset_is_seeded():
    cfg = DataConfig(source="digits", subset=100, unlabeled="rest", unlabeled_subset=1000)
    train, val = load_splits(cfg)
    picked = load_unlabeled(cfg, train, val)
    assert len(picked) == 1000 and (np.diff(picked.ids) > 0).all()
    assert (load_unlabeled(cfg, train, val).ids == picked.ids).all()
    other = DataConfig(source="digits", subset=100, unlabeled="rest", unlabeled_subset=1000, split_seed=1)
    train, val = load_splits(other)
    assert not (load_unlabeled(other, train, val).ids == picked.ids).all()
    # more than there are: all of them
    assert len(_unlabeled(source="digits", subset=100, unlabeled="rest", unlabeled_subset=5000)[2]) == 1597


def test_unlabeled_image_folder(tmp_path):
    images = tmp_path / "unlabeled"
    for name in ("b.png", "a/2.png", "a/deep/1.png", ".hidden/x.png", "a/._meta.png"):
        _write(images / name, "RGB")
    (images / "a" / "notes.txt").write_text("not an image")
    train, val, extra = _unlabeled(source="digits", unlabeled=str(images))
    assert [extra.describe(i) for i in range(len(extra))] == [str(images / n) for n in ("a/2.png", "a/deep/1.png",
                                                                                          "b.png")]
    assert (extra.labels == -1).all() and extra.classes == train.classes
    assert extra.load(2).shape == (10, 12, 3)

    cfg = DataConfig(source="digits", unlabeled=str(images), unlabeled_subset=2)
    picked = load_unlabeled(cfg, train, val)
    assert len(picked) == 2 and picked.paths == [extra.paths[i] for i in picked.ids]


def test_unlabeled_errors(folder, tmp_path):
    cfg = DataConfig(source="imagefolder", root=str(folder), unlabeled="rest")
    train, val = load_splits(cfg)
    with pytest.raises(DistillError, match=r"^data\.unlabeled: 'rest' .*give a folder of images"):
        load_unlabeled(cfg, train, val)
    with pytest.raises(DistillError, match=r"^data\.unlabeled: folder .*missing.* does not exist"):
        _unlabeled(source="digits", unlabeled=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match=r"^data\.unlabeled: no images"):
        _unlabeled(source="digits", unlabeled=str(tmp_path / "empty"))
    with pytest.raises(DistillError, match=r"^data\.unlabeled_subset: set without data\.unlabeled"):
        _unlabeled(source="digits", unlabeled_subset=10)
    assert _unlabeled(source="digits")[2] is None


def test_unlabeled_rows_are_never_stratified():
    with pytest.raises(ValueError, match="unlabeled"):
        stratified_indices(np.array([0, 1, -1]), 2, seed=0)


@needs_fashion
def test_idx_files_are_parsed_once():
    idx._parse_idx.cache_clear()
    _unlabeled(subset=10, unlabeled="rest")
    info = idx._parse_idx.cache_info()
    assert info.misses == 4 and info.hits >= 4


# --- the torch dataset --------------------------------------------------------
def test_image_dataset_with_dataloader_and_pickle():
    train, _ = load_splits(DataConfig(source="digits", subset=20))
    dataset = ImageDataset(train, build_transform(None, "eval", PRE))
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and label == train.labels[3]

    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[3][0], image)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=0)))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == train.labels[:8].tolist()


def test_subset_keeps_source_ids():
    split = Split(["a", "b"], [0, 1, 0, 1], images=np.zeros((4, 5, 5), np.uint8), name="toy:train")
    sub = split.subset([3, 1]).subset([1])
    assert sub.describe(0) == "toy:train:1" and sub.labels.tolist() == [1]
    assert sub.load(0).shape == (5, 5, 3)
