"""The noisy-label audit: confident-learning scoring on synthetic flips, and `distill audit` on a real tiny run."""
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from distill.audit import COLUMNS, IN_SAMPLE, OUT_OF_FOLD
from distill.audit import main as audit_main
from distill.confident_learning import (
    class_thresholds,
    estimated_errors,
    margin,
    per_sample,
    precision_at,
    softmax,
    suspects,
    teacher_stats,
)
from distill.data import FASHION_MNIST_CLASSES, find_fashion_mnist, read_idx

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TROUSER, BAG = FASHION_MNIST_CLASSES.index("Trouser"), FASHION_MNIST_CLASSES.index("Bag")


def synthetic(n=2000, k=10, flip=0.05, noise=1.0, seed=0):
    """Logits that agree with the true labels plus Gaussian noise; `flip` of the given labels moved to another class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    logits = 4.0 * np.eye(k)[true] + rng.normal(0.0, noise, (n, k))
    given = true.copy()
    flipped = rng.choice(n, round(flip * n), replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, k, len(flipped))) % k
    return logits, given, flipped


def flag(logits, given, k=10, min_confidence=0.0):
    stats = per_sample(softmax(logits), given)
    thresholds = class_thresholds(stats["p_given"], given, k)
    ranked, scores = suspects(stats["p_given"], stats["teacher"], stats["p_teacher"], given, thresholds,
                              min_confidence)
    return stats, thresholds, ranked, scores


# --- scoring -----------------------------------------------------------------------------------
def test_flipped_labels_rank_first_and_clean_ones_score_low():
    logits, given, flipped = synthetic()
    stats, thresholds, ranked, scores = flag(logits, given)
    assert np.all(np.diff(scores) <= 0)
    # measured: precision 1.00 at 20, 50 and over all 62 suspects; 62 of the 100 flips are flagged
    assert precision_at(ranked, flipped, 20) == 1.0
    assert precision_at(ranked, flipped, 50) >= 0.95
    assert precision_at(ranked, flipped, len(ranked)) >= 0.9
    assert len(ranked) >= 40
    clean = np.setdiff1d(np.arange(len(given)), flipped)
    score = margin(stats["p_given"], stats["p_teacher"])
    assert np.quantile(score[clean], 0.99) < np.median(scores)
    assert np.isin(clean, ranked).mean() < 0.01
    # the calibrated confident joint estimates the number of flips (100) within 15% (measured 93)
    estimate = estimated_errors(stats["teacher"], stats["p_teacher"], given, thresholds, 10)
    assert 85 <= estimate <= 115


def test_clean_labels_give_almost_no_suspects():
    logits, given, _ = synthetic(flip=0.0)
    _, _, ranked, _ = flag(logits, given, min_confidence=0.5)
    assert len(ranked) <= 0.01 * len(given)  # only the teacher's own confident mistakes


def test_thresholds_are_the_mean_self_confidence_per_class():
    p_given = np.array([0.9, 0.7, 0.4, 0.6])
    labels = np.array([0, 0, 1, 1])
    assert np.allclose(class_thresholds(p_given, labels, 3), [0.8, 0.5, 1.0])  # class 2 has no sample: 1


def test_a_suspect_needs_the_teacher_label_above_its_threshold_and_min_confidence():
    probs = np.array([[0.9, 0.1, 0.0],    # labeled 0, teacher 0: agrees
                      [0.1, 0.8, 0.1],    # labeled 0, teacher 1 at 0.8 >= t_1 = 0.54: suspect, margin 0.7
                      [0.3, 0.45, 0.25],  # labeled 0, teacher 1 at 0.45 < t_1: not confident, not a suspect
                      [0.05, 0.9, 0.05],  # labeled 1: agrees
                      [0.1, 0.7, 0.2],    # labeled 1: agrees
                      [0.0, 0.02, 0.98],  # labeled 1, teacher 2 at 0.98 >= t_2 = 0.7: suspect, margin 0.96
                      [0.1, 0.2, 0.7]])   # labeled 2: agrees
    labels = np.array([0, 0, 0, 1, 1, 1, 2])
    stats = per_sample(probs, labels)
    thresholds = class_thresholds(stats["p_given"], labels, 3)
    assert np.allclose(thresholds, [(0.9 + 0.1 + 0.3) / 3, (0.9 + 0.7 + 0.02) / 3, 0.7])
    ranked, scores = suspects(stats["p_given"], stats["teacher"], stats["p_teacher"], labels, thresholds)
    assert ranked.tolist() == [5, 1] and np.allclose(scores, [0.96, 0.7])
    ranked, _ = suspects(stats["p_given"], stats["teacher"], stats["p_teacher"], labels, thresholds, 0.85)
    assert ranked.tolist() == [5]


def test_stats_read_in_chunks_equal_stats_of_the_whole():
    logits, given, _ = synthetic(n=500)
    whole = per_sample(softmax(logits), given)
    joined = teacher_stats((logits[lo:lo + 64] for lo in range(0, 500, 64)), given)
    assert all(np.array_equal(whole[k], joined[k]) for k in whole)


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]], dtype=np.float32))
    assert np.allclose(p, [[1.0, 0.0], [0.5, 0.5]])


# --- end to end ------------------------------------------------------------------------------------
CLASSES = ("T-shirt/top", "Trouser", "Sneaker", "Bag")  # four classes: a 3-epoch teacher separates them well


def export_csv(folder: Path, name: str, prefix: str, per_class: int) -> list[tuple[str, str]]:
    """The first `per_class` Fashion-MNIST images of each of CLASSES from the `prefix` idx files, as PNG files;
    returns the (relative path, label) rows of a data.source csv file."""
    base = find_fashion_mnist(None)
    images = read_idx(base / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(base / f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.concatenate([np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(c))[:per_class] for c in CLASSES])
    (folder / name).mkdir(parents=True)
    rows = []
    for i in sorted(keep):
        path = f"{name}/{i:05d}.png"
        Image.fromarray(images[i]).save(folder / path)
        rows.append((path, FASHION_MNIST_CLASSES[labels[i]]))
    return rows


def write_rows(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)


def run(*args):
    return subprocess.run(["distill", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A tiny teacher trained on 300 Fashion-MNIST PNGs of which 5 Trouser labels say Bag and 5 Bag labels
    say Trouser. Returns (run dir, the image paths whose label was flipped)."""
    tmp = tmp_path_factory.mktemp("audit")
    train = export_csv(tmp, "train", "train", 75)
    write_rows(tmp / "val.csv", export_csv(tmp, "val", "t10k", 25))
    rng = np.random.default_rng(0)
    trousers, bags = ([i for i, (_, label) in enumerate(train) if label == name] for name in ("Trouser", "Bag"))
    flipped = set()
    for rows, new in ((trousers, "Bag"), (bags, "Trouser")):
        for i in rng.choice(rows, 5, replace=False):
            train[i] = (train[i][0], new)
            flipped.add(str(tmp / train[i][0]))
    write_rows(tmp / "train.csv", train)
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text())
    recipe["name"] = "noisy"
    recipe["data"] = {"source": "csv", "root": str(tmp / "train.csv"), "val_root": str(tmp / "val.csv")}
    recipe["teacher"].update(epochs=3, batch_size=32)
    recipe["teacher"]["optim"]["lr"] = 0.05
    recipe["targets"] = {"views": 1}
    recipe["log"] = {"progress": False}
    (tmp / "noisy.yaml").write_text(yaml.safe_dump(recipe))
    # teach = `distill run`'s only stage for a recipe without students, less the comparison table
    r = run("teach", tmp / "noisy.yaml", f"output_dir={tmp / 'runs'}")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "runs" / "noisy", flipped


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_labels(run_dir: Path) -> list[int]:
    from distill.data import load_splits
    from distill.recipe import load_recipe

    train, _ = load_splits(load_recipe(run_dir / "config.yaml").data)
    assert train.classes == sorted(CLASSES)
    return train.labels.tolist()


