"""The codec's process pool: worker processes fed by the event loop itself, over one pipe each.

Unlike concurrent.futures' ProcessPoolExecutor, which passes every job and result through two threads of its own
(their CPU is taken from the codec on a saturated machine; docs/performance.md), the loop writes a job to a
worker's pipe and reads the result when that pipe is readable: no threads and no locks. Each worker has up to `DEPTH` jobs sent ahead, so it never
waits for the loop between two images. A worker that dies (the OOM killer, a crash inside a codec library)
fails the job it was running with WorkerLost, which the compress stage retries, sends the jobs queued behind it to
another worker, and another worker takes its place. A worker whose job runs past `compress.job_timeout` (a codec
looping on a pathological image, a stopped process) is killed and goes the same way, its job failing with
JobTimedOut, which is not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import structlog

from daemon.config import CompressSettings
from daemon.stages.codec import warm_up
from daemon.tuning import allowed_cpus

log = structlog.get_logger("pool")
T = TypeVar("T")
DEPTH = 2  # jobs sent ahead to one worker: the one it runs and the next
WORKER_NICENESS = 10
REPLACE_RETRY_FIRST = 0.05  # seconds before trying again to start a replacement worker, doubling
REPLACE_RETRY_MAX = 5.0


SHUTDOWN_WAIT = 10.0  # seconds the workers get to finish their current jobs before they are killed
# Both sides send plain pickles with Connection.send_bytes (ForkingPickler builds a pickler and copies a dispatch
# table per message). The loop reads whatever the pipe holds and cuts the messages out itself (recv() reads twice,
# blocking): a signed 4-byte big-endian length, then the pickle.
FRAME_HEADER = struct.Struct("!i")
READ_SIZE = 64 * 1024


class WorkerLost(Exception):
    """The worker running a job died before it answered."""


class JobTimedOut(WorkerLost):
    """The job ran longer than compress.job_timeout, so its worker was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"took longer than {seconds:g} s (compress.job_timeout)")


def pool_size(settings: CompressSettings) -> int:
    return settings.workers or os.cpu_count() or 1


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """(worker) `fn`'s result and the seconds it ran, measured where it ran: the time a job waits for a busy
    worker is not part of it."""
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def serve(conn: Connection, daemon_pid: int, cpus: frozenset[int] | None) -> None:
    """A worker's life: run each job it is sent and send back (True, result) or (False, exception)."""
    start_worker(daemon_pid, cpus)
    while True:
        try:
            fn, args = pickle.loads(conn.recv_bytes())
        except EOFError:  # the daemon closed its end: shut down
            return
        reply: tuple[bool, Any]
        try:
            reply = (True, fn(*args))
        except Exception as exc:
            reply = (False, exc)
        try:
            answer = pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # it did not pickle; nothing was written yet
            answer = pickle.dumps((False, RuntimeError(f"the codec's answer could not be sent back: {exc!r}")))
        conn.send_bytes(answer)


def start_worker(daemon_pid: int, cpus: frozenset[int] | None = None) -> None:
    """Yield the CPU to the daemon's event loop, run on `cpus` (the daemon's own threads may be confined to
    one of them, see daemon.tuning), and end with the daemon."""
    # The loop feeds the pool and answers /status; at equal priority a saturated pool starves both.
    os.nice(WORKER_NICENESS)
    # A stop signal for the whole process group (Ctrl-C, systemd) is the daemon's to act on: it closes the pipes
    # and the workers end after their job. Dying with it would look like a crash, to be logged and replaced.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    if cpus:
        with contextlib.suppress(OSError):  # CPUs taken away since (a changed cpuset): keep what it has
            os.sched_setaffinity(0, cpus)
    exit_with(daemon_pid)


