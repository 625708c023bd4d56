"""How the daemon's own process uses the machine, applied once at start (`tuned`): the owner of both techniques.

- Allocator: glibc's malloc would hand the heap's top back to the kernel whenever a little is free, and fault
  fresh pages in at the next download's chunks; fixed trim and mmap thresholds keep freed memory for reuse.
- CPUs: the daemon's threads (event loop, event-log threads, file helpers) hand work to each other many times
  per image and share the GIL anyway; on one CPU each hand-off wakes the next thread there instead of
  interrupting a codec worker on another. The codec workers keep every CPU. Daemons on one machine (several
  nodes of a cluster) take different CPUs while there are enough, by a lock file per CPU.

Only the daemon's process is tuned; the codec workers start from a fresh forkserver with the defaults. What each
buys is measured by `make bench` (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import tempfile
from collections.abc import Iterator, Set
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 * 1024 * 1024
MMAP_THRESHOLD = 4 * 1024 * 1024
CPU_LOCKS = Path(tempfile.gettempdir()) / "imgpipe-cpus"  # one lock file per CPU a daemon's threads are on


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process; False where there is no glibc `mallopt`."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt, and their allocators behave otherwise
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def tuned(pin_to_one_cpu: bool) -> Iterator[int | None]:
    """Tune this process for the block: the allocator, and (when asked) its threads on one CPU, which it yields."""
    keep_freed_memory()
    with on_one_cpu(pin_to_one_cpu) as cpu:
        yield cpu


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this thread may run on; None where the platform does not say (no sched_getaffinity)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


@contextlib.contextmanager
def on_one_cpu(enabled: bool = True) -> Iterator[int | None]:
    """Confine every thread of this process, and those they start, to one allowed CPU (the highest no other daemon
    holds: the kernel tends to route interrupts to the lowest); on exit give every thread back the CPUs it had.
    Yields the CPU, or None when there was nothing to do (disabled, one CPU, not Linux)."""
    cpus = allowed_cpus()
    if not enabled or cpus is None or len(cpus) < 2 or not os.path.isdir("/proc/self/task"):
        yield None
        return
    cpu, lock = claim_cpu(cpus)
    before = _set_every_thread({cpu})
    try:
        yield cpu
    finally:
        if lock is not None:
            os.close(lock)
        for tid, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        # Threads started while confined inherited the one CPU: they get the CPUs the process had.
        for tid in _threads():
            if tid not in before:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)


def claim_cpu(cpus: Set[int], folder: Path = CPU_LOCKS) -> tuple[int, int | None]:
    """The highest of `cpus` whose lock no other process holds, and the descriptor that holds it now (the lock ends
    when it is closed or the process ends, kill -9 included); the highest, with no lock, when every one is held.
    Two daemons pinned to one CPU would take turns on it while another CPU ran only codec workers."""
    with contextlib.suppress(OSError):
        folder.mkdir(exist_ok=True)
    for cpu in sorted(cpus, reverse=True):
        try:
            lock = os.open(folder / f"cpu-{cpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # no such folder, another user's file: not ours to take
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            continue
        return cpu, lock
    return max(cpus), None


def _set_every_thread(mask: Set[int]) -> dict[int, set[int]]:
    """Set `mask` on every thread of this process; returns each thread's previous mask. The scan repeats until
    it finds no new thread, so one started during the first scan (inheriting the old mask) is not missed."""
    before: dict[int, set[int]] = {}
    seen: set[int] = set()
    while new := [tid for tid in _threads() if tid not in seen]:
        seen.update(new)
        for tid in new:
            with contextlib.suppress(OSError):  # it ended meanwhile
                previous = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, mask)
                before[tid] = previous
    return before


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []
