"""Bad input data: unreadable images named in one error line, or skipped and listed; odd image modes read."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import load_splits, read_image
from distill.errors import DistillError
from distill.recipe import DataConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
BAD = ("truncated.png", "empty.jpg", "text.png")


def make_folder(root: Path) -> Path:
    """Two classes of 12 small images in every mode a user's folder may hold, and three bad files."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("dark", "light")):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(12):
            base = rng.integers(0, 100, (20, 24)) + 120 * c
            mode = i % 4
            if mode == 0:
                Image.fromarray(base.astype(np.uint8)).save(d / f"{i}-grey.png")
            elif mode == 1:
                rgba = np.dstack([base] * 3 + [np.full_like(base, 255)]).astype(np.uint8)
                Image.fromarray(rgba, "RGBA").save(d / f"{i}-rgba.png")
            elif mode == 2:
                Image.fromarray((base * 257).astype(np.uint16)).save(d / f"{i}-16bit.png")
            else:
                Image.fromarray(np.dstack([base] * 3).astype(np.uint8)).save(d / f"{i}-rgb.jpg")
    good = (root / "dark" / "0-grey.png").read_bytes()
    (root / "dark" / BAD[0]).write_bytes(good[: len(good) // 2])
    (root / "light" / BAD[1]).write_bytes(b"")
    (root / "light" / BAD[2]).write_text("not an image")
    return root


def test_every_image_mode_reads_as_rgb_uint8(tmp_path):
    folder = make_folder(tmp_path / "data")
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in BAD:
            image = read_image(path)
            assert image.dtype == np.uint8 and image.shape == (20, 24, 3), path
    # 16-bit grey is scaled, not clipped: light images stay light
    sixteen = read_image(folder / "light" / "2-16bit.png")
    assert 120 <= sixteen.mean() <= 230


@pytest.mark.parametrize("name", BAD)
def test_an_unreadable_image_is_named(tmp_path, name):
    folder = make_folder(tmp_path / "data")
    path = next(folder.rglob(name))
    with pytest.raises(DistillError, match=rf"{name}: cannot read image .*fix or remove the file"):
        read_image(path)


def test_skip_leaves_out_and_lists_the_bad_images(tmp_path):
    folder = make_folder(tmp_path / "data")
    cfg = {"source": "imagefolder", "root": str(folder), "val_fraction": 0.25}
    train, val = load_splits(DataConfig(**cfg))
    assert len(train) + len(val) == 27  # 24 good + 3 bad, nothing read yet
    train, val = load_splits(DataConfig(**cfg, on_bad_image="skip"))
    assert len(train) + len(val) == 24
    skipped = sorted(Path(p).name for p, _ in train.skipped + val.skipped)
    assert skipped == sorted(BAD)
    assert all("cannot read image" in why for _, why in train.skipped + val.skipped)
    for i in range(len(train)):
        train.load(i)


def run_teach(folder, tmp_path, *overrides):
    return subprocess.run(
        ["distill", "teach", "recipes/tiny-timm.yaml", f"output_dir={tmp_path / 'runs'}", "name=faults",
         "data.source=imagefolder", f"data.root={folder}", "data.subset=null", "data.val_fraction=0.25",
         "teacher.epochs=1", "teacher.batch_size=8", "targets.export=false", *overrides],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_teach_names_the_bad_image_in_one_error_line(tmp_path, workers):
    folder = make_folder(tmp_path / "data")
    r = run_teach(folder, tmp_path, f"data.num_workers={workers}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert any(name in errors[0] for name in BAD) and "cannot read image" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "faults" / "teacher" / "metrics.json").exists()


@pytest.mark.slow
def test_teach_skips_and_lists_the_bad_images(tmp_path):
    folder = make_folder(tmp_path / "data")
    r = run_teach(folder, tmp_path, "data.on_bad_image=skip")
    assert r.returncode == 0, r.stderr[-3000:]
    listed = (tmp_path / "runs" / "faults" / "skipped_images.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == sorted(BAD)
    assert "3 unreadable image(s) left out" in r.stdout + r.stderr
