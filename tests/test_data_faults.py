"""Bad input data: every image file checked before training (headers.py), bad ones named in one error line or
skipped and listed; decompression bombs, truncated files and odd image modes."""
import io
import logging
import os
import resource
import struct
import subprocess
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import headers, load_splits, load_unlabeled, read_image
from distill.errors import DistillError
from distill.recipe import DataConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
BAD = ("truncated.png", "empty.jpg", "text.png")
SKIP_HINT = "fix or remove it, or set data.on_bad_image: skip to leave such files out"


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The header cache goes to the test's folder (only in-process: XDG_CACHE_HOME also moves the HF caches)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


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
    with pytest.raises(DistillError, match=rf"{name}: cannot read image .*fix or remove the file, or set "
                                           r"data.on_bad_image: skip"):
        read_image(path)


def test_skip_leaves_out_and_lists_the_bad_images(tmp_path):
    folder = make_folder(tmp_path / "data")
    cfg = {"source": "imagefolder", "root": str(folder), "val_fraction": 0.25}
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


# --- the header check before training (distill.data.headers) ------------------
def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 1-bit grey PNG of zeros: a few KB on disk, width x height pixels once decoded (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def astronaut_jpeg(path: Path) -> Path:
    from skimage import data

    Image.fromarray(data.astronaut()).save(path, quality=90)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def test_error_names_the_first_bad_file_the_count_and_the_skip_hint(tmp_path):
    folder = make_folder(tmp_path / "data")
    with pytest.raises(DistillError) as e:
        load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25))
    text = str(e.value)
    assert "\n" not in text and text.startswith("data.root: ") and text.endswith(SKIP_HINT)
    assert any(f"{name}: cannot read image (" in text for name in BAD)
    assert "3 bad image file(s) in all" in text  # train and val together


def test_header_check_is_cached_until_a_file_changes(tmp_path, monkeypatch, cache_home):
    folder = make_folder(tmp_path / "data")
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    opened = []
    real = headers.open_unlimited
    monkeypatch.setattr(headers, "open_unlimited", lambda f: opened.append(f) or real(f))
    first = headers.check_files(paths, 10**8)
    assert len(opened) == len(paths) - 1  # all but the empty file, which needs no opening
    assert len(list((cache_home / "distill" / "image-headers").glob("*.json"))) == 1
    opened.clear()
    assert headers.check_files(paths, 10**8) == first and not opened  # a hit: stat only
    changed = folder / "light" / "1-rgba.png"
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(changed)  # another size
    headers.check_files(paths, 10**8)
    assert len(opened) == 1
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer
    headers.check_files(paths, 10**8)
    assert len(opened) == 2


def test_an_unwritable_cache_does_not_fail_the_check(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    train, val = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25,
                                        on_bad_image="skip"))
    assert len(train) + len(val) == 24


def test_a_decompression_bomb_is_found_from_its_header(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000  # KBs on disk, 900 M pixels decoded
    rss, start = peak_rss_mb(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be an error here
        (bad,), misnamed = headers.check_files([str(bomb)], 89_478_485)
        with pytest.raises(DistillError, match=r"bomb.png: cannot read image \(30000 x 30000 = 900000000 pixels, "
                                               r"over data.max_image_pixels \(89478485\)\).*on_bad_image: skip"):
            read_image(bomb)
    assert bad == (0, "cannot read image (30000 x 30000 = 900000000 pixels, over data.max_image_pixels (89478485))")
    assert not misnamed
    assert time.perf_counter() - start < 2 and peak_rss_mb() - rss < 200  # decoded, it is 900 MB


def test_an_image_over_max_image_pixels_is_bad(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((30, 40), 9 * i, np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    with pytest.raises(DistillError, match=r"40 x 30 = 1200 pixels, over data.max_image_pixels \(1000\)\); 6 bad"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "data"), max_image_pixels=1000))
    assert load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "data"), max_image_pixels=1200))
    with pytest.raises(DistillError, match="over data.max_image_pixels"):
        read_image(tmp_path / "data" / "a" / "0.png", max_pixels=1000)


