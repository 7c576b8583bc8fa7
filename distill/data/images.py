"""Images on disk: the file extensions read, finding them, decoding them to RGB uint8, a disk source's root."""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data.decode import draft
from distill.errors import DistillError
from distill.recipe import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# data.max_image_pixels' default, PIL's own Image.MAX_IMAGE_PIXELS (where it warns of a decompression bomb)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_PIL_LIMIT = threading.Lock()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey → 3 equal channels (so RGB models accept it), RGBA → RGB; a 3-channel image is returned as is."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3] if image.shape[2] == 4 else image


def user_cache(name: str) -> Path:
    """distill's folder `name` in the user's cache: $XDG_CACHE_HOME/distill/<name> (default ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distill" / name


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image at `path`, from its header."""
    try:
        with open_unlimited(path) as img:
            return img.size[1], img.size[0]
    except (OSError, ValueError) as e:
        raise DistillError(f"{path}: cannot read image ({e}); fix or remove the file, or set "
                           "data.on_bad_image: skip to leave such files out") from None


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               need: tuple[int, int] | None = None) -> np.ndarray:
    """The image at `path` as H x W x 3 uint8 RGB; one DistillError line naming the file when it cannot be read,
    or when its width x height is over `max_pixels` (data.max_image_pixels), found from the header before decoding.
    `need` (width, height): a JPEG is decoded at the smallest of 1, 1/2, 1/4, 1/8 of its size that is still at
    least that (distill.data.decode); other formats, and None, at full size."""
    try:
        with open_unlimited(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(over_limit(width, height, max_pixels))
            draft(img, need)
            with warnings.catch_warnings():  # PIL's bomb check of a GIF/WebP frame: our error, not a warning
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if img.mode.startswith("I"):
                    # 16-bit grey (PNG, TIFF): PIL's convert("RGB") clips to 255 instead of scaling.
                    grey = np.clip(np.asarray(img, dtype=np.float32), 0, 65535) / 257
                    return to_rgb(np.round(grey).astype(np.uint8))
                # an RGB image (most JPEGs) as it is: convert("RGB") would copy it once more
                return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DistillError(f"{path}: cannot read image ({e}); fix or remove the file, or set "
                           "data.on_bad_image: skip to leave such files out") from None


def over_limit(width: int, height: int, max_pixels: int) -> str:
    return f"{width} x {height} = {width * height} pixels, over data.max_image_pixels ({max_pixels})"


def open_unlimited(fp) -> Image.Image:
    """PIL's Image.open (the header only) without PIL's own pixel limit, so the caller can apply
    data.max_image_pixels to the size read. PIL's limit is a module global (a warning above it, an error above
    twice it, at open): it is lifted under a lock, for the header read only."""
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def image_files(folder: Path) -> list[str]:
    """The images under `folder`, recursively, sorted (os.walk order is the filesystem's; sorting makes
    splits reproducible). Hidden folders and files are skipped: .ipynb_checkpoints holds copies, and
    macOS's ._x.jpg files are metadata that PIL cannot read."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, f) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(found)


def required_root(cfg: DataConfig, what: str) -> Path:
    """data.root of a source that reads files (imagefolder, csv), which must exist; `what` says what to give."""
    if cfg.root is None:
        raise DistillError(f"data.root: required for data.source {cfg.source}; give {what}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DistillError(f"data.root: {root} does not exist; give {what}")
    return root
