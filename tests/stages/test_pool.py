"""The codec pool with real worker processes: answers, errors, a worker killed mid-job, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing.forkserver
import operator
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import CompressSettings
from daemon.stages.codec import (
    EncodeSettings,
    ImageRejected,
    _compress,
    _unidentified_reason,
)
from daemon.stages.pool import FRAME_HEADER, CodecPool, JobTimedOut, WorkerLost, alive, unframe
from daemon.testing import end_worker, eventually, fail_unpicklably, hang


async def test_jobs_run_in_the_workers_and_their_errors_come_back() -> None:
    """A job's result, and the exception a job raised, reach the caller as they were in the worker."""
    pool = CodecPool(CompressSettings(workers=2))
    try:
        workers = await pool.start()
        assert len(workers) == 2 and os.getpid() not in workers
        assert set(await asyncio.gather(*(pool.run(os.getpid) for _ in range(8)))) <= workers
        assert await pool.run(_unidentified_reason, b"<html>") == "not an image: content looks like HTML"
        with pytest.raises(ImageRejected, match="empty body"):
            await pool.run(_compress, b"", EncodeSettings())
    finally:
        await pool.shutdown()


async def test_a_worker_killed_mid_job_fails_that_job_and_is_replaced() -> None:
    """The job of a killed worker fails with WorkerLost, the other worker's job completes, a new worker starts."""
    pool = CodecPool(CompressSettings(workers=2))
    try:
        workers = await pool.start()
        slow = [asyncio.ensure_future(pool.run(time.sleep, 0.5)) for _ in range(2)]  # one on each worker
        await asyncio.sleep(0.1)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        outcomes = await asyncio.wait_for(asyncio.gather(*slow, return_exceptions=True), 10)
        assert sorted(type(o).__name__ for o in outcomes) == ["NoneType", "WorkerLost"]
        assert isinstance(next(o for o in outcomes if o is not None), WorkerLost)
        await eventually(lambda: asyncio.sleep(0, len(pool.pids) == 2), "a replacement worker")
        assert victim not in pool.pids
        assert set(await asyncio.gather(*(pool.run(os.getpid) for _ in range(4)))) <= pool.pids
    finally:
        await pool.shutdown()


async def test_a_replacement_that_cannot_start_is_tried_again_until_it_starts() -> None:
    """While no worker can be started (here: the forkserver cannot be reached) each failure is logged and tried
    again; once it can, the replacement starts and runs jobs."""
    pool = CodecPool(CompressSettings(workers=1))
    forkserver = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    try:
        (victim,) = await pool.start()
        with capture_logs() as logs:
            os.unlink(forkserver._forkserver_address)  # alive, but nothing can connect to it any more
            os.kill(victim, signal.SIGKILL)
            failed = lambda: sum(e["event"] == "codec_worker_start_failed" for e in logs)  # noqa: E731
            await eventually(lambda: asyncio.sleep(0, failed() >= 2), "two failed starts")
            assert pool.pids == set()
            # A forkserver that has ended (and is a zombie, so multiprocessing can tell) is started afresh.
            os.kill(forkserver._forkserver_pid, signal.SIGKILL)
            await eventually(lambda: asyncio.sleep(0, pool.pids), "a replacement worker")
        (replacement,) = pool.pids
        assert replacement != victim
        assert await pool.run(os.getpid) == replacement
        failures = [e for e in logs if e["event"] == "codec_worker_start_failed"]
        assert "FileNotFoundError" in failures[0]["error"] or "ConnectionRefusedError" in failures[0]["error"]
        assert failures[1]["retry_in"] == 2 * failures[0]["retry_in"]
    finally:
        await pool.shutdown()


@dataclass(frozen=True)
class Sent:
    worker: int  # the pool's one worker at the start
    outcome: object  # the first job's result or exception
    behind: object  # the pid that answered the job sent behind it
    workers: set[int]  # the pool's workers at the end
    logs: list[dict[str, Any]]


async def job_and_the_one_behind(first: Callable[[], object], settings: CompressSettings | None = None) -> Sent:
    """On a one-worker pool, send `first` and os.getpid right behind it, on the same worker."""
    pool = CodecPool(settings or CompressSettings(workers=1))
    try:
        (worker,) = await pool.start()
        with capture_logs() as logs:
            sent = [asyncio.ensure_future(pool.run(first)), asyncio.ensure_future(pool.run(os.getpid))]
            outcome, behind = await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 20)
        return Sent(worker, outcome, behind, pool.pids, logs)
    finally:
        await pool.shutdown()


async def test_an_answer_that_does_not_unpickle_fails_its_own_job_and_no_other() -> None:
    """A job whose answer cannot be read back fails with the reason; the job sent behind it gets its own answer."""
    sent = await job_and_the_one_behind(fail_unpicklably)
    assert isinstance(sent.outcome, RuntimeError)
    assert "the codec's answer could not be read" in str(sent.outcome)
    assert sent.behind == sent.worker


async def test_an_answer_longer_than_one_read_of_the_pipe_arrives_whole() -> None:
    """An answer several pipe reads long (about 1 MB) comes back byte for byte, and so does the one behind it."""
    # A small job with a large answer; a 10-byte period, so no 64 KB read lines up with it.
    sent = await job_and_the_one_behind(functools.partial(operator.mul, b"0123456789", 100_000))
    assert sent.outcome == b"0123456789" * 100_000
    assert sent.behind == sent.worker


