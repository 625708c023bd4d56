"""Keep the daemon's freed memory for reuse instead of handing it back to the kernel after every download.

Each downloaded body passes through the event loop in chunks of up to 256 KB (asyncio's read size). glibc's
malloc, left to itself, serves those from its heap and gives the heap's top back to the kernel as soon as
more than twice its (adaptive) mmap threshold is free there, about 512 KB: with 16 downloads in flight the
heap grows and shrinks all the time, and every regrowth faults fresh zeroed pages in. In the benchmark that
was 6.5% of the main process's CPU (page faults, zeroing, unmapping). A fixed trim threshold keeps up to
`TRIM_THRESHOLD` of free heap; the fixed mmap threshold (which setting the trim threshold implies anyway)
keeps chunk-sized blocks on the heap where they are reused.

Only the daemon's own process is tuned: the codec workers start from a fresh forkserver and keep the
defaults, which the Pillow ceiling in the benchmark uses too.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