def exit_with(pid: int) -> None:
    """End this worker when the daemon ends, even by kill -9, even in the middle of a long job."""

    def watch() -> None:
        try:
            with os.fdopen(os.pidfd_open(pid), "rb", buffering=0) as handle:
                select.select([handle], [], [])  # readable once the process has exited
        except OSError:  # no pidfd (old kernel): poll
            while os.getppid() != 1 and alive(pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-daemon", daemon=True).start()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]


def unframe(buffer: bytearray) -> list[bytes]:
    """The whole messages at the start of `buffer`, which keeps what follows them (part of the next one)."""
    messages: list[bytes] = []
    start = 0
    while len(buffer) - start >= FRAME_HEADER.size:
        (size,) = FRAME_HEADER.unpack_from(buffer, start)
        end = start + FRAME_HEADER.size + size
        if size < 0 or end > len(buffer):  # negative: Connection's marker for a message over 2 GB, never ours
            break
        messages.append(bytes(buffer[start + FRAME_HEADER.size:end]))
        start = end
    del buffer[:start]
    return messages


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process, self.conn = process, conn
        self.fd = conn.fileno()
        self.jobs: deque[_Job] = deque()  # sent, answered in this order
        self.started = 0.0  # time.monotonic() when the first of `jobs` started running
        self.received = bytearray()  # answers read but not yet whole


class CodecPool:
    """`await pool.run(fn, *args)` runs a top-level function in a worker process (event loop thread only)."""

    def __init__(self, settings: CompressSettings) -> None:
        self.size = pool_size(settings)
        self.job_timeout = settings.job_timeout
        self._cpus = allowed_cpus()  # taken before the daemon confines its own threads to one of them
        # forkserver: workers do not inherit the daemon's threads (observer, DB writer) mid-flight.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["daemon.stages.codec", "daemon.stages.pool"])
        self._workers: list[_Worker] = []
        self._queued: deque[_Job] = deque()
        self._spawning: set[asyncio.Task[None]] = set()
        self._closed = False
        self._deadlines: asyncio.TimerHandle | None = None

    @property
    def outstanding(self) -> int:
        """Jobs sent to a worker or waiting for one."""
        return len(self._queued) + sum(len(w.jobs) for w in self._workers)

    @property
    def pids(self) -> set[int]:
        return {w.process.pid for w in self._workers if w.process.pid is not None}

    async def start(self) -> set[int]:
        """Start every worker now, not with the first image: a batch should not wait for the forkserver
        and the imports. Returns the workers' pids."""
        while len(self._workers) < self.size:
            await self._spawn()
        if self._deadlines is None:
            self._check_deadlines()
        # Sent together: the least busy worker takes each, so every worker runs one.
        return set(await asyncio.gather(*(self.run(warm_up) for _ in range(self.size))))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, args, future))
        self._dispatch()
        return await future

    async def shutdown(self) -> None:
        """Close every worker's pipe (each ends after its current job) and wait for them, on a thread: a worker
        finishing a long job must not stop the loop meanwhile."""
        self._closed = True
        if self._deadlines is not None:
            self._deadlines.cancel()
        for task in self._spawning:
            task.cancel()
        workers, self._workers = self._workers, []
        for worker in workers:
            self._close(worker)
        # Nothing will answer these any more: whoever still awaits one must not wait forever.
        for *_, future in [*(job for w in workers for job in w.jobs), *self._queued]:
            future.cancel()
        self._queued.clear()
        await asyncio.to_thread(_join_all, [worker.process for worker in workers])

    # the loop's side of the pipes --------------------------------------------------------------
    def _dispatch(self) -> None:
        while self._queued and self._workers:
            worker = min(self._workers, key=lambda w: len(w.jobs))
            if len(worker.jobs) >= DEPTH:
                return
            fn, args, future = self._queued.popleft()
            if future.done():  # cancelled while queued
                continue
            try:
                # Paths and settings: far below what a pipe buffers, so the write never blocks.
                worker.conn.send_bytes(pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL))
            except OSError:  # it died and the loop has not seen its pipe close yet
                self._queued.appendleft((fn, args, future))
                self._lost(worker)
                continue
            if not worker.jobs:
                worker.started = time.monotonic()
            worker.jobs.append((fn, args, future))

    def _readable(self, worker: _Worker) -> None:
        try:
            data = os.read(worker.fd, READ_SIZE)
        except OSError:
            data = b""
        if not data:  # the worker's end closed: it died
            self._lost(worker)
            return
        worker.received += data
        for message in unframe(worker.received):
            try:
                ok, value = pickle.loads(message)
            except Exception as exc:  # a whole answer arrived but does not unpickle: it is still this job's
                ok, value = False, RuntimeError(f"the codec's answer could not be read: {exc!r}")
            *_, future = worker.jobs.popleft()
            worker.started = time.monotonic()  # the worker went on to the next job as it sent this answer
            if not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        self._dispatch()

    def _check_deadlines(self) -> None:
        """Kill every worker whose job has run past the deadline; then again in a while. One timer for the pool
        rather than one per job: the loop sends thousands of jobs a minute."""
        now = time.monotonic()
        for worker in [w for w in self._workers if w.jobs and now - w.started > self.job_timeout]:
            log.warning("codec_job_timed_out", pid=worker.process.pid, seconds=self.job_timeout)
            worker.process.kill()  # SIGKILL: also ends a stopped process
            self._lost(worker, JobTimedOut(self.job_timeout))
        self._deadlines = asyncio.get_running_loop().call_later(min(1.0, self.job_timeout / 4), self._check_deadlines)

    def _lost(self, worker: _Worker, failure: WorkerLost | None = None) -> None:
        """A worker died or was killed: fail the job it ran with `failure` (by default WorkerLost, which the compress
        stage tries again), hand the others to the remaining workers, and start another in its place."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        self._close(worker)
        # Only the first job was running; those sent behind it never started and go to another worker, so
        # an image that kills its worker costs no other image an attempt.
        if worker.jobs:
            *_, running = worker.jobs.popleft()
            if not running.done():
                running.set_exception(failure or WorkerLost(f"codec worker {worker.process.pid} died"))
        self._queued.extendleft(reversed([job for job in worker.jobs if not job[2].done()]))
        worker.jobs.clear()
        self._dispatch()
        log.warning("codec_worker_replaced", pid=worker.process.pid, exitcode=worker.process.exitcode)
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._spawning.add(task)
            task.add_done_callback(self._spawning.discard)

    async def _replace(self) -> None:
        """Start a worker in a lost one's place, trying again until it starts: a pool that quietly shrank to
        nothing would leave every image waiting for ever."""
        delay = REPLACE_RETRY_FIRST
        while not self._closed:
            try:
                await self._spawn()
                return
            except Exception as exc:  # no fds, no memory to fork, a forkserver that died with the worker
                log.warning("codec_worker_start_failed", error=repr(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, REPLACE_RETRY_MAX)

    async def _spawn(self) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=serve, args=(theirs, os.getpid(), self._cpus), name="imgpipe-codec",
                                        daemon=True)
        try:
            await asyncio.to_thread(process.start)  # the first start waits for the forkserver to come up
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(process, ours)
        if self._closed:
            self._close(worker)
            return
        self._workers.append(worker)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, worker)
        self._dispatch()

    @staticmethod
    def _close(worker: _Worker) -> None:
        if worker.conn.closed:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is registered either
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        worker.conn.close()


def _join_all(processes: list[BaseProcess]) -> None:
    """(thread) Wait for every worker to end, killing those still running after SHUTDOWN_WAIT (for all of them:
    a worker stuck in a job holds up no other)."""
    deadline = time.monotonic() + SHUTDOWN_WAIT
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
