"""The decoded-image cache (data.cache, distill.data.cache): built once from real photos, read back downscaled,
reused, keyed by the files and the max side, damage repaired or refused, a small disk and a bad file refused
before anything half-written is left."""
import os
import subprocess
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from distill import disk
from distill.data import cache as C
from distill.data import load_splits, load_unlabeled, read_image
from distill.errors import DistillError
from distill.recipe import DataConfig, load_recipe
from distill.runs import stage_fingerprint
from distill.teach import teacher_fingerprint

ROOT = Path(__file__).resolve().parent.parent
SIDE = 96


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The header and image caches go to the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_photos(out: Path, count: int = 24, seed: int = 0) -> Path:
    """out/<class>/<i>.jpg: random crops of scikit-image's photos at 60x45 .. 240x180 (some below SIDE, so
    nothing is upscaled), either orientation, JPEG quality 90."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(), "chelsea": skimage.data.chelsea()}
    for i in range(count):
        name = sorted(photos)[i % 3]
        a = photos[name]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        width = int(rng.integers(60, 241))
        size = (width, width * 3 // 4) if i % 4 else (width * 3 // 4, width)
        image = cv2.resize(np.ascontiguousarray(a[y:y + ch, x:x + cw, :3]), size, interpolation=cv2.INTER_AREA)
        (out / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / name / f"{i:03d}.jpg", quality=90)
    return out


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos")


def splits(folder, **data):
    cfg = DataConfig(source="imagefolder", root=str(folder), val_fraction=0.25, cache=SIDE, **data)
    train, val = load_splits(cfg)
    return cfg, train, val


def count_decodes(monkeypatch) -> list:
    calls = []

    def counted(path, *args, **kwargs):
        calls.append(path)
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(C, "read_image", counted)
    return calls


def shards(cache_home) -> list[Path]:
    return sorted((cache_home / "distill" / "images").glob("*/shard-*"))


@pytest.mark.parametrize("storage", ["raw", "jpeg"])
def test_the_cache_gives_the_downscaled_images(photos, storage):
    # decode_scaled off: every file decoded at full size, then shrunk with INTER_AREA: the reference
    cfg, train, val = splits(photos, cache_format=storage, decode_scaled=False)
    cache = C.attach_cache(cfg, train, val)
    assert len(cache) == len(train) + len(val) == 24
    for split in (train, val):
        for i in range(len(split)):
            full = read_image(split.paths[i])
            h, w = full.shape[:2]
            tw, th = C.target_size(w, h, SIDE)
            assert max(tw, th) == min(SIDE, max(w, h)) and split.size(i) == (th, tw)  # never upscaled
            got = split.load(i)
            assert got.shape == (th, tw, 3) and got.dtype == np.uint8
            reference = full if (tw, th) == (w, h) else cv2.resize(full, (tw, th), interpolation=cv2.INTER_AREA)
            if storage == "raw":
                assert np.array_equal(got, reference), split.paths[i]
            else:  # re-encoded at quality 95 (4:2:0), on these tiny, detail-dense crops: ~2 levels on average
                diff = np.abs(got.astype(int) - reference)
                assert diff.mean() < 2.5 and np.percentile(diff, 99) < 16, split.paths[i]
    # decode_scaled (the default): a JPEG twice the max side or more is decoded at 1/2..1/8 scale before the
    # INTER_AREA; another cache, exactly what `decode` gives
    cfg, train, val = splits(photos, cache_format=storage)
    scaled = C.attach_cache(cfg, train, val)
    assert scaled.folder != cache.folder
    if storage == "raw":
        for i in range(len(train)):
            assert np.array_equal(train.load(i), C.decode(train.paths[i], train.size(i)[::-1], cfg.max_image_pixels))


def test_the_cache_follows_subsets_and_every_split(photos, tmp_path):
    unlabeled_dir = make_photos(tmp_path / "more", count=6, seed=1)
    cfg, train, val = splits(photos, unlabeled=str(unlabeled_dir))
    unlabeled = load_unlabeled(cfg, train, val)
    cache = C.attach_cache(cfg, train, val, unlabeled, None)
    assert len(cache) == 30
    part = train.subset([3, 1])
    for split, i in ((part, 0), (part, 1), (unlabeled, 2), (val, 0)):
        assert split.cache is cache
        full = read_image(split.paths[i])
        assert split.load(i).shape[:2] == split.size(i) == cache.size(split.cache_rows[i])
        assert split.size(i) == C.target_size(full.shape[1], full.shape[0], SIDE)[::-1]
    # in-memory splits (the builtins) are not cached; data.cache off attaches nothing
    builtin, _ = load_splits(DataConfig(subset=50, cache=SIDE))
    assert C.attach_cache(DataConfig(subset=50, cache=SIDE), builtin) is None and builtin.cache is None
    _, train2, _ = splits(photos)
    assert C.attach_cache(DataConfig(), train2) is None and train2.cache is None


def test_a_second_open_reuses_the_cache(photos, monkeypatch):
    calls = count_decodes(monkeypatch)
    cfg, train, val = splits(photos)
    first = C.attach_cache(cfg, train, val)
    assert len(calls) == 24
    cfg, train, val = splits(photos)
    second = C.attach_cache(cfg, train, val)
    assert len(calls) == 24 and second.folder == first.folder  # nothing decoded again
    assert np.array_equal(train.load(0), first.load(train.cache_rows[0]))


def test_a_changed_file_or_another_max_side_is_another_cache(photos):
    cfg, train, val = splits(photos)
    first = C.attach_cache(cfg, train, val).folder
    other = C.attach_cache(DataConfig(**{**cfg.__dict__, "cache": SIDE // 2}), train, val)
    assert other.folder != first and max(train.size(0)) <= SIDE // 2
    st = os.stat(train.paths[0])
    os.utime(train.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert C.attach_cache(cfg, train, val).folder not in (first, other.folder)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_rebuilt_or_refused(photos, monkeypatch, capsys, damage):
    monkeypatch.setattr(C, "SHARD_BYTES", 2000)  # a few images a shard
    cfg, train, val = splits(photos)
    cache = C.attach_cache(cfg, train, val)
    assert len(cache.files) > 2
    shard = cache.folder / cache.files[1]
    original = shard.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
        shard.write_bytes(bytes(data))  # same size: found by its sha256 (the write changed its mtime)
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-100]))
    else:
        shard.unlink()
    files = sorted({os.path.abspath(p) for p in train.paths + val.paths})
    args = files, SIDE, cfg.max_image_pixels, True, C.cache_root(None)
    # a process that may not build (not the local main one) refuses in one line naming the shard
    with pytest.raises(DistillError, match=rf"data.cache: .*{shard.name} is damaged; run again") as e:
        C.open_cache(*args, build=False, storage="jpeg")
    assert "\n" not in str(e.value)
    calls = count_decodes(monkeypatch)
    repaired = C.attach_cache(cfg, train, val)
    assert f"{shard} is damaged" in capsys.readouterr().err
    assert len(calls) == cache.manifest["shard_images"]  # only that shard's images decoded again
    assert shard.read_bytes() == original  # the same bytes again: the pass is deterministic
    for i in range(len(train)):
        assert np.array_equal(train.load(i), repaired.load(train.cache_rows[i]))
    C.open_cache(*args, build=False, storage="jpeg")


def test_a_too_small_disk_is_refused_before_anything_is_written(photos, monkeypatch, cache_home):
    cfg, train, val = splits(photos)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DistillError, match=r"data.cache \(24 images at max side 96, jpeg\) needs about .* MiB and "
                                           r".* has 0.0 MiB free; free some space, point data.cache_dir at") as e:
        C.attach_cache(cfg, train, val)
    assert "\n" not in str(e.value)
    assert not shards(cache_home) and not list((cache_home / "distill" / "images").glob("*/manifest.json"))
    assert train.cache is None


def test_an_undecodable_file_is_named_and_leaves_no_partial_shard(photos, cache_home):
    cfg, train, val = splits(photos)
    bad = Path(train.paths[5])
    good = bad.read_bytes()
    i = good.index(b"\xff\xc4")  # the Huffman table: the header and the end marker still pass the check
    bad.write_bytes(good[:i + 5] + b"\xff" * 20 + good[i + 25:])
    cfg, train, val = splits(photos)  # the header check passes it
    with pytest.raises(DistillError, match=rf"data.cache: {bad}: cannot read image .*though its header and end "
                                           r"passed the check.*remove or replace the file") as e:
        C.attach_cache(cfg, train, val)
    assert "\n" not in str(e.value)
    folders = list((cache_home / "distill" / "images").glob("*/"))
    assert not shards(cache_home) and not [p for f in folders for p in f.iterdir()]  # no .tmp, no manifest
    bad.write_bytes(good)
    cfg, train, val = splits(photos)
    assert C.attach_cache(cfg, train, val).manifest["complete"]


def test_the_cache_setting_is_part_of_the_fingerprints_and_auto_follows_the_recipe(tmp_path):
    base = load_recipe(ROOT / "recipes/tiny-timm.yaml")
    cached = load_recipe(ROOT / "recipes/tiny-timm.yaml", ["data.cache=256"])
    assert teacher_fingerprint(base) != teacher_fingerprint(cached)
    assert teacher_fingerprint(cached) != teacher_fingerprint(load_recipe(ROOT / "recipes/tiny-timm.yaml",
                                                                          ["data.cache=128"]))
    assert stage_fingerprint(DataConfig(cache=None)) == stage_fingerprint(DataConfig())  # off: as before
    auto = load_recipe(ROOT / "recipes/tiny-timm.yaml", ["data.cache=auto"])
    assert C.max_side_of(auto) == 2 * 32  # 2 x teacher.input_size
    auto = load_recipe(ROOT / "recipes/tiny-timm.yaml", [
        "data.cache=auto", "students=[{name: s, model: 'timm:resnet10t', resolution: 48, fixres: {resolution: 80}}]"])
    assert C.max_side_of(auto) == 160
    assert C.max_side_of(DataConfig(cache="auto")) == 2 * C.DEFAULT_RESOLUTION
    for bad in ("8", "big", "[1]"):
        with pytest.raises(DistillError, match="data.cache: expected an integer in"):
            load_recipe(ROOT / "recipes/tiny-timm.yaml", [f"data.cache={bad}"])


@pytest.mark.slow
def test_teach_trains_from_the_cache(photos, tmp_path, cache_home):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache_home), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        ["distill", "teach", "recipes/tiny-timm.yaml", f"output_dir={tmp_path / 'runs'}", "name=cached",
         "data.source=imagefolder", f"data.root={photos}", "data.subset=null", "data.val_fraction=0.25",
         "data.cache=auto", "teacher.epochs=1", "teacher.batch_size=8", "targets.export=true", "targets.views=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "cached" / "teacher" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "cached" / "targets" / "manifest.json").is_file()
    manifests = list((cache_home / "distill" / "images").glob("*/manifest.json"))
    assert len(manifests) == 1 and '"max_side": 64' in manifests[0].read_text()
