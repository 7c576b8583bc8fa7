"""How many CPU threads a process computes with: `threads` (recipe), `--threads` (CLI), `auto`, applied once.

`auto` is what this process may really use: an OMP_NUM_THREADS the user (or torchrun) set, else the CPUs of its
affinity mask capped by its cgroup's CPU quota (a container's --cpus) and by torch's own default (the physical
cores), shared among the local processes of a torchrun / accelerate job (LOCAL_WORLD_SIZE). torch's default
ignores affinity and quotas, and a machine shared with another job makes its spinning OpenMP threads wait on
each other: benchmarks/busy.py measured a teacher step many times slower than with one thread (README: Threads
and busy machines).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ENV = "DISTILL_THREADS"  # set by `distill --threads N`; beats the recipe's `threads`; child processes inherit it
_applied: int | None = None  # what this process runs with, once `apply` has run
_torch_default: int | None = None  # torch's own choice, read before the first set_num_threads
_noted = False  # workers_note has spoken


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs' worth of this cgroup's quota (v2 cpu.max, v1 cpu.cfs_quota_us / cfs_period_us); None: no quota."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota = int(Path(root, v1, "cpu.cfs_quota_us").read_text())
            period = int(Path(root, v1, "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 else None
    return None


def cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup's quota (rounded down: threads
    beyond a quota are throttled for the rest of each period)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(n, math.floor(quota))) if quota else n


def auto_threads(env=None) -> int:
    """`auto`: an OMP_NUM_THREADS set in the environment, else `cpus()` / LOCAL_WORLD_SIZE (at least 1)."""
    env = os.environ if env is None else env
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    return max(1, cpus() // max(1, int(local) if local.isdigit() else 1))


def resolve(setting: int | str = "auto") -> int:
    """The thread count for `setting` (the recipe's `threads`): DISTILL_THREADS first (the command line beats the
    recipe file), then an integer setting, else `auto_threads()` capped by torch's default."""
    from distill.errors import DistillError

    forced = os.environ.get(ENV, "").strip()
    if forced and forced != "auto" and (not forced.isdigit() or int(forced) < 1):
        raise DistillError(f"--threads ({ENV}): expected an integer >= 1 or auto, got {forced!r}")
    setting = forced or setting
    if setting != "auto":
        return int(setting)
    return min(auto_threads(), _torch_default or auto_threads())


def apply(setting: int | str = "auto") -> int:
    """Run this process on `resolve(setting)` threads: torch's intra-op (and, while it still may, inter-op) pool,
    OMP_NUM_THREADS / MKL_NUM_THREADS for child processes, OpenCV; on the first call, warn once when the machine
    is busier than its CPUs. Later calls change only a different count (several recipes in one process)."""
    global _applied, _torch_default
    import torch

    first = _applied is None
    if first:
        _torch_default = torch.get_num_threads()
    n = resolve(setting)
    if n == _applied:
        return n
    torch.set_num_threads(n)
    if first:
        try:  # allowed only before any inter-op parallel work has started in this process
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    try:  # albumentations' OpenCV has its own pool, as large as the machine
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    _applied = n
    if first:
        warn_if_busy(n)
    return n


def passive_when_busy() -> bool:
    """OMP_WAIT_POLICY=PASSIVE when the machine is busier than its CPUs: OpenMP threads that wait then sleep
    instead of spinning on CPUs another job needs (benchmarks/busy.py, 2 busy CPUs: a 2-thread teacher step took
    4.0 s with it, 15.6 s without; idle it costs, 0.45 s against 0.38 s, hence only when busy). libgomp reads it once, when torch is first
    imported, so only a process that has not imported torch yet can set it: the `distill` command does, before
    its work; `python distill/teach.py` and `accelerate launch` import torch first (set it yourself there). A
    value already in the environment stays."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or os.getloadavg()[0] <= cpus():
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def warn_if_busy(n: int) -> str | None:
    """One warning line (stderr, local main process) when the 1-minute load average exceeds the CPUs and `n`
    threads could be lowered; returns it."""
    load, count = os.getloadavg()[0], cpus()
    if n <= 1 or load <= count or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    line = (f"warning: the machine is busy (load {load:.1f} on {count} CPUs): threads={n} may run many times "
            "slower (benchmarks/busy.py, 2 busy CPUs: a teacher step took 15.6 s on 2 threads, 4.4 s on 1); set "
            "threads=1 (or lower): a recipe key, an override threads=1, or --threads 1")
    print(line, file=sys.stderr, flush=True)
    return line


def workers_note(num_workers: int) -> str | None:
    """One note (stderr, once per process) when DataLoader workers and this process's threads exceed the CPUs on
    a CPU-only run (with a GPU the main threads mostly wait for it); returns it."""
    global _noted
    import torch

    n = _applied or torch.get_num_threads()
    if _noted or not num_workers or n + num_workers <= cpus() or torch.accelerator.is_available() \
            or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    _noted = True
    line = (f"note: data.num_workers {num_workers} + threads {n} exceed the {cpus()} CPUs: image loading competes "
            "with the training threads; if steps are slow, lower data.num_workers or threads")
    print(line, file=sys.stderr, flush=True)
    return line


def worker_init(worker_id: int) -> None:
    """A DataLoader worker computes on one thread in torch (as DataLoader does already). OpenCV's pool keeps the
    size `apply` gave it in the parent: calling cv2.setNumThreads in a forked worker can hang for good (the
    parent's pool threads do not exist in the child; seen in the test suite)."""
    import torch

    torch.set_num_threads(1)
