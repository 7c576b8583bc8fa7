"""data.decode: device: a batch decoded, cropped and resized as tensor ops matches the CPU path's views; what it
refuses; a student trains with it end to end."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from distill import store
from distill.data import Preprocess, Split
from distill.data import device_decode as dd
from distill.errors import DistillError
from distill.recipe import TargetsConfig

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((640, 480), (1600, 1200))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the largest difference from the CPU path (OpenCV) a view may have, in uint8 levels: OpenCV resizes in fixed
# point, torch in float; both round to uint8 (measured over 32 views: max 1; mean 0.11 bilinear, < 0.001 the others)
MAX_LEVELS, MEAN_LEVELS = 1.0, 0.2


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """root/<class>/*: astronaut and chelsea as JPEG (quality 90) at 640x480 and 1600x1200, and one PNG."""
    root = tmp_path_factory.mktemp("photos")
    for name, image in (("astronaut", skdata.astronaut()), ("cat", skdata.chelsea())):
        (root / name).mkdir()
        for w, h in SIZES:
            Image.fromarray(image).resize((w, h), Image.BICUBIC).save(root / name / f"{w}.jpg", quality=90)
    Image.fromarray(skdata.chelsea()).resize((320, 240)).save(root / "cat" / "small.png")
    return root


def make_store(out: Path, split: Split, spec: TargetsConfig, seed: int = 0, mixed: bool = False) -> store.TargetStore:
    """A complete store of random logits whose rows are `spec`'s views of `split`'s images."""
    n, k = len(split), len(split.classes)
    rows = spec.views + 1
    params = torch.from_numpy(np.concatenate([store.view_params(spec, seed, i, *split.load(i).shape[:2])
                                              for i in range(n)]))
    logits = torch.randn(n * rows, k, generator=torch.Generator().manual_seed(0))
    spec_logits = store.logits_spec(spec, k)
    out.mkdir(parents=True, exist_ok=True)
    store.write_shard(out, 0, 0, n, "test", {}, spec_logits, logits, params, torch.from_numpy(split.labels))
    sha = json.loads((out / "shard-00000.json").read_text())["sha256"]
    views = store.view_spec(spec, seed)
    if mixed:
        views["mix"] = {"mixup_alpha": 1.0}
    manifest = {"format": "distill-targets", "version": store.FORMAT_VERSION, "complete": True, "fingerprint": "test",
                "num_samples": n, "num_labeled": n, "num_unlabeled": 0, "views": spec.views,
                "rows_per_sample": rows, "center_view": spec.views, "shard_size": n, "num_classes": k,
                "classes": split.classes, "logits": spec_logits, "view_spec": views,
                "shards": [{"file": "shard-00000.safetensors", "first_sample": 0, "num_samples": n, "rows": n * rows,
                            "sha256": sha}]}
    (out / store.MANIFEST).write_text(json.dumps(manifest))
    return store.TargetStore(out)


def photo_split(root: Path) -> Split:
    paths = sorted(str(p) for p in root.glob("*/*"))
    split = Split(["astronaut", "cat"], [0 if "/astronaut/" in p else 1 for p in paths], paths=paths, name=str(root))
    split.decode_scaled = False  # the CPU path at full size: the comparison is of the resize alone
    return split


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised images in uint8 levels."""
    return ((a - b) * torch.tensor(STD).view(3, 1, 1) * 255).abs()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "area", "nearest"])
@pytest.mark.parametrize("size", [224, 64])
def test_a_device_batch_matches_the_cpu_rendering_of_the_same_rows(photos, tmp_path, interpolation, size):
    split = photo_split(photos)
    reader = make_store(tmp_path / "targets", split, TargetsConfig(views=4, scale=(0.08, 1.0)))
    pre = Preprocess(input_size=size, mean=MEAN, std=STD, interpolation=interpolation)
    replay = store.ReplayDataset(reader, store.Samples(split), pre, seed=3)
    encoded = dd.EncodedReplay(replay)
    for epoch in range(3):
        replay.set_epoch(epoch)
        batch = dd.collate([encoded[i] for i in range(len(encoded))])
        x = dd.pixels(batch[0], pre, "cpu")
        assert x.shape == (len(split), 3, size, size) and x.dtype == torch.float32
        for i in range(len(split)):
            cpu_x, label, cached = replay[i]
            assert batch[1][i] == label and torch.equal(batch[2]["logits"][i], cached["logits"])
            diff = levels(x[i], cpu_x)
            if interpolation == "nearest":  # the same source pixels: equal
                assert diff.max() < 1e-3, (split.paths[i], epoch)
            else:
                assert diff.max() <= MAX_LEVELS + 1e-3 and diff.mean() <= MEAN_LEVELS, (split.paths[i], epoch,
                                                                                         float(diff.mean()))


def test_png_and_grey_files_are_decoded_on_the_cpu(photos, tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(skdata.camera()).save(grey, quality=90)
    png16 = tmp_path / "deep.png"
    Image.fromarray(skdata.camera().astype(np.uint16) * 257).save(png16)  # 16-bit grey
    files = [photos / "cat" / "small.png", grey, png16]
    pre = Preprocess(input_size=48, mean=MEAN, std=STD, interpolation="bilinear")
    box = np.array([[0.1, 0.2, 0.9, 0.7, 1.0]] * len(files), np.float32)
    x = dd.decode_batch([torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files], box, pre,
                        "cpu")
    split = Split(["a"], [0] * len(files), paths=files)
    for i in range(len(files)):
        expected = store.to_tensor(store.render(split.load(i), box[i], 48, "bilinear"), pre)
        assert levels(x[i], expected).max() <= MAX_LEVELS + 1e-3, files[i]


def test_a_broken_jpeg_names_its_file(tmp_path, photos):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((photos / "cat" / "640.jpg").read_bytes()[:400])
    pre = Preprocess(input_size=32, mean=MEAN, std=STD)
    with pytest.raises(DistillError, match=r"bad\.jpg: cannot decode JPEG"):
        dd.decode_batch([torch.frombuffer(bytearray(bad.read_bytes()), dtype=torch.uint8)],
                        np.array([[0, 0, 1, 1, 0]], np.float32), pre, "cpu", [str(bad)])


def test_what_the_device_path_cannot_do_is_refused_in_one_line(photos, tmp_path):
    split = photo_split(photos)
    pre = Preprocess(input_size=32, mean=MEAN, std=STD)
    plain = make_store(tmp_path / "plain", split, TargetsConfig(views=2))

    augmented = make_store(tmp_path / "augmented", split,
                           TargetsConfig(views=2, augment=[{"name": "Rotate", "limit": 30}]))
    with pytest.raises(DistillError, match=r"^data\.decode: device .*targets\.augment.*drop data\.decode: device$"):
        dd.EncodedReplay(store.ReplayDataset(augmented, store.Samples(split), pre))

    mixed = make_store(tmp_path / "mixed", split, TargetsConfig(views=2), mixed=True)
    with pytest.raises(DistillError, match=r"^data\.decode: device .*targets\.mix.*drop data\.decode: device$"):
        dd.EncodedReplay(store.ReplayDataset(mixed, store.Samples(split), pre))

    with pytest.raises(DistillError, match=r"^students\.kd\.targets: online KD .*kd\.targets: cached"):
        dd.EncodedReplay(store.ReplayDataset(plain, store.Samples(split), pre, teacher_pre=pre))

    in_memory = Split(["a", "b"], split.labels, images=np.zeros((len(split), 8, 8, 3), np.uint8), name="mem")
    with pytest.raises(DistillError, match=r"^data\.decode: device reads image files; mem keeps its images in memory"):
        dd.EncodedReplay(store.ReplayDataset(plain, store.Samples(in_memory), pre))

    cached = photo_split(photos)
    cached.cache, cached.cache_rows = object(), np.arange(len(cached))
    with pytest.raises(DistillError, match=r"^data\.decode: device reads the original files.*drop data\.cache"):
        dd.EncodedReplay(store.ReplayDataset(plain, store.Samples(cached), pre))


@pytest.mark.parametrize("extra, message", [
    ({"data": {"source": "digits"}}, r"^data\.decode: device reads image files; data\.source digits"),
    ({"data": {"cache": 256}}, r"^data\.decode: device reads the original files.*drop data\.cache"),
    ({"targets": {"augment": [{"name": "Rotate", "limit": 30}]}}, r"targets\.augment is set"),
    ({"targets": {"mix": {"cutmix_alpha": 1.0}}}, r"targets\.mix is set"),
    ({"students": [{"name": "s", "model": "timm:resnet10t", "kd": {"targets": "online"}}]},
     r"^students\.0\.kd\.targets: online KD"),
])
def test_the_recipe_refuses_device_decoding_before_any_stage(extra, message):
    """The same refusals at recipe load: a later online student must not fail after the first one trained."""
    from distill.recipe import recipe_from_dict

    recipe_from_dict({"name": "x", "data": {"source": "imagefolder", "root": "/photos", "decode": "device"},
                      "teacher": {"model": "timm:resnet10t"}})  # files, cached KD: accepted

    raw = {"name": "x", "data": {"source": "imagefolder", "root": "/photos", "decode": "device"},
           "teacher": {"model": "timm:resnet10t"}}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(DistillError, match=message):
        recipe_from_dict(raw)


def test_a_batch_stays_on_the_cpu_through_accelerate(photos, tmp_path):
    """accelerate moves batches to its device: the files must stay where torchvision's decoders read them."""
    from accelerate.utils import send_to_device

    split = photo_split(photos)
    reader = make_store(tmp_path / "t", split, TargetsConfig(views=2))
    encoded = dd.EncodedReplay(store.ReplayDataset(reader, store.Samples(split), Preprocess(32, MEAN, STD)))
    loader = torch.utils.data.DataLoader(encoded, batch_size=3, collate_fn=dd.collate)
    batch = send_to_device(next(iter(loader)), "meta")
    assert isinstance(batch[0], dd.Encoded) and batch[0].data.device.type == "cpu" and len(batch[0]) == 3
    assert batch[1].device.type == "meta"