@pytest.mark.slow
def test_audit_finds_the_swapped_labels_in_sample(noisy_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, flipped = noisy_run
    audit_main([str(run_dir), "--top", "12"])
    out = capsys.readouterr().out
    assert "in-sample" in out and "warning: in-sample predictions" in out and "under-reports label noise" in out
    rows = read_csv(run_dir / "audit.csv")
    assert list(rows[0]) == ["rank", "index", "path", "given_label", "teacher_label", "teacher_confidence",
                             "given_label_probability", "score", "source"]
    assert all(row["source"] == IN_SAMPLE and Path(row["path"]).is_file() for row in rows)
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(float(row["teacher_confidence"]) >= 0.5 for row in rows)
    # measured: 8 of the top 10 are swapped images (the other two: a camouflage trouser, a T-shirt)
    found = [row for row in rows[:10] if row["path"] in flipped]
    assert len(found) >= 6, out
    assert all({row["given_label"], row["teacher_label"]} == {"Trouser", "Bag"} for row in found)
    assert "Bag -> Trouser" in out
    summary = json.loads((run_dir / "audit.json").read_text())
    assert summary["source"] == IN_SAMPLE and summary["warning"] and summary["num_audited"] == 300
    assert summary["num_suspects"] == len(rows)
    assert (run_dir / "audit.png").stat().st_size > 10_000
    events = EventAccumulator(str(run_dir / "tb" / "audit"), size_guidance={"images": 0}).Reload()
    [image] = events.Images("audit/top_suspects")
    assert image.width > 500 and image.height > 100


def audit_with_oof(run_dir: Path, logits, folds: int, out: Path) -> None:
    """Audit `run_dir` as if a k-fold teacher had written these out-of-fold `logits` (removed afterwards, so the
    module's run stays in-sample for the other tests)."""
    import torch
    from safetensors.torch import save_file

    oof = run_dir / "teacher" / "oof.safetensors"
    save_file({"logits": logits, "fold": torch.arange(len(logits)) % folds}, str(oof))
    try:
        audit_main([str(run_dir), "--out", str(out)])
    finally:
        oof.unlink()


@pytest.mark.slow
def test_audit_prefers_out_of_fold_predictions(noisy_run, tmp_path, capsys):
    import torch

    run_dir, _ = noisy_run
    labels = train_labels(run_dir)
    # a fake k-fold teacher sure of every given label but sample 7's, which it calls the next class
    other = (labels[7] + 1) % len(CLASSES)
    logits = torch.full((len(labels), len(CLASSES)), -5.0)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 5.0
    logits[7] = -5.0
    logits[7, other] = 6.0  # above its class threshold, the mean p of the others (logit 5)
    audit_with_oof(run_dir, logits, folds=5, out=tmp_path / "oof.csv")
    out = capsys.readouterr().out
    assert "out-of-fold (5-fold teacher" in out and "warning" not in out
    [row] = read_csv(tmp_path / "oof.csv")
    assert row["index"] == "7" and row["source"] == OUT_OF_FOLD
    assert row["teacher_label"] == sorted(CLASSES)[other] and float(row["teacher_confidence"]) > 0.99
    assert (tmp_path / "oof.png").is_file() and json.loads((tmp_path / "oof.json").read_text())["warning"] is None


@pytest.mark.slow
def test_a_teacher_that_agrees_everywhere_gives_an_empty_list(noisy_run, tmp_path, capsys):
    import torch

    run_dir, _ = noisy_run
    labels = train_labels(run_dir)
    logits = torch.nn.functional.one_hot(torch.tensor(labels), len(CLASSES)).float() * 8
    audit_with_oof(run_dir, logits, folds=3, out=tmp_path / "none.csv")
    assert "suspects: 0 (0.0%)" in capsys.readouterr().out
    assert (tmp_path / "none.csv").read_text().splitlines() == [",".join(COLUMNS)]
    assert (tmp_path / "none.png").is_file()


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        audit_main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_an_oof_file_of_another_shape_is_an_error(noisy_run, capsys):
    import torch
    from safetensors.torch import save_file

    run_dir, _ = noisy_run
    oof = run_dir / "teacher" / "oof.safetensors"
    save_file({"logits": torch.zeros(5, len(CLASSES))}, str(oof))
    try:
        err = one_error_line(capsys, [str(run_dir)])
    finally:
        oof.unlink()
    assert "oof.safetensors" in err and "300 samples" in err


def test_a_run_without_teacher_predictions_is_an_error(tmp_path, capsys):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-timm.yaml").read_text()) | {"data": {"source": "digits"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recipe))
    assert "run distill run" in one_error_line(capsys, [str(tmp_path)])
    assert "no such run directory" in one_error_line(capsys, [str(tmp_path / "missing")])


def test_a_folder_that_is_not_a_run_exits_2_with_one_error_line(tmp_path):
    r = run("audit", tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and "not a run directory" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())  # nothing written
