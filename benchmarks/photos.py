"""Photos at speed: a folder of real JPEG photos at camera-like sizes, and how fast the student's replay reads them.

    python benchmarks/photos.py OUT [--count 2000] [--seed 0]             # write OUT/<class>/<i>.jpg
    python benchmarks/photos.py OUT --measure [--images 200] [--sizes 112 224]

The photos are the RGB photographs that ship with scikit-image (one class each: astronaut, coffee, chelsea,
rocket, motorcycle, hubble, retina, immunohistochemistry), each one a random crop, scale (upscaling allowed), flip
and colour shift of its photo, saved as JPEG quality 90 at a size drawn from 500x375 ... 1600x1200, either
orientation. The same (count, seed) gives the same bytes; OUT holding them already (its .photos.json) is kept.

--measure: decode + render images/s on one core (OMP_NUM_THREADS=1, torch 1 thread) through `ReplayDataset` over a
tiny store of the photos (4 views + center), full decode against scaled decode (data.decode_scaled), alternating,
best of 3 passes each, at each size; then the decoders alone from bytes in memory (PIL's draft against simplejpeg and
PyTurboJPEG, when installed), best of 2. Prints the numbers and the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# scikit-image's RGB photographs (offline, in its package data); stereo_motorcycle is a (left, right, disparity)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
          "immunohistochemistry")
SIZES = ((500, 375), (640, 480), (800, 600), (1024, 768), (1600, 1200))  # (width, height), landscape
MARKER = ".photos.json"  # hidden: image_files skips it


def source_photos() -> dict[str, np.ndarray]:
    """{class name: H x W x 3 uint8} of the scikit-image photos."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image
        out[name.removesuffix("_deep_field").removeprefix("stereo_")] = np.ascontiguousarray(image[..., :3])
    return out


def photo(source: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One random photo of `source`: a crop of 50-100% of each side at the output's aspect, a colour shift,
    resized (up or down) to a camera size, maybe flipped."""
    width, height = SIZES[rng.integers(len(SIZES))]
    if rng.random() < 0.5:
        width, height = height, width
    h, w = source.shape[:2]
    side = rng.uniform(0.5, 1.0)
    aspect = width / height
    ch = min(h, w / aspect) * side
    cw = ch * aspect
    y, x = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
    crop = source[int(y):int(y + ch), int(x):int(x + cw)].astype(np.float32)
    crop = crop * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)  # per-channel gain and offset
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def make_photos(out: str | os.PathLike, count: int = 2000, seed: int = 0) -> Path:
    """Write `count` photos to out/<class>/<i>.jpg (classes in turn), deterministic for `seed`; kept when out's
    marker says it holds these already. Returns out."""
    out = Path(out)
    marker = {"count": count, "seed": seed, "photos": list(PHOTOS), "sizes": [list(s) for s in SIZES]}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    (out / MARKER).unlink(missing_ok=True)
    sources = source_photos()
    names = sorted(sources)
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name = names[i % len(names)]
        photo(sources[name], np.random.default_rng([seed, i])).save(out / name / f"{i:05d}.jpg", quality=90)
    (out / MARKER).write_text(json.dumps(marker))
    return out


def tiny_store(out: Path, samples, spec, seed: int = 0, num_classes: int = 8):
    """A complete store of `spec.views` random views + the center view per sample, with random logits: what
    `ReplayDataset` reads (the boxes are the real draws on each image's full size)."""
    import torch

    from distill import store

    n, rows = len(samples), spec.views + 1
    params = np.concatenate([store.view_params(spec, seed, i, *samples.size(i)) for i in range(n)])
    logits = torch.randn(n * rows, num_classes, generator=torch.Generator().manual_seed(seed))
    spec_logits = store.logits_spec(spec, num_classes)
    out.mkdir(parents=True, exist_ok=True)
    store.write_shard(out, 0, 0, n, "bench", {}, spec_logits, logits, torch.from_numpy(params),
                      torch.from_numpy(samples.labels).repeat_interleave(rows))
    info = json.loads((out / "shard-00000.json").read_text())
    manifest = {"format": "distill-targets", "version": store.FORMAT_VERSION, "complete": True,
                "fingerprint": "bench", "num_samples": n, "num_labeled": n, "num_unlabeled": 0, "views": spec.views,
                "rows_per_sample": rows, "center_view": spec.views, "shard_size": n, "num_classes": num_classes,
                "classes": [str(c) for c in range(num_classes)], "logits": spec_logits,
                "view_spec": store.view_spec(spec, seed),
                "shards": [{"file": "shard-00000.safetensors", "first_sample": 0, "num_samples": n, "rows": rows * n,
                            "sha256": info["sha256"]}]}
    (out / store.MANIFEST).write_text(json.dumps(manifest))
    return store.TargetStore(out)


def spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over n (the folder is sorted by class: every class and size is timed)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))