@pytest.mark.slow
def test_learn_on_an_imagefolder_with_device_decode(tmp_path):
    """A tiny teacher and store on a folder of JPEGs, then a student with data.decode=device (and channels-last)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("astronaut", "cat")):
        base = np.asarray(Image.fromarray((skdata.astronaut(), skdata.chelsea())[c]).resize((64, 48)))
        (root / name).mkdir(parents=True)
        for j in range(12):
            noisy = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{j}.jpg", quality=90)
    common = [f"output_dir={tmp_path / 'runs'}", "data.source=imagefolder", f"data.root={root}",
              "data.val_fraction=0.25", "teacher.epochs=1", "teacher.input_size=32", "teacher.batch_size=8",
              "teacher.hf_config={image_size: 32, patch_size: 8}", "targets.views=2", "log.progress=false",
              "threads=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["distill", "teach", "recipes/tiny-vit.yaml", *common], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    student = [("students=[{name: dev, model: 'timm:resnet10t', resolution: 32, epochs: 2, batch_size: 6, "
                "channels_last: true}]"), "data.decode=device"]
    r = subprocess.run(["distill", "learn", "recipes/tiny-vit.yaml", *common, *student], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "tiny-vit" / "students" / "dev" / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["train_images"] == 18
    assert (tmp_path / "runs" / "tiny-vit" / "students" / "dev" / "model.safetensors").is_file()