def test_answers_are_cut_from_the_pipe_whole_however_the_reads_split_them() -> None:
    """Messages are taken out only once whole, several from one read, and a message's rest waits for the next."""
    messages = [pickle.dumps(m) for m in ("first", {"second": 2}, b"x" * 70_000)]
    stream = b"".join(FRAME_HEADER.pack(len(m)) + m for m in messages)
    buffer, taken = bytearray(), []
    for start in range(0, len(stream), 4099):  # reads that cut headers and payloads anywhere
        buffer += stream[start:start + 4099]
        taken += [pickle.loads(m) for m in unframe(buffer)]
    assert taken == ["first", {"second": 2}, b"x" * 70_000] and buffer == bytearray()


async def test_a_job_that_kills_its_worker_costs_the_job_sent_behind_it_nothing() -> None:
    """Only the job that was running when its worker died fails; the one already sent behind it runs elsewhere."""
    sent = await job_and_the_one_behind(end_worker)
    assert isinstance(sent.outcome, WorkerLost)
    assert sent.behind in sent.workers and sent.behind != sent.worker


async def test_a_job_past_its_deadline_fails_alone_and_its_worker_is_replaced() -> None:
    """A job that never answers fails after job_timeout with a readable JobTimedOut, its worker is killed and
    replaced, and the job sent behind it runs on the replacement."""
    sent = await job_and_the_one_behind(hang, CompressSettings(workers=1, job_timeout=0.5))
    assert isinstance(sent.outcome, JobTimedOut)
    assert str(sent.outcome) == "took longer than 0.5 s (compress.job_timeout)"
    assert sent.behind in sent.workers and sent.behind != sent.worker and len(sent.workers) == 1
    assert [(e["pid"], e["seconds"]) for e in sent.logs if e["event"] == "codec_job_timed_out"] == [(sent.worker, 0.5)]
    await eventually(lambda: asyncio.sleep(0, not alive(sent.worker)), "the timed-out worker to be gone")


async def test_a_stopped_worker_is_killed_at_the_deadline_and_replaced() -> None:
    """A worker stopped with SIGSTOP cannot answer: its job fails with JobTimedOut, the stopped process is killed,
    and the pool is back to its full size, running jobs."""
    pool = CodecPool(CompressSettings(workers=1, job_timeout=0.5))
    try:
        (stopped,) = await pool.start()
        os.kill(stopped, signal.SIGSTOP)
        with pytest.raises(JobTimedOut, match="took longer than 0.5 s"):
            await asyncio.wait_for(pool.run(os.getpid), 20)
        await eventually(lambda: asyncio.sleep(0, not alive(stopped)), "the stopped worker to be killed")
        (replacement,) = await eventually(lambda: asyncio.sleep(0, pool.pids), "a replacement worker")
        assert replacement != stopped and await pool.run(os.getpid) == replacement
    finally:
        await pool.shutdown()


async def test_the_deadline_counts_from_when_a_job_starts_not_from_when_it_was_sent() -> None:
    """Two jobs of 0.8 s sent together to one worker both finish under a 1.2 s deadline: the second is not blamed
    for the time it waited behind the first."""
    pool = CodecPool(CompressSettings(workers=1, job_timeout=1.2))
    try:
        (worker,) = await pool.start()
        with capture_logs() as logs:
            both = asyncio.gather(*(pool.run(time.sleep, 0.8) for _ in range(2)))  # both sent at once (DEPTH 2)
            assert await asyncio.wait_for(both, 20) == [None, None]
        assert pool.pids == {worker}
        assert [e for e in logs if e["event"] == "codec_job_timed_out"] == []
    finally:
        await pool.shutdown()


async def test_a_stop_signal_to_every_process_leaves_the_workers_to_the_shutdown() -> None:
    """SIGTERM or Ctrl-C sent to the daemon's whole process group (systemd, a terminal) neither ends a worker
    nor makes the pool replace one: their jobs answer, and nothing up to the end of the shutdown logs
    codec_worker_replaced (or any codec_worker_* event)."""
    pool = CodecPool(CompressSettings(workers=2))
    with capture_logs() as logs:
        workers = await pool.start()
        running = asyncio.gather(*(pool.run(time.sleep, 0.3) for _ in range(2)))  # one on each worker
        for pid, stop in zip(sorted(workers), (signal.SIGTERM, signal.SIGINT)):
            os.kill(pid, stop)
        assert await asyncio.wait_for(running, 10) == [None, None]
        assert set(await asyncio.gather(*(pool.run(os.getpid) for _ in range(4)))) == workers
        await pool.shutdown()
    assert [e for e in logs if e["event"].startswith("codec_worker")] == []
    assert not any(alive(pid) for pid in workers)


async def test_shutdown_ends_every_worker() -> None:
    """After shutdown no worker process is left running."""
    pool = CodecPool(CompressSettings(workers=2))
    workers = await pool.start()
    await pool.shutdown()
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_shutdown_waits_for_a_busy_worker_without_stopping_the_loop() -> None:
    """While shutdown waits for a worker to finish its job, the event loop keeps running other work."""
    pool = CodecPool(CompressSettings(workers=1))
    await pool.start()
    running = asyncio.ensure_future(pool.run(time.sleep, 0.5))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(pool.shutdown())
    ticks = 0
    while not stopping.done():
        await asyncio.sleep(0.01)
        ticks += 1
    await stopping
    assert ticks >= 10  # the worker took ~0.45 s more: a blocked loop would have ticked once
    assert running.cancelled()


async def test_a_job_still_running_at_shutdown_is_cancelled_not_left_waiting() -> None:
    """Shutting down while a job runs cancels its caller's await instead of leaving it pending forever."""
    pool = CodecPool(CompressSettings(workers=1))
    await pool.start()
    running = asyncio.ensure_future(pool.run(time.sleep, 0.3))
    await asyncio.sleep(0.05)
    await pool.shutdown()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 5)
