"""The Fashion-MNIST idx files: where they are looked for, the download fallback, and the idx parser."""
from __future__ import annotations

import contextlib
import functools
import gzip
import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np

from distill.errors import DistillError

# Where Fashion-MNIST is looked for after data.root and $DISTILL_DATA (module constants so tests can move them).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/distill/fashion-mnist").expanduser()
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_fashion_mnist(root: str | None) -> Path:
    """The folder holding the four idx files: data.root, else $DISTILL_DATA, the system copy, the cache."""
    if root is not None:
        base = Path(root).expanduser()
        if not base.exists():
            raise DistillError(f"data.root: {base} does not exist; point it at a folder holding the "
                               "Fashion-MNIST idx files, or remove it to use the installed copy")
        found = _idx_folder(base)
        if found is None:
            names = ", ".join(f"{n}[.gz]" for pair in IDX_FILES.values() for n in pair)
            raise DistillError(f"data.root: no Fashion-MNIST idx files in {base}; expected {names}")
        return found
    env = os.environ.get("DISTILL_DATA")
    tried = ([Path(env).expanduser()] if env else []) + [FASHION_MNIST_DIR, CACHE_DIR]
    for base in tried:
        found = _idx_folder(base)
        if found is not None:
            return found
    failure = download_fashion_mnist(CACHE_DIR)
    found = _idx_folder(CACHE_DIR) if failure is None else None
    if found is None:
        raise DistillError(
            f"data.root: Fashion-MNIST not found in {', '.join(map(str, tried))} (download: {failure}); "
            "install it with `apt-get install dataset-fashion-mnist`, or set data.root / $DISTILL_DATA "
            "to a folder holding the idx files")
    return found


def download_fashion_mnist(dest: Path, timeout: float = 10.0) -> str | None:
    """Try torchvision's download into `dest`; None on success, else why it failed (offline is normal)."""
    from torchvision.datasets import FashionMNIST

    # torchvision's urlopen has no timeout and DNS ignores socket timeouts, so probe the host in a
    # thread first: an offline machine must fail in seconds, not minutes.
    host = FashionMNIST.mirrors[0].split("/")[2]
    resolved = []
    probe = threading.Thread(target=lambda: resolved.append(_resolves(host)), daemon=True)
    probe.start()
    probe.join(timeout)
    if not resolved or not resolved[0]:
        return f"cannot reach {host}"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with contextlib.redirect_stdout(None):
            FashionMNIST(str(dest), train=True, download=True)
            FashionMNIST(str(dest), train=False, download=True)
    except (OSError, RuntimeError, ValueError) as e:  # network, disk or checksum: "not found here"
        return f"failed ({type(e).__name__}: {e})"
    finally:
        socket.setdefaulttimeout(old_timeout)
    return None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _idx_folder(base: Path) -> Path | None:
    # the files themselves, a fashion-mnist/ subfolder, or torchvision's download layout
    for folder in (base, base / "fashion-mnist", base / "FashionMNIST" / "raw"):
        if all(idx_path(folder, n).is_file() for pair in IDX_FILES.values() for n in pair):
            return folder
    return None


def idx_path(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (the MNIST format), gzipped or not, as a read-only uint8 array."""
    try:
        stat = path.stat()
    except OSError as e:
        raise DistillError(f"{path}: cannot read ({e}); replace the file") from None
    return _parse_idx(path, stat.st_mtime_ns, stat.st_size)


# load_splits and load_unlabeled("rest") both need the train images and a parse takes ~0.5 s; the
# arrays are read-only, so callers can share them. mtime and size are in the key so a replaced file is
# read again.
@functools.lru_cache(maxsize=4)
def _parse_idx(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DistillError(f"{path}: cannot read ({e}); replace the file") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DistillError(f"{path}: not an idx file of unsigned bytes; replace the file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DistillError(f"{path}: truncated ({len(data) - offset} bytes for shape {dims}); replace the file")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
