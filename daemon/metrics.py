"""What /metrics tells an operator: the daemon's metric objects, the calls that feed them, and the endpoint.

Each app owns a registry (tests run several apps in one process). Counters live as long as the process and
start at zero with it, as Prometheus expects. The stages call the small methods below where an outcome
happens; what is cheaper to look at than to track (the backlog, each consumer's lag) is read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from daemon.eventlog.follower import Follower
from daemon.eventlog.models import execute, placeholders
from daemon.eventlog.store import EventLog, RecordedEvent, parse_iso
from daemon.events import Event, ImageCompressed, ImageFailed
from daemon.http_api import Handler
from daemon.stages.bodies import Bodies

# Seconds: from a small image on a local origin to a download or encode that hits its timeout.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds an image waits for a stage: from none to a large batch queued behind others for hours.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
UNMATCHED_ROUTE = "unmatched"  # any path no route takes: one label value, whatever the path was

# In the text format each counter's creation time would be a gauge series of its own (imgpipe_images_created...):
# noise to every dashboard, and the process start time says the same.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # imgpipe_process_start_time_seconds, CPU seconds, memory, open files (Linux).
        ProcessCollector(namespace="imgpipe", registry=registry)
        self.images = Counter("imgpipe_images", "Images settled, by outcome: compressed, kept (the original was "
                              "smaller) or failed", ["outcome"], registry=registry)
        self.bytes_in = Counter("imgpipe_image_in_bytes", "Bytes of the downloaded originals of settled images",
                                registry=registry)
        self.bytes_out = Counter("imgpipe_image_out_bytes", "Bytes of the stored images", registry=registry)
        self.download_seconds = Histogram("imgpipe_download_duration_seconds", "One download attempt, from the "
                                          "request to the last byte on disk (or its error)",
                                          buckets=DURATION_BUCKETS, registry=registry)
        self.compress_seconds = Histogram("imgpipe_compress_duration_seconds", "One image's decode and encode in "
                                          "a codec worker", buckets=DURATION_BUCKETS, registry=registry)
        self.queue_wait_seconds = Histogram("imgpipe_queue_wait_seconds", "From an image's event in the log to "
                                            "its stage starting on it (download: since requested; compress: since "
                                            "downloaded)", ["stage"], buckets=WAIT_BUCKETS, registry=registry)
        self.in_flight = Gauge("imgpipe_images_in_flight", "Images a stage is working on now (compress: handed "
                               "to the codec pool)", ["stage"], registry=registry)
        self.backlog = Gauge("imgpipe_download_backlog_images", "Downloaded images waiting for the compress stage",
                             registry=registry)
        self.backlog_bytes = Gauge("imgpipe_download_backlog_bytes", "Bytes of the downloaded images waiting for "
                                   "the compress stage", registry=registry)
        self.webhook_deliveries = Counter("imgpipe_webhook_deliveries", "Webhook delivery attempts, by outcome: "
                                          "delivered, retrying, failed, gone", ["outcome"], registry=registry)
        self.consumer_lag = Gauge("imgpipe_consumer_lag_events", "Events of the types a consumer takes that it "
                                  "has not finished (after its checkpoint)", ["consumer"], registry=registry)
        self.http_requests = Counter("imgpipe_http_requests", "HTTP requests answered, by method, route pattern "
                                     "and status", ["method", "route", "status"], registry=registry)
        for stage in ("download", "compress"):  # present from the start, so a graph has a line before any work
            self.in_flight.labels(stage)
            self.queue_wait_seconds.labels(stage)
        for outcome in ("compressed", "kept", "failed"):
            self.images.labels(outcome)
        self._watched: tuple[EventLog, Bodies, Sequence[Follower]] | None = None

    # called by the stages -----------------------------------------------------------------------
    def settled(self, results: Sequence[Event]) -> None:
        """A stage committed these results: count the images they settle."""
        for event in results:
            if isinstance(event, ImageCompressed):
                self.images.labels("kept" if event.kept_original else "compressed").inc()
                self.bytes_in.inc(event.bytes_in)
                self.bytes_out.inc(event.bytes_out)
            elif isinstance(event, ImageFailed):
                self.images.labels("failed").inc()

    def waited(self, stage: str, record: RecordedEvent) -> None:
        """`stage` starts on the image `record` asked for."""
        waited = time.time() - parse_iso(record.recorded_at)
        self.queue_wait_seconds.labels(stage).observe(max(0.0, waited))  # the wall clock may have stepped back

    @contextmanager
    def downloading(self) -> Iterator[None]:
        with self.in_flight.labels("download").track_inprogress(), self.download_seconds.time():
            yield

    @contextmanager
    def compressing(self) -> Iterator[None]:
        with self.in_flight.labels("compress").track_inprogress():
            yield

    def webhook_attempted(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    # read at scrape time --------------------------------------------------------------------------
    def watch(self, eventlog: EventLog, bodies: Bodies, followers: Sequence[Follower]) -> None:
        self._watched = (eventlog, bodies, followers)

    async def exposition(self) -> bytes:
        if self._watched is not None:
            eventlog, bodies, followers = self._watched
            self.backlog.set(bodies.waiting)
            self.backlog_bytes.set(bodies.waiting_bytes)
            marks = [(f.name, f.checkpoint, f.types) for f in followers]
            done = {f.name: f.done_above_checkpoint for f in followers}
            for name, after in (await eventlog.query(events_after, marks)).items():
                self.consumer_lag.labels(name).set(max(0, after - done[name]))
        return generate_latest(self.registry)


def events_after(marks: Sequence[tuple[str, int, frozenset[str]]]) -> dict[str, int]:
    """(reader thread) For each consumer, the events of its types after its checkpoint. Not head minus checkpoint:
    a consumer is woken only by its own types, so its checkpoint stands still while others' events pass it."""
    lags = {}
    for name, checkpoint, types in marks:
        wanted = sorted(types)
        row = execute(f"SELECT count(*) FROM events WHERE position > ? AND type IN ({placeholders(len(wanted))})",
                      (checkpoint, *wanted)).fetchone()
        lags[name] = int(row[0])
    return lags


METRICS = web.AppKey("metrics", Metrics)


def route_of(request: web.Request) -> str:
    """The pattern of the route that took the request (`/status/{request_id}`): never the raw path, so the label
    has as many values as there are routes."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def counting(metrics: Metrics) -> Middleware:
    """Outermost middleware: it sees the status every other one settled on (a 401, a JSON error)."""
    def count(request: web.Request, status: int) -> None:
        metrics.http_requests.labels(request.method, route_of(request), str(status)).inc()

    @web.middleware
    async def counted(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            count(request, exc.status)
            raise
        except Exception:
            count(request, 500)
            raise
        count(request, response.status)
        return response

    return counted


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await request.app[METRICS].exposition()
    # The text format every Prometheus version reads (what prometheus_client answers a scraper by default).
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
