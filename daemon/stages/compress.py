"""Compress stage: ImageDownloaded -> ImageCompressed | ImageFailed, the codec running in a process pool."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import structlog

from daemon.config import CompressSettings
from daemon.eventlog.follower import Follower, Retry
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, ImageCompressed, ImageDownloaded, ImageFailed
from daemon.files import remove_matching
from daemon.stages.bodies import Bodies
from daemon.stages.codec import EncodeSettings, ImageRejected, compress_file, warm_up

log = structlog.get_logger("compress")
CODEC_ATTEMPTS = 3
T = TypeVar("T")
WORKER_NICENESS = 10


def pool_size(settings: CompressSettings) -> int:
    return settings.workers or os.cpu_count() or 1


def make_pool(settings: CompressSettings) -> ProcessPoolExecutor:
    # forkserver: workers do not inherit the daemon's threads (observer, DB writer) mid-flight.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["daemon.stages.codec"])
    return ProcessPoolExecutor(max_workers=pool_size(settings), mp_context=context,
                               initializer=start_worker, initargs=(os.getpid(),))


def start_worker(daemon_pid: int) -> None:
    """Pool initializer: yield the CPU to the daemon's event loop, and end with the daemon."""
    # The loop feeds the pool and answers /status; at equal priority a saturated pool starves both.
    os.nice(WORKER_NICENESS)
    exit_with(daemon_pid)


def exit_with(pid: int) -> None:
    """End this worker when the daemon ends, even by kill -9.

    A worker waits on its job queue, whose write end it holds itself, so it would never notice.
    """

    def watch() -> None:
        try:
            with os.fdopen(os.pidfd_open(pid), "rb", buffering=0) as handle:
                select.select([handle], [], [])  # readable once the process has exited
        except OSError:  # no pidfd (old kernel): poll
            while os.getppid() != 1 and _alive(pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-daemon", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def encode_settings(settings: CompressSettings) -> EncodeSettings:
    return EncodeSettings(quality=settings.quality, target_ratio=settings.target_ratio, optimize=settings.optimize,
                          progressive=settings.progressive, max_pixels=settings.max_pixels)


class CodecPool:
    """The process pool, replaced when a worker dies (the OOM killer, a crash inside a codec library)."""

    def __init__(self, settings: CompressSettings) -> None:
        self.settings = settings
        self.executor = make_pool(settings)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self.executor
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            if executor is self.executor:  # the first to notice replaces it; the others just retry
                log.warning("codec_pool_replaced", reason="a worker process died")
                executor.shutdown(wait=False, cancel_futures=True)
                self.executor = make_pool(self.settings)
            raise

    async def start(self) -> set[int]:
        """Start every worker now, not with the first image: a batch should not wait for the forkserver
        and the imports. Returns the workers' pids."""
        loop = asyncio.get_running_loop()
        # Submitted together, so none is idle yet and each submission spawns a worker of its own.
        futures = [loop.run_in_executor(self.executor, warm_up) for _ in range(pool_size(self.settings))]
        return set(await asyncio.gather(*futures))

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class CompressStage(Follower):
    name = "stage.compress"
    types = frozenset({"ImageDownloaded"})

    def __init__(self, eventlog: EventLog, pool: CodecPool, bodies: Bodies, images: Path,
                 settings: CompressSettings) -> None:
        super().__init__(eventlog)
        self.pool, self.bodies, self.images = pool, bodies, images
        self.encode = encode_settings(settings)
        # Enough queued work that no worker waits for the loop between two images.
        self.concurrency = 2 * pool_size(settings)

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        event = record.event
        assert isinstance(event, ImageDownloaded)
        where = {"product": event.product, "index": event.index}
        source = self.bodies.path(record.stream, event.product, event.index)
        try:
            result = await self.pool.run(compress_file, str(source), str(self.images), event.stem, self.encode)
        except ImageRejected as exc:
            log.info("image_failed", request_id=record.stream, error=str(exc), **where)
            return [ImageFailed(**where, stage="compress", error=str(exc))]
        except FileNotFoundError:
            return [ImageFailed(**where, stage="compress", error="the downloaded body is gone; upload the CSV again")]
        except Exception as exc:  # a dead worker, MemoryError...: try again, but never forever
            if attempt >= CODEC_ATTEMPTS:
                error = f"could not compress it in {attempt} attempts: {type(exc).__name__}: {exc}".rstrip(": ")
                log.warning("image_failed", request_id=record.stream, error=error, **where)
                return [ImageFailed(**where, stage="compress", error=error)]
            raise Retry(defer=0.2 * attempt) from None
        # vars(): its fields are plain values, and asdict's deep copy showed up in every image's profile.
        return [ImageCompressed(product=event.product, index=event.index, **vars(result))]

    async def recover(self) -> None:
        """Temp files of encodes that a crash cut short (workers end with the daemon)."""
        await asyncio.to_thread(remove_matching, self.images, ".*.tmp")

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        event = record.event
        assert isinstance(event, ImageDownloaded)
        await self.bodies.release(self.bodies.path(record.stream, event.product, event.index), event.bytes)
