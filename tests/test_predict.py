"""TTA views and averaging, `distill predict` (folder, CSV, --tta, --labels, errors) and `distill diff`."""
import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.diff import diff_main
from distill.predict import main
from distill.recipe import StudentConfig, TTAConfig, dump_recipe, recipe_from_dict
from distill.tta import num_views, tta_logits, views, zoom

ROOT = Path(__file__).resolve().parent.parent
# one thread: the models are tiny, and with other jobs on the machine's 2 CPUs OpenMP threads waiting on each
# other turn a 10 ms forward pass into a second
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CLASSES = ["0", "1", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def tiny_model(num_classes=3, seed=0):
    from distill.models import build_model

    torch.manual_seed(seed)
    model, pre = build_model(StudentConfig(name="s", model="timm:resnet10t", resolution=32), num_classes,
                             where="students.0", classes=CLASSES[:num_classes])
    return model.eval(), pre


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 real digit images (classes 0-2, 4 each) as 32 px PNGs in class folders, a CSV of them with labels,
    and a tiny random-weight resnet10t saved with save_model."""
    from sklearn.datasets import load_digits

    from distill.models import save_model

    tmp = tmp_path_factory.mktemp("predict")
    digits = load_digits()
    rows = []
    for label in range(3):
        (tmp / "images" / str(label)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == label)[:4]):
            pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            name = f"images/{label}/d{k}.png"
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(tmp / name)
            rows.append((name, label))
    with open(tmp / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    model, pre = tiny_model()
    save_model(model, pre, tmp / "model", CLASSES)
    return tmp


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def prob_matrix(rows):
    return np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])


# --- tta.py -----------------------------------------------------------------------
def test_views_shapes_plain_forward_and_count():
    x = torch.randn(2, 3, 32, 32)
    v = views(x, [1.0, 1.15, 0.8], hflip=True)
    assert len(v) == 6 == num_views(TTAConfig(scales=[1.0, 1.15, 0.8]))
    assert all(t.shape == x.shape for t in v)
    assert v[0] is x and torch.equal(v[1], x.flip(-1)) and torch.equal(v[3], v[2].flip(-1))
    model, _ = tiny_model()
    with torch.inference_mode():
        plain = model(x)
        # no TTA: exactly the plain forward pass (same tensor values, no float/log-softmax round trip)
        assert torch.equal(tta_logits(model, x, None), plain)
        assert torch.equal(tta_logits(model, x, TTAConfig(enabled=True, hflip=False, scales=[1.0])), plain)
    assert num_views(None) == num_views(TTAConfig(hflip=False)) == 1


def test_zoom_crops_in_and_pads_out_by_reflection():
    x = torch.randn(1, 3, 32, 32)
    big = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(zoom(x, 2.0), big[..., 16:48, 16:48])
    small = zoom(x, 0.5)
    inner = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert small.shape == x.shape and torch.equal(small[..., 8:24, 8:24], inner)
    assert torch.equal(small[..., 8:24, 7], inner[..., :, 1])  # reflection: the border mirrors the image
    assert torch.equal(zoom(x, 1.01), x)  # less than a pixel each side: no zoom


def test_tta_with_hflip_is_flip_invariant():
    model, _ = tiny_model()
    x = torch.randn(3, 3, 32, 32)
    cfg = TTAConfig(enabled=True, hflip=True, scales=[1.0, 1.15, 0.8])
    with torch.inference_mode():
        assert not torch.allclose(model(x), model(x.flip(-1)), atol=1e-4)  # the model itself is not
        torch.testing.assert_close(tta_logits(model, x.flip(-1), cfg), tta_logits(model, x, cfg),
                                   atol=1e-5, rtol=1e-5)


def test_tta_averages_probabilities_not_logits():
    class Scaled(torch.nn.Module):  # confident, view-dependent logits: the two averages then differ clearly
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 5)

        def forward(self, x):
            return 20 * self.conv(x)[..., :3, :3].mean((-1, -2))[:, :3]

    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(4, 3, 32, 32)
    cfg = TTAConfig(enabled=True, hflip=True, scales=[1.0, 1.3])
    with torch.no_grad():
        out = tta_logits(model, x, cfg)
        logits = torch.stack([model(v) for v in views(x, cfg.scales, cfg.hflip)])
    assert out.shape == (4, 3)
    torch.testing.assert_close(out.exp(), logits.softmax(-1).mean(0))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
    assert not torch.allclose(out.softmax(-1), logits.mean(0).softmax(-1), atol=1e-3)


# --- distill predict ----------------------------------------------------------------
def test_predict_folder_writes_one_row_per_image(data, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    main([str(data / "model"), str(data / "images"), "--out", str(out), "--batch-size", "5", "--labels"])
    stdout = capsys.readouterr().out
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label", "prediction", "confidence", *(f"prob_{c}" for c in CLASSES)]
    assert [r["path"] for r in rows] == sorted(f"{c}/d{k}.png" for c in CLASSES for k in range(4))
    assert [r["label"] for r in rows] == [r["path"][0] for r in rows]
    probs = prob_matrix(rows)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    for r, p in zip(rows, probs):
        assert r["prediction"] == CLASSES[p.argmax()] and float(r["confidence"]) == p.max()
    assert "predicted 12 images" in stdout and "no TTA" in stdout and "images/s" in stdout
    top1 = np.mean([r["prediction"] == r["label"] for r in rows])
    assert f"top1 {top1:.4f}" in stdout and "macro_f1" in stdout


def test_predict_tta_changes_probabilities_not_shapes(data, tmp_path, capsys):
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    main([str(data / "model"), str(data / "list.csv"), "--out", str(plain)])
    main([str(data / "model"), str(data / "list.csv"), "--out", str(tta), "--tta", "--tta-scales", "1.0,1.15"])
    assert "TTA 4 views: scales 1, 1.15 + hflip" in capsys.readouterr().out
    a, b = read_csv(plain), read_csv(tta)
    assert list(a[0]) == list(b[0]) == ["path", "prediction", "confidence", *(f"prob_{c}" for c in CLASSES)]
    assert [r["path"] for r in a] == [r["path"] for r in b] == [f"images/{c}/d{k}.png" for c in CLASSES
                                                               for k in range(4)]  # as written in the CSV
    pa, pb = prob_matrix(a), prob_matrix(b)
    np.testing.assert_allclose(pb.sum(1), 1, atol=1e-5)
    assert np.abs(pa - pb).max() > 1e-4


def test_predict_takes_tta_from_the_run_recipe(data, tmp_path, capsys):
    """A model inside a run dir uses its recipe's tta: section; the flags override it."""
    from distill.models import load_model, save_model

    recipe = recipe_from_dict({"name": "r", "teacher": {"model": "timm:resnet10t"},
                               "tta": {"enabled": True, "hflip": False, "scales": [1.0, 0.8, 1.2]}})
    run = tmp_path / "r"
    (run / "students").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(recipe))
    model, pre, _ = load_model(data / "model")
    save_model(model, pre, run / "students" / "s" / "fixres", CLASSES)
    main([str(run / "students/s/fixres"), str(data / "images/1/d0.png"), "--out", str(tmp_path / "p.csv"), "--tta"])
    assert "TTA 3 views: scales 1, 0.8, 1.2)" in capsys.readouterr().out
    main([str(run / "students/s/fixres"), str(data / "images/1/d0.png"), "--out", str(tmp_path / "p.csv"),
          "--hflip"])
    assert "TTA 6 views: scales 1, 0.8, 1.2 + hflip)" in capsys.readouterr().out
    assert [r["path"] for r in read_csv(tmp_path / "p.csv")] == [str(data / "images/1/d0.png")]


