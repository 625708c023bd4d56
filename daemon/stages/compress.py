"""Compress stage: ImageDownloaded -> ImageCompressed | ImageFailed, the codec running in the process pool."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import structlog

from daemon.config import CompressSettings
from daemon.control.cancellations import Cancellations
from daemon.eventlog.claims import Claims, downloaded_work
from daemon.eventlog.follower import Follower, Passed, Retry
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import (
    IMAGE_TERMINAL,
    Event,
    ImageCompressed,
    ImageDownloaded,
    ImageEvent,
    ImageFailed,
    ImageRequested,
    ImageRequeued,
    names,
)
from daemon.metrics import Metrics
from daemon.stages.bodies import Bodies
from daemon.stages.codec import BodyGone, EncodeSettings, ImageRejected, compress_file
from daemon.stages.pool import CodecPool, JobTimedOut, pool_size, timed
from daemon.storage import ImageStore

log = structlog.get_logger("compress")
CODEC_ATTEMPTS = 3


def encode_settings(settings: CompressSettings) -> EncodeSettings:
    return EncodeSettings(quality=settings.quality, target_ratio=settings.target_ratio, optimize=settings.optimize,
                          progressive=settings.progressive, max_pixels=settings.max_pixels,
                          target_ssim=settings.target_ssim, ssim=settings.ssim, ssim_max_side=settings.ssim_max_side,
                          jpeg_fast_path=settings.jpeg_fast_path)


class CompressStage(Follower):
    name = "stage.compress"
    types = names(ImageDownloaded)
    # One commit (a hop to the writer thread, a transaction) per image was the stage's largest cost in the daemon:
    # results share one, waiting for up to batch_size of them or batch_window, while the work queued in the pool
    # keeps the workers busy. By count, not only time: a daemon with one worker (one of several sharing a database)
    # commits as seldom per image as one with two.
    batch_window = 0.25
    batch_size = 8

    def __init__(self, eventlog: EventLog, pool: CodecPool, bodies: Bodies, images: ImageStore,
                 settings: CompressSettings, cancellations: Cancellations, metrics: Metrics,
                 claims: Claims | None = None) -> None:
        super().__init__(eventlog)
        self.claims = claims  # with other daemons on the database: only the bodies this one downloaded
        self.addressee = claims.node if claims is not None else None
        self.pool, self.bodies, self.images = pool, bodies, images
        self.cancellations, self.metrics = cancellations, metrics
        self.encode = encode_settings(settings)
        # Enough queued work that no worker waits for the loop between two images, nor while a batch of results
        # waits for its commit (an image takes 15-40 ms); the bodies themselves are bounded by the download backlog.
        self._keep_busy = 2 * pool_size(settings)
        self.concurrency = max(8 * pool_size(settings), self.batch_size + 2 * self._keep_busy)
        self._settling = 0  # images of the last commit that `committed` has yet to see
        self._spent: list[tuple[Path, int]] = []  # their bodies, recycled together after the last

    def in_a_hurry(self) -> bool:
        # Too little queued to keep the workers busy through a batch window (the end of a batch, or a slow
        # download): commit and read more work at once.
        return self.pool.outstanding < self._keep_busy

    async def admit(self, records: list[RecordedEvent]) -> list[RecordedEvent]:
        """The bodies on this daemon's disk."""
        return records if self.claims is None else [r for r in records if self._mine(r.event)]  # type: ignore[arg-type]

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        event = record.event
        assert isinstance(event, ImageDownloaded)
        if not self._mine(event):
            raise Passed  # its body is on another daemon's disk
        if self.claims is not None and event.item:
            self.claims.hold(downloaded_work(record))  # renewed while it waits here, after a restart too
        if self.cancellations.is_cancelled(record.stream):
            return ()  # its body is recycled on commit, like any other
        where = {"product": event.product, "index": event.index}
        source = self.bodies.path(record.stream, event.product, event.index)
        if attempt == 1:
            self.metrics.waited("compress", record)
        try:
            # A full images folder or a store that is down pauses the image; it is no attempt of CODEC_ATTEMPTS,
            # and never fails it.
            with self.metrics.compressing():
                result, seconds = await self.space.retry_while_full(self.images.place, lambda: self.pool.run(
                    timed, compress_file, str(source), self.images, event.stem, self.encode))
        except ImageRejected as exc:
            log.info("image_failed", request_id=record.stream, error=str(exc), **where)
            return [ImageFailed(**where, stage="compress", error=str(exc))]
        except BodyGone:  # working files are emptied on a clean stop, or removed by hand: not the image's fault
            return [await self._requeued(record.stream, event)]
        except JobTimedOut as exc:  # not tried again: the same image would hold a worker as long each time
            error = f"compress failed: {exc}"
            log.warning("image_failed", request_id=record.stream, error=error, **where)
            return [ImageFailed(**where, stage="compress", error=error)]
        except Exception as exc:  # a dead worker, MemoryError...: try again, but never forever
            if attempt >= CODEC_ATTEMPTS:
                error = f"could not compress it in {attempt} attempts: {type(exc).__name__}: {exc}".rstrip(": ")
                log.warning("image_failed", request_id=record.stream, error=error, **where)
                return [ImageFailed(**where, stage="compress", error=error)]
            raise Retry(defer=0.2 * attempt) from None
        if self.in_a_hurry():  # the workers are about to run dry: commit and start more now, not after the window
            self.end_window()
        self.metrics.compress_seconds.observe(seconds)
        # vars(): its fields are plain values, and asdict's deep copy showed up in every image's profile.
        return [ImageCompressed(product=event.product, index=event.index, **vars(result))]

    async def _requeued(self, stream: str, event: ImageDownloaded) -> ImageRequeued:
        """The image's download again, in its current round."""
        records = await self.eventlog.read_stream(stream)
        requested = [r.event for r in records if isinstance(r.event, ImageRequested)
                     and (r.event.product, r.event.index) == (event.product, event.index)][-1]
        log.info("image_requeued", request_id=stream, product=event.product, index=event.index,
                 reason="downloaded body gone")
        return ImageRequeued(product=event.product, index=event.index, url=requested.url, stem=requested.stem,
                             round=requested.round, reason="the downloaded body was gone: downloading it again")

    async def recover(self) -> None:
        """Temp files of encodes that a crash cut short (workers end with the daemon), and bodies whose image was
        settled just before a crash, before they became recycled files: nobody will take them, so they must not fill the
        backlog (were they all of it, downloads would wait for them forever)."""
        await self.images.recover()
        for request_id, waiting in self.bodies.waiting_by_request().items():
            records = await self.eventlog.read_stream(request_id, IMAGE_TERMINAL | names(ImageRequeued))
            settled: set[tuple[int, int]] = set()
            for r in records:  # in log order: a requeued image is open again
                if isinstance(r.event, ImageEvent):
                    image = (r.event.product, r.event.index)
                    (settled.discard if isinstance(r.event, ImageRequeued) else settled.add)(image)
            spent = [path for path in waiting if self.bodies.image_of(path) in settled]
            await asyncio.to_thread(self._recycle_all, spent)
            for path in spent:
                self.bodies.released(path)

    def _recycle_all(self, paths: list[Path]) -> None:
        """(thread)"""
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.bodies.recycle(path, path.stat().st_size)

    def _mine(self, event: ImageDownloaded) -> bool:
        return self.claims is None or event.node in ("", self.claims.node)

    def guard(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        """The image's outcome settles its claim, and is refused if another daemon took the image over. (Writer
        thread, in every commit's transaction: it also tells `committed` how many images the commit settles.)"""
        self._settling = len(finished)
        if self.claims is None:
            return
        settling = [(record.position, downloaded_work(record), results) for record, results in finished
                    if isinstance(record.event, ImageDownloaded) and record.event.item and self._mine(record.event)]
        if settling:
            self.claims.guard_sync(settling)

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        """The body's image is settled in the log: it becomes a recycled file, and makes room for a download. The
        bodies of one commit go together, after its last image: one hop to a thread per commit, not per image."""
        event = record.event
        assert isinstance(event, ImageDownloaded)
        self._settling -= 1
        self.metrics.settled(results)
        if self._mine(event):
            if self.claims is not None:
                self.claims.settled([event.item])
            self._spent.append((self.bodies.path(record.stream, event.product, event.index), event.bytes))
        if self._settling > 0 or not self._spent:
            return
        spent, self._spent = self._spent, []
        try:
            await asyncio.to_thread(self._recycle_spent, spent)
        finally:
            for path, _ in spent:
                self.bodies.released(path)

    def _recycle_spent(self, spent: list[tuple[Path, int]]) -> None:
        """(thread)"""
        for path, size in spent:
            self.bodies.recycle(path, size)
