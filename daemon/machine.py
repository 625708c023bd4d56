"""How the daemon's own process uses the machine: its memory allocator and its CPUs.

Both are measured answers to the same fact: on a machine whose CPUs the codec workers saturate, every
microsecond the daemon's process spends in the kernel is taken from the codec.

Allocator. Each downloaded body passes through the event loop in chunks of up to 256 KB (asyncio's read
size). glibc's malloc, left to itself, serves those from its heap and gives the heap's top back to the kernel
as soon as more than twice its (adaptive) mmap threshold is free there, about 512 KB: with 16 downloads in
flight the heap grows and shrinks all the time, and every regrowth faults fresh zeroed pages in. In the
benchmark that was 6.5% of the main process's CPU (page faults, zeroing, unmapping). A fixed trim threshold
keeps up to `TRIM_THRESHOLD` of free heap; the fixed mmap threshold (which setting the trim threshold implies
anyway) keeps chunk-sized blocks on the heap where they are reused.

CPUs. The daemon's threads (event loop, event-log writer, file helpers) hand work to each other many times
per image. Spread over the CPUs, each hand-off wakes a thread on another CPU, with an interprocessor interrupt,
and lands between a codec worker and its caches; on one CPU the woken thread simply runs next there. The
threads share the GIL, so they never ran in parallel for long anyway. Confined to one CPU, the daemon used 6%
less CPU per image in the throughput benchmark and 13-19% less under load, where status p99 fell by a third.
The codec workers keep every CPU.

Only the daemon's own process is tuned: the codec workers start from a fresh forkserver with the defaults,
which the Pillow ceiling in the benchmark uses too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator, Set

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 * 1024 * 1024
MMAP_THRESHOLD = 4 * 1024 * 1024


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


def allowed_cpus() -> frozenset[int] | None:
    """The CPUs this thread may run on; None where the platform does not say (no sched_getaffinity)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


@contextlib.contextmanager
def on_one_cpu(enabled: bool = True) -> Iterator[int | None]:
    """Confine every thread of this process, and those they start, to one allowed CPU (the highest: the
    kernel tends to route interrupts to the lowest); on exit give every thread back the CPUs it had.
    Yields the CPU, or None when there was nothing to do (disabled, one CPU, not Linux)."""
    cpus = allowed_cpus()
    if not enabled or cpus is None or len(cpus) < 2 or not os.path.isdir("/proc/self/task"):
        yield None
        return
    cpu = max(cpus)
    before = _set_every_thread({cpu})
    try:
        yield cpu
    finally:
        for tid, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)
        # Threads started while confined inherited the one CPU: they get the CPUs the process had.
        for tid in _threads():
            if tid not in before:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)


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
