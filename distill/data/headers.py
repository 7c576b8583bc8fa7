"""A cheap check of every image file before training: PIL's header read and the file's end, cached per file.

Decoding a dataset up front costs as much as an epoch; this reads each file's header (PIL's Image.open:
format, size, mode) and its last bytes (a JPEG's EOI marker, a PNG's IEND chunk, a WebP's RIFF length), which
catches what bad files usually are: empty, not an image (an HTML page saved as .jpg), cut short by a failed
copy or download, or a decompression bomb (a width x height over data.max_image_pixels). A file that passes
and still fails to decode (corrupt data inside) stops the run when it is read, with its name and the
data.on_bad_image: skip hint.

Results are cached by (absolute path, size, mtime_ns) in one JSON file per data root under
$XDG_CACHE_HOME/distill/image-headers/ (default ~/.cache/distill/): a second run stats each file and reads
no image. JSON per root, not one SQLite database: each process (torchrun ranks, parallel runs) replaces the
whole file atomically, so there is no locking and nothing to corrupt on a network file system, and
forgetting a dataset is deleting one file. A cache that cannot be read or written is ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from distill.data.images import open_unlimited, over_limit, user_cache

_logger = logging.getLogger(__name__)

_VERSION = 1
# the formats PIL may read a file as, by its extension (MPO: a JPEG with a second picture, from phone cameras)
_EXPECTED = {".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",), ".bmp": ("BMP", "DIB"),
             ".gif": ("GIF",), ".tif": ("TIFF",), ".tiff": ("TIFF",), ".webp": ("WEBP",)}
# how far from the end the end marker may be: writers and uploads add a few padding or metadata bytes
_TAIL = 1024

# (format, width, height, problem): format "" and a problem when the header cannot be read
Header = tuple[str, int, int, str]


def check_files(paths: Sequence[str], max_pixels: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(bad, misnamed) of image files: bad = (index, why) of the files that fail the check or whose width x
    height is over `max_pixels`; misnamed = (index, format) of the files holding another format than their
    extension says (not an error: PIL reads by content)."""
    bad, misnamed = [], []
    for i, (path, header) in enumerate(zip(paths, read_headers(paths))):
        problem = problem_of(header, max_pixels)
        if problem:
            bad.append((i, problem))
        elif header[0] not in _EXPECTED.get(os.path.splitext(path)[1].lower(), (header[0],)):
            misnamed.append((i, header[0]))
    return bad, misnamed


def problem_of(header: Header, max_pixels: int) -> str:
    """'' for a good file, else why it is bad ("cannot read image (...)")."""
    _, width, height, problem = header
    if not problem and width * height > max_pixels:
        problem = over_limit(width, height, max_pixels)
    return f"cannot read image ({problem})" if problem else ""


def read_headers(paths: Sequence[str]) -> list[Header]:
    """Each file's Header, from the cache when its size and mtime are unchanged."""
    if not paths:
        return []
    full = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath(full) if len(full) > 1 else os.path.dirname(full[0])
    if os.path.isfile(root):  # the same file listed twice
        root = os.path.dirname(root)
    cache_file = user_cache("image-headers") / f"{hashlib.sha256(root.encode()).hexdigest()[:24]}.json"
    cached = _load(cache_file, root)
    headers, fresh = [], {}
    for path in full:
        try:
            st = os.stat(path)
        except OSError as e:
            headers.append(("", 0, 0, f"cannot open it: {e.strerror or e}"))
            continue
        key = os.path.relpath(path, root)
        hit = cached.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            headers.append(tuple(hit[2:]))
            continue
        header = inspect_file(path, st.st_size)
        headers.append(header)
        fresh[key] = [st.st_size, st.st_mtime_ns, *header]
    if fresh:
        _save(cache_file, root, {**cached, **fresh})
    return headers


def inspect_file(path: str, size: int) -> Header:
    """The file's Header, uncached: its header read by PIL and its end checked, nothing decoded."""
    if size == 0:
        return "", 0, 0, "empty file"
    try:
        with open(path, "rb") as f:
            return inspect_stream(f, size)
    except OSError as e:
        return "", 0, 0, f"cannot open it: {e.strerror or e}"


def inspect_stream(f, size: int) -> Header:
    """The Header of an open binary stream of `size` bytes (a file, or an hf dataset's image bytes)."""
    try:
        with open_unlimited(f) as img:
            fmt, (width, height) = img.format or "", img.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types on garbage; each is "not an image"
        text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e).__name__ == "UnidentifiedImageError":
            text = "not an image file PIL can identify"
        return "", 0, 0, text
    return fmt, width, height, _end_problem(f, fmt, size)


def _end_problem(f, fmt: str, size: int) -> str:
    """'' when the file ends as its format should, else why: a truncated file has no end marker."""
    if fmt in ("JPEG", "MPO", "PNG"):
        tail = _tail(f, size, _TAIL)
        if not tail.rstrip(b"\0"):  # all zero: padding longer than usual, look further back
            tail = _tail(f, size, 1 << 20)
        tail = tail.rstrip(b"\0")[-_TAIL:]
        # FF D9 cannot occur inside JPEG entropy-coded data (an FF there is followed by 00 or a restart marker)
        marker = b"IEND" if fmt == "PNG" else b"\xff\xd9"
        if marker not in tail:
            return f"truncated: no {'IEND chunk' if fmt == 'PNG' else 'end-of-image marker'} at its end ({size} bytes)"
    elif fmt == "WEBP":
        f.seek(0)
        head = f.read(12)
        riff = int.from_bytes(head[4:8], "little") + 8
        if head[:4] == b"RIFF" and riff > size:
            return f"truncated: {size} of its {riff} bytes"
    return ""


def _tail(f, size: int, n: int) -> bytes:
    f.seek(max(0, size - n))
    return f.read(n)


def _load(cache_file: Path, root: str) -> dict:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("version") == _VERSION and data.get("root") == root:
            return data["files"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return {}


def _save(cache_file: Path, root: str, files: dict) -> None:
    # write then rename: a reader (another rank, another run) sees the old file or the new one, never half
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _VERSION, "root": root, "files": files}, separators=(",", ":")))
        os.replace(tmp, cache_file)
    except OSError as e:
        _logger.debug("image header cache %s not written (%s); the next run checks the files again", cache_file, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
