"""Students' training views decoded, cropped and resized on the training device (`data.decode: device`).

The loader's workers only read each file's bytes (`EncodedReplay`, `collate`); the loop turns a batch into the
model's input where it trains (`pixels`): torchvision's `decode_jpeg` on the batch's JPEG files (nvJPEG, batched,
on a GPU; one at a time on a CPU, the same call), then per image the stored crop box, the resize, the flip and the
model's mean/std as tensor ops. The resize copies OpenCV's (store/views.py `render`, which the teacher's views
come from): bilinear and bicubic are torch's kernels without antialiasing, OpenCV's own, nearest takes OpenCV's
source pixels and area averages over OpenCV's boxes, so a view differs from the CPU path's by OpenCV's fixed-point
rounding, about 1 uint8 level at most (tests/test_device_decode.py). Other files (PNG, WebP, ...) are decoded on
the CPU by torchvision's decode_image, else PIL, and then go the same way.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from distill.data.decode import box_pixels
from distill.errors import DistillError

JPEG_MAGIC = b"\xff\xd8\xff"


def check(replay, where: str = "students") -> None:
    """Refuse, in one line naming the option to drop, what the device path does not do: a store's replayed
    augmentation or mixing, online KD (the teacher's own view), images that are not files, the decoded-image
    cache."""
    drop = "or drop data.decode: device"
    if replay.augment:
        raise DistillError(f"data.decode: device renders crop, resize and flip only; the store at {replay.store.path} "
                           f"replays targets.augment: export a store without targets.augment, {drop}")
    if replay.store.mixed:
        raise DistillError(f"data.decode: device does not mix views; the store at {replay.store.path} mixes them "
                           f"(targets.mix): export a store without targets.mix, {drop}")
    if replay.teacher_pre is not None:
        raise DistillError(f"{where}.kd.targets: online KD renders the teacher's view on the CPU; use "
                           f"kd.targets: cached, {drop}")
    for part in replay.samples.parts:
        if part.paths is None:
            raise DistillError(f"data.decode: device reads image files; {part.name or 'this source'} keeps its "
                               f"images in memory: {drop}")
        if getattr(part, "cache", None) is not None:
            raise DistillError(f"data.decode: device reads the original files, not data.cache's: drop data.cache, "
                               f"{drop}")


class EncodedReplay(Dataset):
    """A `ReplayDataset` whose items carry the file's bytes instead of pixels: (bytes uint8 [n], params float32 [5],
    path, label, teacher targets). The view, label and targets are the ReplayDataset's own (`view_of`, `set_epoch`
    included), so both paths train on the same rows."""

    def __init__(self, replay, where: str = "students"):
        check(replay, where)
        self.replay = replay
        self.paths = [path for part in replay.samples.parts for path in part.paths]

    @property
    def epoch(self) -> int:  # loaders.RepeatedViews moves the epoch stream of the dataset it wraps
        return self.replay.epoch

    def set_epoch(self, epoch: int) -> None:
        self.replay.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.replay)

    def __getitem__(self, i: int):
        r = self.replay
        row = r.store.row(i, r.view_of(i), r.temperature, r.standardized)
        data = torch.frombuffer(bytearray(Path(self.paths[i]).read_bytes()), dtype=torch.uint8)
        cached = {key: torch.from_numpy(np.asarray(row[key])) for key in ("logits", "logit_mean", "logit_std")}
        return data, torch.from_numpy(np.asarray(row["params"], np.float32)), self.paths[i], int(row["label"]), cached


class Encoded:
    """A batch of files: their bytes in one buffer (`data`, file b is data[offsets[b]:offsets[b + 1]]), each view's
    crop box and flip [B, 5], the paths. It has no `.to`, so accelerate's device placement leaves it on the CPU,
    where torchvision's decoders read their input."""

    def __init__(self, data: torch.Tensor, offsets: list[int], params: torch.Tensor, paths: list[str]):
        self.data, self.offsets, self.params, self.paths = data, offsets, params, paths

    def __len__(self) -> int:
        return len(self.paths)

    def files(self) -> list[torch.Tensor]:
        return [self.data[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def collate(items) -> tuple[Encoded, torch.Tensor, dict]:
    """`EncodedReplay` items → (Encoded, labels, targets): the batch as ReplayDataset's (x, label, targets), with
    the variable-length files joined into one tensor (one transfer from a worker, not one per file)."""
    data, params, paths, labels, cached = zip(*items)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).tolist()
    return Encoded(torch.cat(data), offsets, torch.stack(params), list(paths)), default_collate(labels), \
        default_collate(cached)


def pixels(encoded: Encoded, pre, device) -> torch.Tensor:
    """The batch as the model's normalised input on `device`: float32 [B, 3, S, S]."""
    return decode_batch(encoded.files(), encoded.params, pre, device, encoded.paths)


def decode_batch(files: list[torch.Tensor], params, pre, device, paths: list[str] | None = None) -> torch.Tensor:
    """Files (uint8 bytes on the CPU) and their views' params [B, 5] (y0, x0, y1, x1 as fractions, flip) → float32
    [B, 3, S, S] on `device`, normalised with pre.mean / pre.std, S = pre.input_size, resized by
    pre.interpolation as OpenCV resizes."""
    device = torch.device(device)
    images = decode(files, device, paths)
    size = pre.input_size
    boxes = torch.as_tensor(params).tolist()
    views = [view(image, box, size, pre.interpolation) for image, box in zip(images, boxes)]
    x = torch.stack(views).div_(255.0)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def decode(files: list[torch.Tensor], device: torch.device, paths: list[str] | None = None) -> list[torch.Tensor]:
    """uint8 [3, H, W] RGB images on `device`: JPEGs in one decode_jpeg call there, the others on the CPU."""
    paths = paths or [f"image {b} of the batch" for b in range(len(files))]
    jpeg = [b for b, f in enumerate(files) if bytes(f[:3].tolist()) == JPEG_MAGIC]
    images: list[torch.Tensor | None] = [None] * len(files)
    if jpeg:
        try:
            decoded = decode_jpeg([files[b] for b in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: find it, and name it
            decoded = [_decode_one(files[b], device, paths[b]) for b in jpeg]
        for b, image in zip(jpeg, decoded):
            images[b] = image
    for b in set(range(len(files))) - set(jpeg):
        images[b] = _decode_other(files[b], paths[b]).to(device)
    return images


def _decode_one(data: torch.Tensor, device: torch.device, path: str) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        raise DistillError(f"{path}: cannot decode JPEG ({e}); fix or remove the file, or set data.decode: cpu") \
            from None


def _decode_other(data: torch.Tensor, path: str) -> torch.Tensor:
    """A non-JPEG file on the CPU: decode_image (PNG, WebP, GIF, ...), else PIL (BMP, TIFF), as the CPU path
    reads it (16-bit values scaled to 8 bits)."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        from distill.data.images import read_image

        return torch.from_numpy(read_image(io.BytesIO(data.numpy().tobytes()))).permute(2, 0, 1).contiguous()
    if image.dtype != torch.uint8:  # a 16-bit PNG
        image = (image.float() / 257).round().to(torch.uint8)
    return image


def view(image: torch.Tensor, box: list[float], size: int, interpolation: str) -> torch.Tensor:
    """One view: the box's pixels (`decode.box_pixels`, as store/views.py renders), resized to size x size as OpenCV resizes,
    flipped when box[4] >= 0.5. float32 [3, size, size] in [0, 255], rounded to uint8 levels as OpenCV's output."""
    height, width = image.shape[-2:]
    y0, y1 = box_pixels(box[0], box[2], height)
    x0, x1 = box_pixels(box[1], box[3], width)
    crop = image[:, y0:y1, x0:x1].float()
    out = resize(crop, size, interpolation).round_().clamp_(0, 255)
    return out.flip(-1) if box[4] >= 0.5 else out


def resize(crop: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """float [3, h, w] → [3, size, size] as cv2.resize with the matching INTER_* flag."""
    h, w = crop.shape[-2:]
    if interpolation in ("bilinear", "bicubic"):
        # no antialiasing: OpenCV's INTER_LINEAR / INTER_CUBIC (a = -0.75, as torch's) take no box filter either
        return F.interpolate(crop[None], size=(size, size), mode=interpolation, align_corners=False)[0]
    if interpolation == "nearest":
        rows, cols = (_nearest(n, size, crop.device) for n in (h, w))
        return crop[:, rows][:, :, cols]
    if interpolation == "area":  # a weight matrix per axis, as OpenCV's INTER_AREA weighs the source pixels
        weights = _area if h >= size and w >= size else _area_enlarging
        rows, cols = (weights(n, size).to(crop.device) for n in (h, w))
        return torch.einsum("yh,chw,xw->cyx", rows, crop, cols)
    raise ValueError(f"interpolation {interpolation!r}: expected nearest, bilinear, bicubic or area")


def _nearest(n: int, size: int, device) -> torch.Tensor:
    # OpenCV's INTER_NEAREST source index: floor(x · (1 / (size / n))) in double precision
    scale = 1.0 / (size / n)
    return torch.tensor([min(math.floor(x * scale), n - 1) for x in range(size)], device=device)


def _area(n: int, size: int) -> torch.Tensor:
    """[size, n] when both sides shrink: output pixel i averages source [i · n / size, (i + 1) · n / size),
    partial pixels by their overlap."""
    scale = n / size
    edges = np.arange(size + 1) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    src = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(hi, src + 1) - np.maximum(lo, src), 0, None)
    return torch.from_numpy(overlap / scale).float()


def _area_enlarging(n: int, size: int) -> torch.Tensor:
    """[size, n] when a side grows: OpenCV's INTER_AREA then blends two source pixels, with its own weights
    (resize.cpp, `area_mode`): the output pixel starting in source pixel s takes the part of it past the pixel."""
    out = np.zeros((size, n))
    inverse = size / n
    scale = 1.0 / inverse  # as OpenCV computes it: n / size itself can round the other way at a pixel edge
    for i in range(size):
        s = math.floor(i * scale)
        f = (i + 1) - (s + 1) * inverse
        f = 0.0 if f <= 0 else f - math.floor(f)
        if s >= n - 1:
            s, f = n - 1, 0.0
        out[i, s] += 1 - f
        if f:
            out[i, s + 1] += f
    return torch.from_numpy(out).float()
