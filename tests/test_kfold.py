"""k-fold teachers with groups, out-of-fold predictions, and teacher ensembles (folds and models trained elsewhere)."""
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_metrics_contract
from PIL import Image
from safetensors.torch import load_file

from distill.data import Preprocess, Split, fold_ids, load_splits, split_by_group
from distill.models import Ensemble, load_model
from distill.recipe import DataConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def grouped_split(n_groups=30, per_group=4, classes=3):
    labels = np.repeat(np.arange(n_groups) % classes, per_group)  # a group's images share its class
    groups = np.repeat([f"person-{g}" for g in range(n_groups)], per_group)
    return Split([str(c) for c in range(classes)], labels, images=np.zeros((len(labels), 4, 4), np.uint8),
                 groups=groups)


def test_folds_are_stratified_and_keep_groups_whole():
    split = grouped_split()
    folds = fold_ids(split, 3, seed=0)
    assert sorted(set(folds)) == [0, 1, 2]
    for g in set(split.groups):
        assert len(set(folds[split.groups == g])) == 1  # a person's images never straddle two folds
    for f in range(3):
        assert np.bincount(split.labels[folds == f], minlength=3).min() >= 2  # every class in every fold
    plain = Split(["a", "b"], np.arange(40) % 2, images=np.zeros((40, 4, 4), np.uint8))
    counts = [np.bincount(plain.labels[fold_ids(plain, 4, seed=1) == f]) for f in range(4)]
    assert all(c.tolist() == [5, 5] for c in counts)
    assert np.array_equal(fold_ids(split, 3, seed=0), folds)


def test_a_validation_fraction_with_groups_splits_whole_groups():
    train, val = split_by_group(grouped_split(), 0.25, seed=0, key="data.val_fraction")
    assert not set(train.groups) & set(val.groups)
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.35


