"""Download stage: ImageRequested -> ImageDownloaded | ImageDownloadRetried... | ImageFailed.

Bodies are streamed to disk (see `bodies`) under a byte cap, at most `backlog` of them waiting for the
compress stage; what they are is decided later by decoding them, never by URL or Content-Type.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Sequence

import aiohttp
import structlog

from daemon.config import DownloadSettings
from daemon.control.cancellations import Cancellations, RequestCancelled
from daemon.eventlog.claims import Claims, work_of
from daemon.eventlog.follower import Follower, Passed, Retry
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import (
    Event,
    ImageDownloaded,
    ImageDownloadRetried,
    ImageFailed,
    ImageRequested,
    ImageRequeued,
    names,
)
from daemon.metrics import Metrics
from daemon.network import INVALID_HOST_NAME, AddressNotAllowed
from daemon.stages.bodies import Bodies, BodyWriter

log = structlog.get_logger("download")

TRANSIENT_STATUS = frozenset({408, 425, 429})  # and every 5xx: proxies and CDNs use the whole range (520-527)
# Chunks are written in batches of this much: one hop to a thread for most photos (up to 2 MB), and at most
# 2 x concurrency x this much in memory.
FLUSH_BYTES = 2 * 1024 * 1024


class DownloadError(Exception):
    """Why an image could not be fetched; `transient` ones are retried."""

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not just isdigit: '²' is a digit float() cannot read
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # a zone offset of 20 digits overflows
        return None
    return max(0.0, when.timestamp() - time.time())


async def fetch(client: aiohttp.ClientSession, url: str, body: BodyWriter, settings: DownloadSettings) -> int:
    """Stream `url` into `body`; its size in bytes, or DownloadError with a user-facing reason."""
    timeout = aiohttp.ClientTimeout(total=settings.total_timeout, sock_connect=settings.connect_timeout,
                                    connect=settings.connect_timeout)
    limit = settings.max_bytes
    try:
        # aiohttp raises on the N-th redirect response; +1 lets exactly `max_redirects` be followed.
        async with client.get(url, timeout=timeout, max_redirects=settings.max_redirects + 1,
                              headers={"Accept": "image/*,*/*;q=0.5"}) as response:
            if response.status in TRANSIENT_STATUS or response.status >= 500:
                raise DownloadError(f"HTTP {response.status} {response.reason or ''}".strip(), transient=True,
                                    retry_after=retry_after_seconds(response.headers.get("Retry-After")))
            if response.status >= 400 or response.status < 200:
                raise DownloadError(f"HTTP {response.status} {response.reason or ''}".strip())
            if response.status >= 300:  # aiohttp follows a redirect it can; this one has no usable Location
                raise DownloadError(f"HTTP {response.status} {response.reason or ''}".strip()
                                    + ", a redirect with no Location to follow")
            if response.content_length is not None and response.content_length > limit:
                raise DownloadError(f"image is {response.content_length} bytes, over the limit of {limit} bytes")
            size = 0
            pending: list[bytes] = []
            pending_bytes = 0
            try:
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    if size > limit:
                        raise DownloadError(f"image is over the limit of {limit} bytes")
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= FLUSH_BYTES:
                        await body.flush(pending)
                        pending, pending_bytes = [], 0
                await body.complete(pending)
            except BaseException:
                body.discard()
                raise
            return size
    except AddressNotAllowed as exc:
        raise DownloadError(str(exc)) from None
    except aiohttp.TooManyRedirects:
        raise DownloadError(f"too many redirects (more than {settings.max_redirects})") from None
    except aiohttp.InvalidURL as exc:
        raise DownloadError(f"invalid URL: {exc}") from None
    except aiohttp.NonHttpUrlClientError as exc:  # e.g. a redirect to ftp:// or file://: the same every time
        raise DownloadError(f"redirected to a URL that is not http(s): {exc}") from None
    except UnicodeError:  # the resolver's IDNA encoding, reached through a redirect to such a host
        raise DownloadError(INVALID_HOST_NAME) from None
    except TimeoutError:
        raise DownloadError(f"timed out (connect {settings.connect_timeout:g} s, total {settings.total_timeout:g} s)",
                            transient=True) from None
    except aiohttp.ClientConnectorCertificateError as exc:  # expired, self-signed, another name: not by waiting
        raise DownloadError(f"the server's TLS certificate is not valid for {exc.host}: "
                            f"{getattr(exc.certificate_error, 'verify_message', None) or exc.certificate_error}") from None
    except aiohttp.ClientConnectorError as exc:
        raise DownloadError(f"cannot connect to {exc.host}:{exc.port}: {exc.os_error or exc}", transient=True) from None
    except aiohttp.ClientError as exc:
        raise DownloadError(f"connection failed: {exc.__class__.__name__}: {exc}", transient=True) from None


class DownloadStage(Follower):
    name = "stage.download"
    types = names(ImageRequested, ImageRequeued)

    def __init__(self, eventlog: EventLog, client: aiohttp.ClientSession, bodies: Bodies,
                 settings: DownloadSettings, cancellations: Cancellations, metrics: Metrics,
                 claims: Claims | None = None) -> None:
        super().__init__(eventlog)
        self.client, self.bodies, self.settings = client, bodies, settings
        self.cancellations, self.metrics = cancellations, metrics
        self.claims = claims  # with other daemons on the database: only the images this one claims
        self.concurrency = settings.concurrency
        self._earlier: dict[int, int] = {}  # position -> attempts made before a restart
        bodies.listen(self.wake)

    def startable(self, busy: int, deferred: int = 0) -> int:
        """Every download in flight becomes a waiting body: together they stay within the backlog. A download
        waiting to try again holds no connection slot but keeps its body's place in the backlog, or a batch
        that answers 429 to every first request would start all its downloads and land them all on disk.
        Once the backlog is full, downloads start again in batches, not one per compressed image: each start
        costs a read of the log and a commit."""
        room = min(self.concurrency - busy, self.bodies.vacancies - busy - deferred)
        return room if room >= min(self.concurrency, self.bodies.limit) // 2 else 0

    async def admit(self, records: list[RecordedEvent]) -> list[RecordedEvent]:
        """The page's images this daemon claims (in one statement), and those of cancelled requests (finished
        without a claim)."""
        if self.claims is None:
            return records
        claims = self.claims
        asked = [r for r in records if not self.cancellations.is_cancelled(r.stream)]
        taken = await asyncio.gather(*(claims.claim(r) for r in asked))
        refused = {r.position for r, mine in zip(asked, taken, strict=True) if not mine}
        return [r for r in records if r.position not in refused]

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        computed = min(self.settings.backoff_max, self.settings.backoff_base * 2.0 ** (attempt - 1))
        computed *= random.uniform(0.5, 1.0)
        if retry_after is not None:
            return min(self.settings.backoff_max, max(retry_after, computed))
        return computed

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        event = record.event
        assert isinstance(event, ImageRequested)
        if self.cancellations.is_cancelled(record.stream):
            return ()
        if self.claims is not None and not await self.claims.claim(record):
            raise Passed  # another daemon does it
        where = {"product": event.product, "index": event.index}
        target = self.bodies.path(record.stream, event.product, event.index)
        if attempt == 1 and record.position <= self.head_at_start:
            self._earlier[record.position] = await self._attempts_before_restart(record.stream, event)
        if attempt == 1:
            self.metrics.waited("download", record)
        attempt += self._earlier.get(record.position, 0)
        try:
            # A full working folder pauses the download (from the start again) without spending an attempt.
            with self.metrics.downloading():
                size = await self.cancellations.unless_cancelled(record.stream, self.space.retry_while_full(
                    "work", lambda: fetch(self.client, event.url, self.bodies.writer(target), self.settings)))
        except RequestCancelled:
            return ()
        except DownloadError as exc:
            if exc.transient and attempt < self.settings.attempts:
                delay = self.backoff(attempt, exc.retry_after)
                raise Retry(defer=delay, events=(
                    ImageDownloadRetried(**where, attempt=attempt, error=str(exc), retry_in=round(delay, 3),
                                         round=event.round),
                )) from None
            suffix = f" (after {attempt} attempts)" if exc.transient else ""
            log.info("image_failed", request_id=record.stream, url=event.url, error=str(exc), **where)
            return [ImageFailed(**where, stage="download", error=f"download failed: {exc}{suffix}", attempts=attempt)]
        self.bodies.arrived(target, size)
        # With claims, its node's compress stage takes it: the body is on this daemon's disk.
        node, item = (self.claims.node, record.position) if self.claims is not None else ("", 0)
        return [ImageDownloaded(product=event.product, index=event.index, stem=event.stem, bytes=size,
                                attempts=attempt, node=node, item=item)]

    def guard(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        """An image that ends here (failed, or its request cancelled) settles its claim, if this daemon still has it."""
        if self.claims is None:
            return
        settling = [(record.position, work_of(record), results) for record, results in finished
                    if self.claims.holds(record.position) and not _downloaded(results)]
        if settling:
            self.claims.guard_sync(settling)

    async def _attempts_before_restart(self, stream: str, event: ImageRequested) -> int:
        """Attempts already made in this round for an image this daemon took over mid-retry (counted from the log)."""
        records = await self.eventlog.read_stream(stream, names(ImageDownloadRetried))
        return sum(1 for r in records if isinstance(r.event, ImageDownloadRetried) and r.event.round == event.round
                   and (r.event.product, r.event.index) == (event.product, event.index))

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        self._earlier.pop(record.position, None)
        self.metrics.settled(results)
        if self.claims is not None and not _downloaded(results):
            self.claims.settled([record.position])


def _downloaded(results: Sequence[Event]) -> bool:
    return any(isinstance(event, ImageDownloaded) for event in results)