def test_predict_uses_the_eval_transform_the_model_folder_names(data, tmp_path):
    """A folder saved with `eval_augment` is predicted through that list, as it was evaluated, wherever it lies."""
    from distill.data import Split, build_transform
    from distill.models import load_model, save_model
    from distill.predict import predict_split

    augment = [{"name": "Resize", "height": "input_size", "width": "input_size"}]
    model, pre, _ = load_model(data / "model")
    save_model(model, pre, tmp_path / "resized", CLASSES, eval_augment=augment)
    for folder, out in ((data / "model", "plain.csv"), (tmp_path / "resized", "resized.csv")):
        main([str(folder), str(data / "images"), "--out", str(tmp_path / out)])
    plain, resized = prob_matrix(read_csv(tmp_path / "plain.csv")), prob_matrix(read_csv(tmp_path / "resized.csv"))
    assert np.abs(plain - resized).max() > 1e-4
    paths = sorted(str(p) for p in (data / "images").rglob("*.png"))
    split = Split(CLASSES, [0] * len(paths), paths=paths, name="x")
    logits, _ = predict_split(model, pre, split, transform=build_transform(augment, "eval", pre))
    np.testing.assert_allclose(resized, logits.softmax(-1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["unreadable", "empty", "bad-label", "bad-scales"])
def test_predict_bad_input_is_one_error_line(data, tmp_path, capsys, case):
    images, extra = tmp_path / "in", []
    (images / "2").mkdir(parents=True)
    if case == "unreadable":
        (images / "2" / "broken.png").write_bytes(b"not a png")
        expect = str(images / "2" / "broken.png")
    elif case == "empty":
        expect = f"{images}: no images"
    elif case == "bad-label":
        (images / "cat").mkdir()
        Image.new("RGB", (8, 8)).save(images / "cat" / "x.png")
        extra, expect = ["--labels"], "class folder 'cat' is not a class of the model"
    else:
        Image.new("RGB", (8, 8)).save(images / "2" / "x.png")
        extra, expect = ["--tta-scales", "1,3"], "--tta-scales: expected comma-separated scales in [0.5, 2]"
    with pytest.raises(SystemExit) as e:
        main([str(data / "model"), str(images), "--out", str(tmp_path / "p.csv"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert not (tmp_path / "p.csv").exists()


def test_cli_errors_exit_2_with_one_line(data, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8 truncated")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("path,prediction,confidence\nx.png,1,0.9\n")
    b.write_text("path,prediction,confidence\ny.png,1,0.9\n")
    for args, expect in [(["predict", data / "model", tmp_path / "bad", "--out", tmp_path / "p.csv"],
                          str(tmp_path / "bad" / "x.jpg")),
                         (["diff", a, b], "no image path in common")]:
        r = subprocess.run(["distill", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300, check=False)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and expect in err[0], r.stderr


# --- distill diff -------------------------------------------------------------------
def write_preds(path, rows, label=False):
    header = "path,label,prediction,confidence" if label else "path,prediction,confidence"
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_diff_counts_pairs_and_most_confident(tmp_path, capsys):
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "d.csv"
    write_preds(a, [("p1", "cat", 0.9), ("p2", "cat", 0.6), ("p3", "dog", 0.99), ("p4", "dog", 0.5),
                    ("p5", "cat", 0.7), ("only-a", "cat", 0.5)])
    write_preds(b, [("p1", "cat", 0.8), ("p2", "dog", 0.7), ("p3", "cat", 0.95), ("p4", "cat", 0.5),
                    ("p5", "dog", 0.4), ("only-b1", "dog", 0.5), ("only-b2", "dog", 0.5)])
    diff_main([str(a), str(b), "--out", str(out), "--top", "1"])
    text = capsys.readouterr().out
    assert f"5 images in both (1 only in {a}, 2 only in {b})" in text
    assert "4 of 5 predictions differ (80.0%)" in text
    assert "  cat -> dog: 2" in text and "(1 more pairs)" in text and "dog -> cat" not in text  # --top 1
    assert "p3" in text and "(3 more; --out writes them all)" in text
    rows = read_csv(out)
    assert [r["path"] for r in rows] == ["p3", "p2", "p5", "p4"]  # by mean confidence, highest first
    assert rows[0] == {"path": "p3", "prediction_a": "dog", "confidence_a": "0.99", "prediction_b": "cat",
                       "confidence_b": "0.95"}


def test_diff_with_labels_says_who_is_right(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_preds(a, [("p1", "cat", "cat", 0.9), ("p2", "dog", "cat", 0.6), ("p3", "dog", "dog", 0.9)], label=True)
    write_preds(b, [("p1", "cat", "dog", 0.8), ("p2", "dog", "dog", 0.7), ("p3", "dog", "dog", 0.9)], label=True)
    diff_main([str(a), str(b)])
    text = capsys.readouterr().out
    assert "3 images in both\n" in text and "2 of 3 predictions differ (66.7%)" in text
    assert f"top1 on the 3 labelled images: {a} 0.6667, {b} 0.6667; where they differ, {a} is right on 1, " \
           f"{b} on 1" in text