def test_ensemble_averages_probabilities_and_feeds_each_member_its_own_input():
    class Fixed(torch.nn.Module):
        def __init__(self, logits, size):
            super().__init__()
            self.logits, self.size = torch.tensor(logits), size

        def forward(self, x):
            assert x.shape[-1] == self.size  # resized for this member
            return self.logits.expand(len(x), -1)

    pre = Preprocess(32, (0.5,) * 3, (0.25,) * 3)
    small = Preprocess(16, (0.0,) * 3, (1.0,) * 3)
    a, b = [2.0, 0.0, -1.0], [0.0, 1.0, 0.0]
    out = Ensemble([(Fixed(a, 32), pre), (Fixed(b, 16), small)], pre, "probs")(torch.zeros(2, 3, 32, 32))
    expected = (torch.softmax(torch.tensor(a), -1) + torch.softmax(torch.tensor(b), -1)) / 2
    assert torch.allclose(out.exp(), expected.expand(2, -1), atol=1e-6)
    mean_logits = Ensemble([(Fixed(a, 32), pre), (Fixed(b, 16), small)], pre, "logits")(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(mean_logits, (torch.tensor(a) + torch.tensor(b))[None] / 2)


@pytest.fixture(scope="module")
def grouped_csv(tmp_path_factory) -> Path:
    """240 Fashion-MNIST images of 3 classes as PNG files, in groups of 4 (a "person" per group)."""
    out = tmp_path_factory.mktemp("grouped")
    train, _ = load_splits(DataConfig(source="fashion-mnist", subset=1200))
    rows = []
    for c in (1, 7, 8):  # Trouser, Sneaker, Bag: easy to tell apart in one epoch
        for j, i in enumerate(np.flatnonzero(train.labels == c)[:80]):
            name = f"img-{c}-{j}.png"
            Image.fromarray(train.load(i)).save(out / name)
            rows.append({"path": name, "label": train.classes[c], "person": f"p{c}-{j // 4}"})
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "person"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "train.csv"


@pytest.mark.slow
def test_kfold_teachers_with_groups_write_oof_and_an_ensemble_teacher_a_student_learns_from(grouped_csv, tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    recipe["data"] = {"source": "csv", "root": str(grouped_csv), "val_fraction": 0.25, "group_column": "person"}
    recipe["teacher"].update(epochs=1, folds=3, batch_size=32)
    recipe["targets"] = {"views": 1, "oof": True}
    recipe["students"] = [{"name": "s", "model": "timm:resnet10t", "resolution": 28, "epochs": 1, "batch_size": 32}]
    recipe["log"] = {"progress": False}
    path = tmp_path / "kfold.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = subprocess.run(["distill", "run", str(path), f"output_dir={tmp_path}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = tmp_path / "tiny-timm" / "teacher"
    m = assert_metrics_contract(teacher)  # the ensemble's record has every key a single teacher's has
    assert m["train_images_per_sec"] == pytest.approx(np.mean(
        [json.loads((teacher / f"fold-{f}" / "metrics.json").read_text())["train_images_per_sec"] for f in range(3)]))
    assert [x["name"] for x in m["members"]] == ["fold-0", "fold-1", "fold-2"]
    assert m["folds"]["k"] == 3 and len(m["folds"]["heldout"]) == 3
    assert m["folds"]["top1_mean"] == pytest.approx(np.mean([h["top1"] for h in m["folds"]["heldout"]]))
    assert json.loads((teacher / "model.json").read_text())["source"] == "ensemble"

    train, val = load_splits(DataConfig(source="csv", root=str(grouped_csv), val_fraction=0.25,
                                        group_column="person"))
    assert not set(train.groups) & set(val.groups)
    oof = load_file(teacher / "oof.safetensors")
    assert oof["logits"].shape == (len(train), 3) and torch.isfinite(oof["logits"]).all()
    folds = oof["fold"].numpy()
    for f in range(3):  # a fold's held-out rows are predicted by that fold's teacher, which never saw them
        held = json.loads((teacher / f"fold-{f}" / "metrics.json").read_text())
        assert held["num_images"] == (folds == f).sum()
        fold_model, pre, _ = load_model(teacher / f"fold-{f}")
        rows = np.flatnonzero(folds == f)[:4]
        from distill.data import ImageDataset, build_transform
        ds = ImageDataset(train.subset(rows), build_transform(None, "eval", pre))
        with torch.inference_mode():
            direct = fold_model.eval()(torch.stack([ds[i][0] for i in range(len(rows))]))
        assert torch.allclose(direct, oof["logits"][rows], atol=1e-4)
        for g in set(train.groups[folds == f]):
            assert (folds[train.groups == g] == f).all()

    store = json.loads((tmp_path / "tiny-timm" / "targets" / "manifest.json").read_text())
    assert store["teacher"]["sha256"] == json.loads((teacher / "model.json").read_text())["sha256"]
    assert store["logits"]["source"] == "out-of-fold"
    # targets.oof: a labeled image's stored logits are its held-out fold teacher's, not the ensemble's
    from distill.store import TargetStore, render, to_tensor
    targets_store = TargetStore(tmp_path / "tiny-timm" / "targets")
    ensemble, pre, _ = load_model(teacher)
    for i in (0, 1, len(train) - 1):
        row = targets_store.row(i, targets_store.manifest["center_view"])
        x = to_tensor(render(train.load(i), row["params"], pre.input_size, pre.interpolation), pre)[None]
        fold_model = load_model(teacher / f"fold-{folds[i]}")[0].eval()
        with torch.inference_mode():
            assert torch.allclose(fold_model(x)[0], torch.from_numpy(row["logits"]), atol=2e-2)
            assert not torch.allclose(ensemble(x)[0], torch.from_numpy(row["logits"]), atol=2e-2)
    assert (tmp_path / "tiny-timm" / "students" / "s" / "metrics.json").is_file()
    table = (tmp_path / "tiny-timm" / "comparison.md").read_text()  # each member and the ensemble, one table
    assert "| teacher |" in table and all(f"| teacher:fold-{f} |" in table for f in range(3))
    assert "3-fold teacher, held-out folds: top1" in table

    # another recipe's ensemble: its own teacher plus fold-0 of this one
    recipe["name"] = "joined"
    recipe["teacher"].update(folds=None, ensemble_with=[str(teacher / "fold-0")], ensemble_combine="logits")
    recipe["targets"] = {"views": 1}
    recipe["students"] = []
    path.write_text(yaml.safe_dump(recipe))
    r = subprocess.run(["distill", "teach", str(path), f"output_dir={tmp_path}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    joined = json.loads((tmp_path / "joined" / "teacher" / "metrics.json").read_text())
    assert [x["name"] for x in joined["members"]] == ["own", str(teacher / "fold-0")]
    assert joined["ensemble_combine"] == "logits" and joined["folds"] is None

    recipe["teacher"]["ensemble_with"] = [str(tmp_path / "nowhere")]
    path.write_text(yaml.safe_dump(recipe))
    r = subprocess.run(["distill", "teach", str(path), f"output_dir={tmp_path / 'bad'}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: teacher.ensemble_with.0: "), r.stderr[-2000:]
