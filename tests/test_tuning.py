"""The daemon's process on the machine: an allocator that keeps freed blocks, its own threads on one CPU."""

from __future__ import annotations

import asyncio
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.app import DAEMON_CPU, POOL
from daemon.config import CompressSettings
from daemon.stages.pool import CodecPool
from daemon.testing import daemon_app, eventually, pipeline_settings
from daemon.tuning import claim_cpu, on_one_cpu

CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2 or not os.path.isdir("/proc/self/task"),
                                    reason="CPU affinity needs Linux and two CPUs")

# Sixteen 256 KB chunks at a time, as sixteen downloads in flight hand them to the loop, freed and allocated
# again a hundred times; prints whether tuning applied and the minor page faults of those hundred rounds.
CHURN = """
import resource, sys
from daemon.tuning import keep_freed_memory
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


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def thread_cpus() -> dict[int, frozenset[int]]:
    cpus = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            cpus[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except OSError:
            pass
    return cpus


@needs_two_cpus
async def test_the_daemons_threads_share_one_cpu_while_its_codec_workers_use_every_cpu(tmp_path: Path) -> None:
    """While the daemon runs, each of its threads (also one started meanwhile) is on one CPU, its workers on
    all; when it stops, every thread has every CPU back."""
    async with daemon_app(pipeline_settings(tmp_path)) as app:
        cpu = app[DAEMON_CPU]
        assert cpu in CPUS
        assert set(thread_cpus().values()) == {frozenset({cpu})}
        started_meanwhile = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
        started_meanwhile.start()
        assert frozenset(os.sched_getaffinity(started_meanwhile.native_id)) == {cpu}
        workers = app[POOL].pids
        assert len(workers) == 2
        assert {frozenset(os.sched_getaffinity(pid)) for pid in workers} == {CPUS}
    assert set(thread_cpus().values()) == {CPUS}


def test_daemons_on_one_machine_take_different_cpus_while_there_are_enough(tmp_path: Path) -> None:
    """Each claim takes the highest CPU nobody holds; with every one held, the highest unlocked; a CPU whose
    holder let go is free again."""
    first, first_lock = claim_cpu({0, 1}, tmp_path)
    second, second_lock = claim_cpu({0, 1}, tmp_path)
    third, third_lock = claim_cpu({0, 1}, tmp_path)
    assert (first, second, third) == (1, 0, 1)
    assert first_lock is not None and second_lock is not None and third_lock is None
    os.close(first_lock)
    again, again_lock = claim_cpu({0, 1}, tmp_path)
    assert again == 1 and again_lock is not None
    os.close(again_lock)
    os.close(second_lock)


def test_a_cpu_held_by_a_killed_daemon_is_free_again(tmp_path: Path) -> None:
    """A process that held a CPU's lock and died by SIGKILL leaves the CPU to the next daemon."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from daemon.tuning import claim_cpu; print(claim_cpu({0, 1}, Path(sys.argv[1]))[0], "
                               "flush=True); time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        cpu, lock = claim_cpu({0, 1}, tmp_path)
        assert cpu == 0 and lock is not None
        os.close(lock)
    finally:
        holder.kill()
        holder.wait()
    cpu, lock = claim_cpu({0, 1}, tmp_path)
    assert cpu == 1 and lock is not None
    os.close(lock)


@needs_two_cpus
async def test_with_pin_daemon_off_the_daemons_threads_keep_every_cpu(tmp_path: Path) -> None:
    """`compress.pin_daemon = false` leaves the daemon's threads on every CPU."""
    async with daemon_app(pipeline_settings(tmp_path, compress={"workers": 2, "pin_daemon": False})) as app:
        assert app[DAEMON_CPU] is None
        assert set(thread_cpus().values()) == {CPUS}


@needs_two_cpus
async def test_a_worker_replaced_while_the_daemon_is_on_one_cpu_gets_every_cpu() -> None:
    """A codec worker that replaces a dead one, through a forkserver restarted on the daemon's one CPU, still
    runs on every CPU the daemon had."""
    pool = CodecPool(CompressSettings(workers=1))
    try:
        (victim,) = await pool.start()
        with on_one_cpu() as cpu:
            assert cpu is not None
            # The next forkserver starts from a confined thread, and its children inherit that. Only once the
            # old one is a zombie does multiprocessing see it is gone and start another.
            forkserver = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
            os.kill(forkserver, signal.SIGKILL)
            await eventually(lambda: asyncio.sleep(0, process_state(forkserver) == "Z"), "the forkserver's end")
            os.kill(victim, signal.SIGKILL)
            await eventually(lambda: asyncio.sleep(0, bool(pool.pids - {victim})), "a replacement worker")
            (replacement,) = pool.pids
            assert await pool.run(os.getpid) == replacement
            assert frozenset(os.sched_getaffinity(replacement)) == CPUS
    finally:
        await pool.shutdown()
