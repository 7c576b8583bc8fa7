"""Disk space: refuse a write that will not fit before it starts, and turn a disk that fills up midway into one line naming the path."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

from distill.errors import DistillError

MiB = 2**20
# a full disk, a file-size limit (ulimit -f) and a full quota: more space is the fix for each
FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
AGAIN = "free some space and run again"


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: the disk a write to `path` lands on."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def check_free(path: Path, need_bytes: float, what: str, hint: str) -> int:
    """The free bytes on the disk that holds `path`; a DistillError line `<what> needs about X MiB and <disk>
    has Y MiB free; <hint>` when `need_bytes` (plus 5% and 1 MiB for headers, sidecars and file-system
    blocks) do not fit. Call it before the first byte is written."""
    disk = existing_parent(path)
    free = shutil.disk_usage(disk).free
    if need_bytes * 1.05 + MiB > free:
        raise DistillError(f"{what} needs about {mib(need_bytes)} MiB and {disk} has {mib(free)} MiB free; {hint}")
    return free


def mib(size: float) -> str:
    """Bytes in MiB, to a tenth below 10 MiB (a tiny state says 0.3, not 0)."""
    return f"{size / MiB:.1f}" if size < 10 * MiB else f"{size / MiB:.0f}"


def full_disk_reason(e: BaseException) -> str | None:
    """Why a write failed, when more space is the fix (a full disk, a file-size limit, a full quota); else None.

    safetensors (Rust) and torch.save (C++) do not raise OSError: the first names the OS error in its text,
    the second (its zip writer) only says that a position check failed."""
    if isinstance(e, OSError) and e.errno in FULL:
        return os.strerror(e.errno)
    found = re.search(r"os error (\d+)", str(e))
    if found and int(found.group(1)) in FULL:
        return os.strerror(int(found.group(1)))
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter" in str(e) or "inline_container" in str(e)):
        return f"torch.save could not write it, the disk is likely full ({str(e).strip().splitlines()[-1]})"
    return None


def remove(path: Path) -> None:
    """Remove a file or a folder, if there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: Path, *partial: Path, what: str = "", hint: str = f"it is left as it was; {AGAIN}"):
    """Around a write to `path`: when it fails, remove the `partial` files or folders it left, and turn a full
    disk (or a file-size limit or quota) into one DistillError line naming `path`; other errors pass through."""
    try:
        yield
    except BaseException as e:
        for p in partial:
            remove(p)
        reason = full_disk_reason(e)
        if reason is None:
            raise
        raise DistillError(f"{what + ': ' if what else ''}writing {path} failed: {reason}; {hint}") from None


def agree(accelerator, message: str | None) -> str | None:
    """The first process's failure line (None: none failed), the same on every process, so that all of them
    stop together instead of the others waiting for the failed one at the next collective."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object
    return next((m for m in gather_object([message]) if m), None)
