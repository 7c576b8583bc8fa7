"""data.source hf: Hugging Face datasets saved to disk, as image folders, as parquet, or by hub id (never fetched)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from distill.data import (
    DEFAULT_VAL_FRACTION,
    FASHION_MNIST_CLASSES,
    Split,
    hf,
    idx,
    load_splits,
    load_unlabeled,
    split_off,
    stratified_indices,
)
from distill.errors import DistillError
from distill.recipe import DataConfig, load_recipe
from distill.store import Samples, dataset_fingerprint

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.skipif(idx._idx_folder(idx.FASHION_MNIST_DIR) is None,
                                reason=f"Fashion-MNIST not installed in {idx.FASHION_MNIST_DIR}")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No test reaches the hub, and load_dataset's cache is the test's own folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def fashion():
    """60 training and 30 test Fashion-MNIST images (the source the hf datasets below are built from)."""
    return load_splits(DataConfig(source="fashion-mnist", subset=60))[0], \
        load_splits(DataConfig(source="fashion-mnist", subset=30))[1]


def to_dataset(split, labels=None, **extra):
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    columns = {"image": [split.images[i] for i in range(len(split))],
               "label": split.labels.tolist() if labels is None else labels}
    if labels is not None:
        features["label"] = datasets.Value("string" if isinstance(labels[0], str) else "int64")
    for name, values in extra.items():
        columns[name], features[name] = values, datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def save(path, **splits):
    found = datasets.DatasetDict(splits) if len(splits) > 1 else next(iter(splits.values()))
    shutil.rmtree(path, ignore_errors=True)
    found.save_to_disk(str(path))
    return str(path)


@pytest.fixture
def saved(tmp_path, fashion):
    return save(tmp_path / "fmnist", train=to_dataset(fashion[0]), test=to_dataset(fashion[1]))


def test_saved_dataset_gives_its_splits_classes_and_pixels(saved, fashion):
    train, val = load_splits(DataConfig(source="hf", root=saved))
    assert (len(train), len(val)) == (60, 30)  # val is the "test" split: there is no "validation"
    assert train.classes == FASHION_MNIST_CLASSES == val.classes
    assert np.array_equal(train.labels, fashion[0].labels) and np.array_equal(val.labels, fashion[1].labels)
    assert isinstance(train.images, hf.Images)  # decoded when loaded, not up front
    for i in (0, 17, 59):
        image = train.load(i)
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8
        assert np.array_equal(image, fashion[0].load(i))
    assert np.array_equal(val.load(5), fashion[1].load(5))
    assert train.name.startswith(f"hf:{saved}:train[60 rows, ") and val.name.startswith(f"hf:{saved}:test[30 rows")
    assert train.describe(3) == f"{train.name}:3"
    # subset, stratified, keeps the source rows as ids and the images with them
    small = load_splits(DataConfig(source="hf", root=saved, subset=20))[0]
    rows = stratified_indices(train.labels, 20, 0)
    assert np.array_equal(small.ids, rows) and np.array_equal(small.load(4), fashion[0].load(int(rows[4])))
    # loader workers get a pickled copy that reopens the Arrow files
    assert np.array_equal(pickle.loads(pickle.dumps(small)).load(4), small.load(4))


def test_split_names_and_a_held_out_validation_split(tmp_path, fashion):
    both = save(tmp_path / "both", train=to_dataset(fashion[0]), validation=to_dataset(fashion[1].subset(range(10))),
                test=to_dataset(fashion[1]))
    assert len(load_splits(DataConfig(source="hf", root=both))[1]) == 10  # "validation" before "test"
    train, val = load_splits(DataConfig(source="hf", root=both, train_split="test", val_split="train"))
    assert (len(train), len(val)) == (30, 60)
    # only a training split: the same stratified hold-out as every source without a validation split
    alone = save(tmp_path / "alone", train=to_dataset(fashion[0]))
    train, val = load_splits(DataConfig(source="hf", root=alone))
    expected = split_off(load_splits(DataConfig(source="hf", root=alone, val_split="train"))[1],
                         DEFAULT_VAL_FRACTION, 0)
    assert (len(train), len(val)) == (48, 12)
    assert np.array_equal(train.ids, expected[0].ids) and np.array_equal(val.ids, expected[1].ids)
    assert len(load_splits(DataConfig(source="hf", root=alone, val_fraction=0.5))[1]) == 30


def test_labels_without_classlabel_are_sorted_unique_values(tmp_path, fashion):
    numbers = [int(v) * 3 for v in fashion[0].labels]  # 0, 3, ..., 27: sorted as numbers, not text
    train, val = load_splits(DataConfig(source="hf", root=save(tmp_path / "ints", train=to_dataset(
        fashion[0], numbers)), val_fraction=0.25))
    assert train.classes == [str(3 * c) for c in range(10)]
    assert [train.classes[c] for c in train.labels] == [str(numbers[i]) for i in train.ids]
    names = [FASHION_MNIST_CLASSES[c] for c in fashion[0].labels]
    test_names = [FASHION_MNIST_CLASSES[c] for c in fashion[1].labels]
    train, val = load_splits(DataConfig(source="hf", root=save(
        tmp_path / "names", train=to_dataset(fashion[0], names), test=to_dataset(fashion[1], test_names))))
    assert train.classes == sorted(FASHION_MNIST_CLASSES)
    assert [val.classes[c] for c in val.labels] == test_names
    odd = save(tmp_path / "odd", train=to_dataset(fashion[0], names), test=to_dataset(fashion[1], ["Cat"] * 30))
    with pytest.raises(DistillError, match=r"^data\.label_column: label 'Cat' of .* is not a class of the training"):
        load_splits(DataConfig(source="hf", root=odd))


def test_the_store_fingerprint_follows_the_data(tmp_path, fashion):
    path = tmp_path / "fmnist"

    def fingerprint(**cfg):
        train = load_splits(DataConfig(source="hf", root=str(path), **cfg))[0]
        return dataset_fingerprint(Samples(train), train.classes)

    save(path, train=to_dataset(fashion[0]), test=to_dataset(fashion[1]))
    first = fingerprint()
    assert fingerprint() == first  # the same data again: the same rows
    changed = fashion[0].images.copy()
    changed[7, 0, 0] ^= 1  # one pixel of one row
    save(path, train=to_dataset(Split(fashion[0].classes, fashion[0].labels, images=changed)),
         test=to_dataset(fashion[1]))
    assert fingerprint() != first
    assert fingerprint() != fingerprint(train_split="test")


def test_imagefolder_and_parquet_datasets(tmp_path, fashion):
    folder = tmp_path / "pngs"
    for split, source in (("train", fashion[0]), ("test", fashion[1])):
        for i in range(len(source)):
            name = source.classes[source.labels[i]].replace("/", "-")
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.images[i]).save(folder / split / name / f"{i:03d}.png")
    train, val = load_splits(DataConfig(source="hf", root=str(folder)))
    assert (len(train), len(val)) == (60, 30)
    assert train.classes == sorted(c.replace("/", "-") for c in FASHION_MNIST_CLASSES)  # folder names
    by_pixels = {fashion[0].images[i].tobytes(): fashion[0].classes[fashion[0].labels[i]].replace("/", "-")
                 for i in range(60)}
    for i in (0, 31):
        assert train.classes[train.labels[i]] == by_pixels[train.load(i)[..., 0].tobytes()]

    parquet = tmp_path / "train.parquet"
    to_dataset(fashion[0]).to_parquet(str(parquet))
    train, val = load_splits(DataConfig(source="hf", root=str(parquet)))
    assert (len(train), len(val)) == (48, 12) and train.classes == FASHION_MNIST_CLASSES
    assert np.array_equal(train.load(2), fashion[0].load(int(train.ids[2])))


def test_group_column_keeps_a_group_on_one_side(tmp_path, fashion):
    people = [f"p{i % 12}" for i in range(60)]
    path = save(tmp_path / "groups", train=to_dataset(fashion[0], person=people))
    train, val = load_splits(DataConfig(source="hf", root=path, group_column="person", val_fraction=0.25))
    assert len(val) and not set(train.groups) & set(val.groups)


def test_unlabeled_rest_rows_are_the_unused_rows(saved, fashion):
    # hf's split ids are row positions, so 'rest' works as for the built-in sources
    cfg = DataConfig(source="hf", root=saved, subset=20, unlabeled="rest")
    train, val = load_splits(cfg)
    rest = load_unlabeled(cfg, train, val)
    assert len(rest) == 40 and not set(rest.ids) & set(train.ids) and (rest.labels == -1).all()
    assert np.array_equal(rest.load(0), fashion[0].load(int(rest.ids[0])))


def test_bad_input_is_one_error_line(tmp_path, fashion, saved):
    def error(**cfg):
        with pytest.raises(DistillError) as e:
            load_splits(DataConfig(source="hf", **cfg))
        return str(e.value)

    assert error(root=str(tmp_path / "nope")).startswith(f"data.root: {tmp_path / 'nope'} does not exist")
    assert error().startswith("data.root: required for data.source hf")
    assert error(root="").startswith("data.root: empty") and error(dataset=" ").startswith("data.dataset: empty")
    assert error(root=saved, dataset="a/b").startswith("data.dataset: data.source hf reads one dataset")
    assert error(root=saved, revision="v1").startswith("data.revision: only for a hub id")
    assert error(root=saved, val_root=saved).startswith("data.val_root: not used with data.source hf")
    message = error(root=saved, image_column="img")
    assert message.startswith("data.image_column: split 'train' of") and "image (Image), label (ClassLabel)" in message
    assert "its columns are: image (Image)" in error(root=saved, label_column="class")
    assert error(root=saved, image_column="label").startswith("data.image_column: column 'label' of")
    assert error(root=saved, train_split="training") == \
        f"data.train_split: {saved} has no split 'training'; its splits are: train, test"
    assert error(root=saved, val_split="val").startswith(
        f"data.val_split: {saved} has no split 'val'; its splits are: train, test")
    unlabeled = save(tmp_path / "unlabeled", train=to_dataset(fashion[0]),
                     test=to_dataset(fashion[1]).cast_column("label", datasets.Value("int64")).map(
                         lambda row: {"label": -1} if row["label"] == 3 else row).cast_column(
                         "label", datasets.ClassLabel(names=FASHION_MNIST_CLASSES)))
    assert error(root=unlabeled).startswith("data.label_column: 3 rows of split 'test'")
    (tmp_path / "empty").mkdir()
    assert error(root=str(tmp_path / "empty")).startswith(f"data.root: datasets cannot read {tmp_path / 'empty'}")
    # a hub id that is not in the cache, offline: no download, one line
    message = error(dataset="nobody-here/no-such-dataset", revision="v2")
    assert message.startswith("data.dataset: cannot load nobody-here/no-such-dataset@v2 (") and \
        "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message


def test_hf_keys_are_for_the_hf_source_only(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "teacher": {"model": "timm:resnet10t"}}))
    with pytest.raises(DistillError, match=r"^data\.image_column: only data\.source hf reads it"):
        load_recipe(str(path), ["data.image_column=img"])
    with pytest.raises(DistillError, match=r"^data\.group_column: only a csv or hf source"):
        load_recipe(str(path), ["data.group_column=person"])
    recipe = load_recipe(str(path), ["data.source=hf", "data.dataset=a/b", "data.revision=v1"])
    assert (recipe.data.dataset, recipe.data.revision, recipe.data.val_split) == ("a/b", "v1", None)


@pytest.mark.slow
def test_distill_run_on_a_saved_dataset_offline(tmp_path, fashion):
    splits = load_splits(DataConfig(source="fashion-mnist", subset=300))
    path = save(tmp_path / "fmnist", train=to_dataset(splits[0]), test=to_dataset(splits[1].subset(range(100))))
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    recipe["name"] = "hf"
    recipe["data"] = {"source": "hf", "root": path}
    recipe["teacher"].update(epochs=1, batch_size=32)
    recipe["targets"] = {"views": 2}
    recipe["students"] = [{"name": "s", "model": "timm:resnet10t", "resolution": 28, "epochs": 1, "batch_size": 32,
                           "optim": {"name": "sgd", "lr": 0.05}}]
    recipe["log"] = {"progress": False}
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["distill", "run", str(tmp_path / "hf.yaml"), f"output_dir={tmp_path}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "hf"
    for part in ("teacher", "students/s"):
        assert (run / part / "metrics.json").is_file(), part
    assert (run / "targets" / "manifest.json").is_file()
