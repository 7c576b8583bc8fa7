"""One writer per run directory: a kernel lock (flock) on <run dir>/.lock, held while a command writes there.

The kernel drops an flock when its process ends, however it ends (SIGKILL, OOM, a crash), so a lock left by a
killed process never blocks the next run; no pid has to be checked. The holder writes who it is (pid, host,
command, since when) into the lock file, and a second writer stops at once with one `error:` line naming it.

The processes of one torchrun / accelerate job are one writer: only global rank 0 takes the lock (the other
ranks never start work before rank 0 has; when rank 0 stops on the lock, the launcher ends the job). Within one
process the lock is re-entrant: `distill run` holds it and calls teach, learn and fixres, which take it again.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from distill.errors import DistillError

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # resolved run dir -> [fd, depth, the folders taking the lock created]


def _is_job_leader() -> bool:
    """Global rank 0 of a torchrun / accelerate job, or a process on its own."""
    return int(os.environ.get("RANK", "0")) == 0


def holder(run_dir: Path) -> dict | None:
    """Who holds the lock of `run_dir` (pid, host, command, since), or None when nobody does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # free: whatever the file says is from a process that has ended
        except BlockingIOError:
            pass
        try:
            return json.loads(os.read(fd, 65536) or b"{}")
        except ValueError:  # the holder is between taking the lock and writing its name
            return {}
    finally:
        os.close(fd)


def _describe(info: dict) -> str:
    if not info:
        return "another process (it is starting)"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({info.get('command')})")


def _acquire(run_dir: Path) -> tuple[int, list[Path]]:
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = holder(run_dir)
            if info is None:  # released between our two looks: try again
                continue
            raise DistillError(f"{run_dir}: in use by {_describe(info)}; one process writes a run directory at "
                               "a time: wait for it to end, or stop it (a stopped or killed run leaves no lock, "
                               "and `distill run` then continues where it stopped)") from None
        # the file may have been removed (by a holder that found the directory empty) between open and flock:
        # then this lock guards nothing, so take it again on the file that is there now
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


def _release(run_dir: Path, fd: int, created: list[Path]) -> None:
    try:
        if created and {p.name for p in run_dir.iterdir()} == {LOCK_NAME}:
            # the command stopped before writing anything (a check failed): leave no trace of it
            (run_dir / LOCK_NAME).unlink()
            with contextlib.suppress(OSError):
                for d in created:  # the run directory, and the output_dir above it if the lock made it
                    d.rmdir()
        else:
            os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops the flock


@contextlib.contextmanager
def one_writer(run_dir: Path, command: str | None = None):
    """Hold the lock of `run_dir` for the `with` block (re-entrant within a process); raise a DistillError
    naming the holder when another process holds it. `command` is what the holder is described as."""
    if not _is_job_leader():
        yield
        return
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd, created = _acquire(run_dir)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command or shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = [fd, 1, created]
    try:
        yield
    finally:
        fd, _, created = _held.pop(key)
        _release(run_dir, fd, created)
