"""The decoded-image cache (data.cache): every image file decoded once, downscaled, in memory-mapped shards.

A recipe whose files are large photos (a 12-megapixel JPEG takes ~100 ms to decode) but whose stages train at
224 px or less spends most of every epoch decoding pixels it throws away. With `data.cache: <max side>` (or
`auto`) one pass decodes each file of the train, val and unlabeled splits once, shrinks it so its longer side
is at most the max side (never larger; INTER_AREA), and writes it into shards; every later stage and epoch
reads from there. In-memory splits (the builtins, hf's Arrow rows) are not cached.

Storage (data.cache_format): re-encoded JPEG (quality 95, 4:4:4) by default, or raw uint8 pixels. Measured on
300 photos of 640x480..1600x1200 (skimage photos with sensor grain, 58 MiB as JPEG q90), max side 448, one core,
reading and rendering a random crop (a quarter to all of the image) at 112 / 224 px, beside other jobs (load
average ~3): raw 129 MiB, 7,000 / 5,400 img/s; JPEG 20 MiB, 740 / 750 img/s; the original files 210 / 225
img/s; building either 110 img/s (an idle run: raw 13,200 / 7,900, JPEG at 4:2:0 15 MiB, 1,400 / 1,100, files
430 / 315). Raw is 7-9x faster but 6.5x larger (~440 KB an image at 448 px: 560 GB for ImageNet), and only
while it stays in the page cache; from disk each image is a 440 KB read. JPEG is a third of the original files,
fits any disk they fit on, and is still 3.5x faster to read than them, so it is the default; raw is for a cache
that fits in memory on a machine short of CPU cores. 4:4:4, not 4:2:0: subsampled chroma cost small cached
images ~3 levels on average against the full decode (tests/test_cache.py), for 25% fewer bytes.

Where: `<data.cache_dir>/<fingerprint[:16]>/` (default $XDG_CACHE_HOME/distill/images/), so runs and sweeps on
the same files share one. The fingerprint covers the format version, max side, storage, data.max_image_pixels,
data.decode_scaled and every file's absolute path, size and mtime_ns: a changed file or another max side is another cache (an old
one is left for `rm -r`). A shard is data bytes, its index (offset, length, h, w per image) and the image count;
manifest.json lists each shard's bytes, sha256 and mtime_ns and is rewritten after each shard (complete: true
last), so an interrupted pass resumes at the first missing shard.

Checks: the soft-target store hashes every shard whenever a stage opens it (`TargetStore.verify`, ~1 s per
GB). A cache can be tens of GB and is opened by every stage, so here an open stats each shard: a size that
differs is damage; a shard whose mtime_ns differs from the manifest's (anything that wrote to it) is hashed
in full. Damage is repaired (those shards are decoded again, with a warning line naming them) by the process
that may build, refused with one `error:` line by any other. A JPEG that fails to decode at read names its
shard. Only the local main process builds (others wait, then open); a flock on `<cache>.lock` keeps two runs
from writing the same cache, while reading a complete one takes no lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from distill.data.decode import draft
from distill.data.headers import read_headers
from distill.data.images import read_image, user_cache
from distill.disk import agree, check_free, remove, writing
from distill.errors import DistillError

VERSION = 1
STORAGE = "jpeg"  # data.cache_format's default
QUALITY = 95
MANIFEST = "manifest.json"
SHARD_BYTES = 256 * 2**20  # about this much per shard (from the estimate)
JPEG_BYTES_PER_PIXEL = 0.5  # the size estimate at quality 95; measured 0.24-0.33 on photos, so it errs high
AUTO_FACTOR = 2  # data.cache: auto = this x the largest input size of any stage
DEFAULT_RESOLUTION = 224  # a stage whose size comes from its model's config (unknown before it is built)
FIX = "delete the folder, or set data.cache: null"


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else user_cache("images")


def max_side_of(cfg) -> int | None:
    """data.cache as a number of pixels (None: off); `cfg` a Recipe, or a DataConfig (`auto`: 2 x 224)."""
    data = getattr(cfg, "data", cfg)
    if data.cache != "auto":
        return data.cache
    if not hasattr(cfg, "data"):
        return AUTO_FACTOR * DEFAULT_RESOLUTION
    sizes = [cfg.teacher.input_size or DEFAULT_RESOLUTION]
    for s in cfg.students:
        sizes += [s.resolution or DEFAULT_RESOLUTION] + ([s.fixres.resolution] if s.fixres else [])
    return AUTO_FACTOR * max(sizes)


def attach_cache(cfg, *splits, accelerator=None):
    """Give the file-backed `splits` (None entries allowed) the cache of data.cache, building it first when it
    is missing, incomplete or damaged; returns the ImageCache, or None when data.cache is off or no split reads
    files. Every process calls it; only the local main process builds."""
    data, side = getattr(cfg, "data", cfg), max_side_of(cfg)
    file_splits = [s for s in splits if s is not None and s.paths is not None]
    if side is None or not file_splits:
        return None
    files = sorted({os.path.abspath(p) for s in file_splits for p in s.paths})
    may_build = accelerator is None or accelerator.is_local_main_process
    cache, message = None, None
    args = files, side, data.max_image_pixels, getattr(data, "decode_scaled", True), cache_root(data.cache_dir)
    if may_build:
        try:
            cache = open_cache(*args, build=True, storage=data.cache_format)
        except DistillError as e:
            message = str(e)
    if accelerator is not None:  # a collective: the other processes wait here for the build
        message = agree(accelerator, message)
    if message:
        raise DistillError(message)
    if cache is None:
        cache = open_cache(*args, build=False, storage=data.cache_format)
    row = {p: i for i, p in enumerate(files)}
    for s in file_splits:
        s.cache, s.cache_rows = cache, np.array([row[os.path.abspath(p)] for p in s.paths], dtype=np.int64)
    return cache


def fingerprint(files: list[str], side: int, max_pixels: int, scaled: bool, storage: str = STORAGE) -> str:
    h = hashlib.sha256(json.dumps([VERSION, side, storage, QUALITY if storage == "jpeg" else None,
                                   max_pixels, scaled]).encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DistillError(f"data.cache: {path}: cannot read it ({e.strerror or e}); restore the file, or "
                               "run again without it") from None
        h.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def open_cache(files: list[str], side: int, max_pixels: int, scaled: bool, root: Path, build: bool,
               storage: str = STORAGE) -> ImageCache:
    """The complete cache of `files` at `side`, built (or repaired) under the folder's lock when `build`;
    `scaled` (data.decode_scaled): a JPEG is decoded at 1/2..1/8 scale when that still covers its cached size."""
    fp = fingerprint(files, side, max_pixels, scaled, storage)
    folder = root / fp[:16]
    manifest, damaged = _check(folder, fp)
    if manifest is not None and manifest.get("complete") and not damaged:
        return ImageCache(folder, manifest)
    if not build:
        raise DistillError(f"data.cache: {folder / damaged[0] if damaged else folder} is "
                           f"{'damaged' if damaged else 'incomplete'}; run again to rebuild it, or {FIX}")
    with _locked(folder):
        manifest, damaged = _check(folder, fp)  # another run may have built it while this one waited
        if manifest is None or not manifest.get("complete") or damaged:
            for name in damaged:
                print(f"warning: data.cache: {folder / name} is damaged (its size or sha256 differs from the "
                      "manifest); decoding its images again", file=sys.stderr)
            manifest = _build(folder, fp, files, side, (max_pixels, scaled), storage, manifest, damaged)
    return ImageCache(folder, manifest)


@contextlib.contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data.cache: waiting for another process that is building {folder}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's close


def _check(folder: Path, fp: str) -> tuple[dict | None, list[str]]:
    """(manifest of this fingerprint or None, names of its listed shards that are damaged or missing)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None, []
    if manifest.get("fingerprint") != fp or manifest.get("version") != VERSION:
        return None, []
    damaged = []
    for entry in manifest["shards"]:
        if entry is None:
            continue
        path = folder / entry["file"]
        try:
            st = path.stat()
        except OSError:
            damaged.append(entry["file"])
            continue
        if st.st_size != entry["bytes"] or (st.st_mtime_ns != entry["mtime_ns"] and _sha256(path) != entry["sha256"]):
            damaged.append(entry["file"])
    return manifest, damaged


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def target_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the longer side at most `side`, the aspect kept; never larger than the image."""
    scale = min(1.0, side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _build(folder: Path, fp: str, files: list[str], side: int, decoding: tuple, storage: str,
           manifest: dict | None, damaged: list[str]) -> dict:
    targets = [target_size(w, h, side) for _, w, h, _ in read_headers(files)]
    per_pixel = 3 if storage == "raw" else JPEG_BYTES_PER_PIXEL
    estimate = np.array([w * h * per_pixel + 32 for w, h in targets])
    per_shard = max(1, int(SHARD_BYTES // max(estimate.mean(), 1)))
    if manifest is None or manifest.get("shard_images") != per_shard:
        remove(folder)
        manifest = {"version": VERSION, "fingerprint": fp, "max_side": side, "storage": storage,
                    "quality": QUALITY if storage == "jpeg" else None, "num_images": len(files),
                    "shard_images": per_shard, "complete": False,
                    "shards": [None] * -(-len(files) // per_shard)}
    manifest["complete"] = False
    manifest["shards"] = [None if e is None or e["file"] in damaged else e for e in manifest["shards"]]
    todo = [s for s, e in enumerate(manifest["shards"]) if e is None]
    need = sum(estimate[s * per_shard:(s + 1) * per_shard].sum() for s in todo)
    check_free(folder, need, f"data.cache ({len(files)} images at max side {side}, {storage})",
               "free some space, point data.cache_dir at another disk, or lower data.cache")
    folder.mkdir(parents=True, exist_ok=True)
    from distill.runs import write_json  # here: distill.runs imports the recipe, which imports distill.data

    for s in todo:
        first = s * per_shard
        rows = range(first, min(first + per_shard, len(files)))
        manifest["shards"][s] = _write_shard(folder, s, [files[i] for i in rows], [targets[i] for i in rows],
                                             decoding, storage)
        write_json(folder / MANIFEST, manifest)  # after each shard: an interrupted pass resumes from here
    manifest["complete"] = True
    write_json(folder / MANIFEST, manifest)
    return manifest


def _write_shard(folder: Path, s: int, files: list[str], targets: list, decoding: tuple, storage: str) -> dict:
    name = f"shard-{s:05d}.bin"
    path, tmp = folder / name, folder / f".{name}.tmp"
    index, offset, digest = np.zeros((len(files), 4), np.int64), 0, hashlib.sha256()
    with writing(path, tmp, what="data.cache", hint=f"nothing of that shard is kept; {FIX}"), open(tmp, "wb") as f:
        for i, (file, target) in enumerate(zip(files, targets)):
            image = decode(file, target, *decoding)
            blob = image.tobytes() if storage == "raw" else encode_jpeg(image)
            index[i] = offset, len(blob), image.shape[0], image.shape[1]
            offset += len(blob)
            for part in (blob,) if i < len(files) - 1 else (blob, index.tobytes(), np.int64(len(files)).tobytes()):
                f.write(part)
                digest.update(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    st = path.stat()
    return {"file": name, "images": len(files), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": digest.hexdigest()}


def decode(path: str, target: tuple[int, int], max_pixels: int, scaled: bool = True) -> np.ndarray:
    """The file at `path` decoded (`scaled`: a JPEG at 1/2..1/8 scale when `target` allows) and shrunk to
    `target` (width, height) with INTER_AREA."""
    try:
        image = read_image(path, max_pixels, need=target if scaled else None)
    except DistillError as e:
        why = str(e).split("; fix or remove", 1)[0]
        raise DistillError(f"data.cache: {why}, though its header and end passed the check (the damage is inside "
                           "it, so data.on_bad_image: skip could not leave it out); remove or replace the file and "
                           "run again") from None
    if image.shape[1] > target[0] or image.shape[0] > target[1]:
        image = cv2.resize(image, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def encode_jpeg(image: np.ndarray) -> bytes:
    # 4:4:4: no chroma subsampling, which at 4:2:0 costs a small cached image ~3 levels on average
    _, blob = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [
        cv2.IMWRITE_JPEG_QUALITY, QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    return blob.tobytes()


class ImageCache:
    """A complete cache, memory-mapped: `load(row, need)` and `size(row)` of the sorted files it was built from."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.storage = manifest["storage"]
        self.files = [e["file"] for e in manifest["shards"]]
        parts = []
        for s, name in enumerate(self.files):
            with open(self.folder / name, "rb") as f:  # the index is at the shard's end, before its image count
                f.seek(-8, os.SEEK_END)
                n = int(np.frombuffer(f.read(8), np.int64)[0])
                f.seek(-8 - 32 * n, os.SEEK_END)
                index = np.frombuffer(f.read(32 * n), np.int64).reshape(n, 4)
            parts.append(np.column_stack([np.full(n, s, np.int64), index]))
        self.index = np.concatenate(parts) if parts else np.zeros((0, 5), np.int64)  # shard, offset, bytes, h, w
        self._maps = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # DataLoader workers map the shards they read themselves
        return {**self.__dict__, "_maps": {}}

    def _map(self, s: int) -> np.memmap:
        if s not in self._maps:
            self._maps[s] = np.memmap(self.folder / self.files[s], dtype=np.uint8, mode="r")
        return self._maps[s]

    def size(self, row: int) -> tuple[int, int]:
        return int(self.index[row, 3]), int(self.index[row, 4])

    def load(self, row: int, need: tuple[int, int] | None = None) -> np.ndarray:
        s, offset, length, h, w = (int(v) for v in self.index[row])
        blob = self._map(s)[offset:offset + length]
        if self.storage == "raw":
            return np.array(blob).reshape(h, w, 3)
        try:
            with Image.open(io.BytesIO(blob)) as img:
                draft(img, need)  # at 1/2, 1/4 or 1/8 scale, still at least `need`
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DistillError(f"data.cache: image {row} in {self.folder / self.files[s]} cannot be decoded ({e}): "
                               f"the shard is damaged; {FIX}") from None