def test_a_truncated_jpeg_is_found_without_decoding(tmp_path, monkeypatch):
    photo = astronaut_jpeg(tmp_path / "astronaut.jpg")
    raw = photo.read_bytes()
    (tmp_path / "half.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "padded.jpg").write_bytes(raw + b"\0" * 3000)  # zero padding some writers add
    (tmp_path / "trailer.jpg").write_bytes(raw + b"garbage\n")  # a few stray bytes after the end marker
    with Image.open(tmp_path / "half.jpg") as img:
        assert img.size == (512, 512)  # its header alone looks fine
    names = ["astronaut.jpg", "half.jpg", "padded.jpg", "trailer.jpg"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the header check decoded an image")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    bad, _ = headers.check_files([str(tmp_path / n) for n in names], 10**8)
    assert bad == [(1, f"cannot read image (truncated: no end-of-image marker at its end ({len(raw) // 2} bytes))")]


def test_a_non_image_with_an_image_extension_is_bad(tmp_path):
    page = tmp_path / "photo.jpg"
    page.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    assert headers.check_files([str(page)], 10**8)[0] == [(0, "cannot read image (not an image file PIL can identify)")]


def test_a_misnamed_image_is_read_by_content_with_one_warning(tmp_path, caplog):
    folder = make_folder(tmp_path / "data")
    for cls in ("dark", "light"):
        for bad in BAD:
            (folder / cls / bad).unlink(missing_ok=True)
        (folder / cls / "0-grey.png").rename(folder / cls / "0-grey.jpg")  # a PNG named .jpg
    with caplog.at_level(logging.WARNING, logger="distill.data.sources"):
        train, val = load_splits(DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25))
    lines = [r.getMessage() for r in caplog.records if "another format" in r.getMessage()]
    assert len(lines) == 1 and "2 file(s)" in lines[0] and "0-grey.jpg (PNG)" in lines[0], lines
    assert len(train) + len(val) == 24
    assert read_image(folder / "dark" / "0-grey.jpg").shape == (20, 24, 3)


def test_unlabeled_images_are_checked_too(tmp_path):
    labeled = make_folder(tmp_path / "data")
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(extra / f"{i}.png")
    (extra / "cut.png").write_bytes((extra / "0.png").read_bytes()[:40])
    cfg = {"source": "imagefolder", "root": str(labeled), "val_fraction": 0.25, "unlabeled": str(extra)}
    train, val = load_splits(DataConfig(**cfg, on_bad_image="skip"))
    with pytest.raises(DistillError, match=r"^data.unlabeled: .*cut.png: cannot read image .*1 bad image file"):
        load_unlabeled(DataConfig(**cfg), train, val)
    unlabeled = load_unlabeled(DataConfig(**cfg, on_bad_image="skip"), train, val)
    assert len(unlabeled) == 3 and [Path(p).name for p, _ in unlabeled.skipped] == ["cut.png"]


def test_hf_image_bytes_are_checked(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good, format="PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 5 + [{"bytes": b"<html></html>", "path": None}]
    ds = datasets.Dataset.from_dict(
        {"image": rows, "label": [0, 1, 0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = {"source": "hf", "root": str(tmp_path / "ds"), "val_fraction": 0.5}
    with pytest.raises(DistillError, match=r":5: cannot read image \(not an image file PIL can identify\); 1 bad"):
        load_splits(DataConfig(**cfg))
    train, val = load_splits(DataConfig(**cfg, on_bad_image="skip"))
    assert len(train) + len(val) == 5 and train.load(0).shape == (8, 8, 3)


def test_a_validation_set_missing_a_class_gives_one_warning(tmp_path, caplog):
    for root, classes in (("train", "abc"), ("val", "ab")):
        for cls in classes:
            (tmp_path / root / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / root / cls / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="distill.data.sources"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val")))
    lines = [r.getMessage() for r in caplog.records if "no validation image" in r.getMessage()]
    assert len(lines) == 1 and "1 of 3 classes" in lines[0] and "(c)" in lines[0], lines


def test_teach_with_a_bad_image_fails_before_writing_anything(tmp_path):
    folder = make_folder(tmp_path / "data")
    r = subprocess.run(
        ["distill", "teach", "recipes/tiny-timm.yaml", f"output_dir={tmp_path / 'runs'}", "name=faults",
         "data.source=imagefolder", f"data.root={folder}", "data.subset=null", "data.val_fraction=0.25"],
        cwd=ROOT, env={**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}, capture_output=True, text=True,
        timeout=600, check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].endswith(SKIP_HINT), r.stderr[-3000:]
    assert "3 bad image file(s) in all" in errors[0]
    # no run directory (no config.yaml, no tb/); the run lock leaves output_dir itself, empty
    assert not (tmp_path / "runs" / "faults").exists() and not any((tmp_path / "runs").rglob("*"))
