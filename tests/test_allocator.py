"""The daemon's allocator keeps freed download-sized blocks instead of faulting fresh pages in for each one."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Sixteen 256 KB chunks at a time, as sixteen downloads in flight hand them to the loop, freed and allocated
# again a hundred times; prints whether tuning applied and the minor page faults of those hundred rounds.
CHURN = """
import resource, sys
from daemon.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
def churn():
    chunks = [b"x" * 262144 for _ in range(16)]
    del chunks
for _ in range(3):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    churn()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn_faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return tuned == "True", int(faults)


def test_reused_chunks_fault_no_pages_in_once_the_allocator_is_tuned() -> None:
    """Chunks freed and allocated again cost the untuned allocator fresh pages each time, the tuned one none."""
    tuned, faults = churn_faults("tuned")
    if not tuned:
        pytest.skip("no glibc mallopt on this platform")
    _, untuned_faults = churn_faults("untuned")
    assert untuned_faults > 10_000  # the churn does reproduce the problem: 64 pages per chunk, round after round
    assert faults < 100