def replay_rates(folder: Path, size: int, images: int, work: Path, repeats: int = 3) -> dict[str, float]:
    """Images/s of ReplayDataset (decode, crop, resize, normalise) over `images` photos at `size` px, full decode and
    scaled decode: passes alternate between the two, the best pass of each counts (the machine is shared)."""
    from distill.data import Preprocess, imagefolder
    from distill.recipe import DataConfig, TargetsConfig
    from distill.store import ReplayDataset, Samples

    split, _ = imagefolder.load(DataConfig(source="imagefolder", root=str(folder)))
    split = split.subset(spread(len(split), images))
    samples = Samples(split)
    reader = tiny_store(work / "store", samples, TargetsConfig(views=4))
    pre = Preprocess(input_size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ds = ReplayDataset(reader, samples, pre, seed=0)
    ds[0]  # warm-up: imports, the shard's memory map
    best = {"full": 0.0, "scaled": 0.0}
    for _ in range(repeats):
        for mode in ("full", "scaled"):
            split.decode_scaled = mode == "scaled"
            start = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            best[mode] = max(best[mode], len(ds) / (time.perf_counter() - start))
    return best


def decoder_rates(paths: list[str], size: int) -> dict[str, float]:
    """Images/s of each decoder alone at the reduction PIL's draft picks for a full-image `size` px view."""
    from distill.data.decode import draft

    data = [Path(p).read_bytes() for p in paths]
    rates = {}

    def timed(name, decode):  # best of 2 passes
        decode(data[0])
        for _ in range(2):
            start = time.perf_counter()
            for blob in data:
                decode(blob)
            rates[name] = max(rates.get(name, 0.0), len(data) / (time.perf_counter() - start))

    def pil(blob, scaled=True):
        import io
        with Image.open(io.BytesIO(blob)) as img:
            if scaled:
                draft(img, (size, size))
            return np.asarray(img.convert("RGB"))

    timed("pil_full", lambda b: pil(b, False))
    timed("pil_draft", pil)
    try:
        import simplejpeg

        def sj(blob):
            h, w = simplejpeg.decode_jpeg_header(blob)[:2]
            factor = max([f for f in (1, 2, 4, 8) if min(w // f, h // f) >= size] or [1])
            return simplejpeg.decode_jpeg(blob, "RGB", min_height=h // factor, min_width=w // factor)
        timed("simplejpeg_full", lambda b: simplejpeg.decode_jpeg(b, "RGB"))
        timed("simplejpeg_scaled", sj)
    except ImportError:
        rates["simplejpeg"] = None
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        tj = TurboJPEG()

        def turbo(blob):
            w, h = tj.decode_header(blob)[:2]
            factor = max([f for f in (1, 2, 4, 8) if min(w // f, h // f) >= size] or [1])
            return tj.decode(blob, pixel_format=TJPF_RGB, scaling_factor=(1, factor))
        timed("turbojpeg_full", lambda b: tj.decode(b, pixel_format=TJPF_RGB))
        timed("turbojpeg_scaled", turbo)
    except (ImportError, RuntimeError, OSError):
        rates["turbojpeg"] = None
    return rates


def measure(folder: Path, sizes: list[int], images: int) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(1)
    from distill.data.images import image_files

    out = {"load_before": os.getloadavg()[0], "images": images, "replay": {}, "decoders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            rates = replay_rates(folder, size, images, Path(tmp) / str(size))
            out["replay"][f"{size}px"] = {**{k: round(v, 1) for k, v in rates.items()},
                                          "speed-up": round(rates["scaled"] / rates["full"], 2)}
    files = image_files(folder)
    paths = [files[i] for i in spread(len(files), images)]
    for size in sizes:
        out["decoders"][f"{size}px"] = {k: None if v is None else round(v, 1)
                                        for k, v in decoder_rates(paths, size).items()}
    out["load_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--images", type=int, default=200, help="photos timed by --measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    args = parser.parse_args()
    start = time.perf_counter()
    folder = make_photos(args.out, args.count, args.seed)
    print(f"{args.count} photos in {folder} ({time.perf_counter() - start:.1f} s)", flush=True)
    if args.measure:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(folder, args.sizes, args.images), indent=2))


if __name__ == "__main__":
    main()
