"""The status view: one row per request and per image, folded from the log. Rebuildable from 0."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import peewee

from daemon.eventlog.follower import Follower
from daemon.eventlog.models import BaseModel, execute, insert_rows, placeholders
from daemon.eventlog.store import RecordedEvent
from daemon.events import (
    Event,
    ImageCompressed,
    ImageDownloaded,
    ImageDownloadRetried,
    ImageEvent,
    ImageFailed,
    ImageRequeued,
    NotificationReceived,
    RequestAccepted,
    RequestCompleted,
    RequestDeleted,
    RequestRetried,
    WebhookAttempted,
    WebhookQueued,
    WebhookRedeliveryRequested,
    names,
)

DONE_STATES = ("compressed", "kept_original")
OPEN_STATES = ("pending", "retrying", "downloaded")  # an image not settled yet


class StatusRequest(BaseModel):
    request_id = peewee.CharField(primary_key=True, max_length=64)
    source = peewee.CharField(max_length=16)
    source_name = peewee.CharField(max_length=255)
    status = peewee.CharField(max_length=32)
    created_at = peewee.CharField(max_length=40)
    updated_at = peewee.CharField(max_length=40)
    completed_at = peewee.CharField(max_length=40, null=True)
    images = peewee.IntegerField()
    done = peewee.IntegerField(default=0)
    failed = peewee.IntegerField(default=0)

    class Meta:
        table_name = "view_status_requests"
        indexes = ((("created_at",), False),)  # GET /requests pages newest first


class StatusImage(BaseModel):
    request_id = peewee.CharField(max_length=64)
    product = peewee.IntegerField()
    index = peewee.IntegerField()  # type: ignore[assignment]  # the image's place in its URL cell
    serial = peewee.CharField()
    product_name = peewee.TextField()
    input_url = peewee.TextField()
    status = peewee.CharField(max_length=32, default="pending")
    attempts = peewee.IntegerField(default=0)
    output_name = peewee.CharField(null=True)
    format = peewee.CharField(null=True, max_length=16)
    width = peewee.IntegerField(null=True)
    height = peewee.IntegerField(null=True)
    bytes_in = peewee.IntegerField(null=True)
    bytes_out = peewee.IntegerField(null=True)
    note = peewee.TextField(null=True)
    error = peewee.TextField(null=True)
    quality = peewee.IntegerField(null=True)
    ssim = peewee.DoubleField(null=True)  # not float4 on PostgreSQL: its AVG would widen 0.91364 to 0.9136400222

    class Meta:
        table_name = "view_status_images"
        primary_key = peewee.CompositeKey("request_id", "product", "index")


class StatusDelivery(BaseModel):
    """One webhook message to one listener (one row per redelivery round)."""

    request_id = peewee.CharField(max_length=64)
    message_id = peewee.CharField(max_length=128)
    listener = peewee.TextField()
    round = peewee.IntegerField()
    state = peewee.CharField(max_length=16, default="pending")
    queued_at = peewee.CharField(max_length=40)

    class Meta:
        table_name = "view_status_deliveries"
        primary_key = peewee.CompositeKey("request_id", "message_id", "listener", "round")


class StatusAttempt(BaseModel):
    request_id = peewee.CharField(max_length=64, index=True)
    message_id = peewee.CharField(max_length=128)
    listener = peewee.TextField()
    round = peewee.IntegerField()
    attempt = peewee.IntegerField()
    outcome = peewee.CharField(max_length=16)
    status_code = peewee.IntegerField(null=True)
    error = peewee.TextField()
    latency_ms = peewee.FloatField()
    retry_in = peewee.FloatField(null=True)
    at = peewee.CharField(max_length=40)

    class Meta:
        table_name = "view_status_attempts"
        primary_key = False


class StatusNotification(BaseModel):
    request_id = peewee.CharField(max_length=64, index=True)
    webhook_id = peewee.CharField(max_length=255)
    kind = peewee.CharField(max_length=32)
    status = peewee.CharField(max_length=64)
    verified = peewee.BooleanField()
    received_at = peewee.CharField(max_length=40)

    class Meta:
        table_name = "view_status_notifications"
        primary_key = False


STATUS_TABLES: tuple[type[BaseModel], ...] = (StatusRequest, StatusImage, StatusDelivery, StatusAttempt,
                                              StatusNotification)


class StatusView(Follower):
    name = "view.status"
    types = names(RequestAccepted, ImageDownloadRetried, ImageDownloaded, ImageCompressed, ImageFailed, RequestCompleted,
                  WebhookQueued, WebhookAttempted, NotificationReceived, RequestRetried, ImageRequeued, RequestDeleted,
                  WebhookRedeliveryRequested)
    ordered = True
    concurrency = 500
    batch_window = 0.05  # one image event after another: batch them

    def update_tables(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        apply([record for record, _ in finished])


def apply(records: Iterable[RecordedEvent]) -> None:
    """Fold events into the status tables, in order (pure: only the events' own data and times). A run of image
    events is written in one statement per set of columns it changes and one for the requests' rows (their counts
    summed), not a statement per event."""
    run = _Run()
    for record in records:
        if isinstance(record.event, ImageEvent):
            run.add(record)
        else:
            run.write()  # before an event that reads or sets the same rows
            _apply_request(record)
    run.write()


def _apply_request(record: RecordedEvent) -> None:
    event, rid, at = record.event, record.stream, record.recorded_at
    if isinstance(event, RequestAccepted):
        StatusRequest.insert(
            request_id=rid, source=event.source, source_name=event.source_name, status="queued",
            created_at=at, updated_at=at, images=event.image_count,
        ).on_conflict_ignore().execute()
        insert_rows('INSERT INTO view_status_images (request_id, product, "index", serial, product_name, input_url, '
                    "status, attempts)",
                    [(rid, p, i, product.serial, product.product_name, url, "pending", 0)
                     for p, product in enumerate(event.products) for i, url in enumerate(product.input_urls)],
                    " ON CONFLICT DO NOTHING")
        return
    if isinstance(event, RequestCompleted):
        StatusRequest.update(status=event.status, completed_at=at, updated_at=at).where(
            StatusRequest.request_id == rid).execute()
        if event.status == "cancelled":
            StatusImage.update(status="cancelled").where(
                (StatusImage.request_id == rid) & StatusImage.status.in_(OPEN_STATES)).execute()
        return
    if isinstance(event, RequestRetried):
        StatusRequest.update(status="processing", completed_at=None, updated_at=at,
                             failed=StatusRequest.failed - len(event.images)).where(
            StatusRequest.request_id == rid).execute()
        return
    if isinstance(event, RequestDeleted):
        for table in STATUS_TABLES:
            table.delete().where(table.request_id == rid).execute()  # type: ignore[attr-defined]
        return
    if isinstance(event, WebhookRedeliveryRequested):
        _queue_redelivery(rid, event.message_id, at)
        return
    if isinstance(event, WebhookQueued):
        StatusDelivery.insert(request_id=rid, message_id=event.message_id, listener=event.listener, round=event.round,
                              queued_at=at).on_conflict_ignore().execute()
        return
    if isinstance(event, WebhookAttempted):
        StatusAttempt.insert(
            request_id=rid, message_id=event.message_id, listener=event.listener, round=event.round,
            attempt=event.attempt, outcome=event.outcome, status_code=event.status_code, error=event.error,
            latency_ms=event.latency_ms, retry_in=event.retry_in, at=at).execute()
        StatusDelivery.update(state=event.outcome).where(
            (StatusDelivery.request_id == rid) & (StatusDelivery.message_id == event.message_id)
            & (StatusDelivery.listener == event.listener) & (StatusDelivery.round == event.round)).execute()
        return
    if isinstance(event, NotificationReceived):
        StatusNotification.insert(request_id=rid, webhook_id=event.webhook_id, kind=event.kind, status=event.status,
                                  verified=event.verified, received_at=at).execute()
        return
    raise TypeError(event)


@dataclass
class _Counts:
    """What a run of image events adds to a request's row."""

    updated_at: str
    done: int = 0
    failed: int = 0


@dataclass
class _Run:
    """A run of image events folded in memory: each image's changes (a later event's over an earlier one's, as
    applying them in turn would leave them) and each request's counts."""

    images: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)
    requests: dict[str, _Counts] = field(default_factory=dict)

    def add(self, record: RecordedEvent) -> None:
        event = record.event
        assert isinstance(event, ImageEvent)
        self.images.setdefault((record.stream, event.product, event.index), {}).update(_image_changes(event))
        request = self.requests.setdefault(record.stream, _Counts(record.recorded_at))
        request.updated_at = record.recorded_at
        request.done += isinstance(event, ImageCompressed)
        request.failed += isinstance(event, ImageFailed)

    def write(self) -> None:
        by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for key, changes in self.images.items():
            columns = tuple(sorted(changes, key=_IMAGE_COLUMNS.index))
            by_columns.setdefault(columns, []).append((*key, *(changes[c] for c in columns)))
        for columns, rows in by_columns.items():
            _update_from_values(StatusImage, ("request_id", "product", "index"), columns, rows)
        _update_from_values(StatusRequest, ("request_id",), ("updated_at", "done", "failed"),
                            [(rid, c.updated_at, c.done, c.failed) for rid, c in self.requests.items()],
                            _REQUEST_ASSIGNMENTS)
        self.images.clear()
        self.requests.clear()


ROWS_PER_UPDATE = 1000  # x at most 14 columns: within SQLite's 32,766 parameters per statement


def _update_from_values(table: type[BaseModel], keys: tuple[str, ...], columns: tuple[str, ...],
                        rows: Sequence[tuple[Any, ...]], assignments: str = "") -> None:
    """Update `table`'s rows by their `keys` from `rows` (keys, then columns; `v.<column>` in `assignments`, by
    default each column set to its value): a statement per ROWS_PER_UPDATE rows."""
    for start in range(0, len(rows), ROWS_PER_UPDATE):
        chunk = rows[start:start + ROWS_PER_UPDATE]
        execute(_update_sql(table, keys, columns, len(chunk), assignments), [v for row in chunk for v in row])


@functools.lru_cache(maxsize=256)
def _update_sql(table: type[BaseModel], keys: tuple[str, ...], columns: tuple[str, ...], rows: int,
                assignments: str) -> str:
    """`WITH v AS (VALUES ...) UPDATE ... FROM v`, which both databases run. The first row is cast to the columns'
    types: PostgreSQL would take a column of NULLs or strings in VALUES as text, which an integer column refuses."""
    name, fields = table._meta.table_name, table._meta.fields
    names = ", ".join(f'"{c}"' for c in (*keys, *columns))
    first = ", ".join(f"CAST(? AS {_SQL_TYPES[fields[c].field_type]})" for c in (*keys, *columns))
    values = ", ".join([f"({first})", *[f"({placeholders(len(keys) + len(columns))})"] * (rows - 1)])
    on = " AND ".join(f'{name}."{k}" = v."{k}"' for k in keys)
    sets = assignments or ", ".join(f'"{c}" = v."{c}"' for c in columns)
    return f"WITH v ({names}) AS (VALUES {values}) UPDATE {name} SET {sets} FROM v WHERE {on}"


def _queue_redelivery(rid: str, message_id: str, at: str) -> None:
    """The next round of a message, pending, for each listener it went to: the n-th redelivery request is round n,
    as webhook delivery numbers it, so the row is there before the delivery stage queues it."""
    rounds = list(StatusDelivery.select(StatusDelivery.listener, peewee.fn.MAX(StatusDelivery.round)).where(
        (StatusDelivery.request_id == rid) & (StatusDelivery.message_id == message_id)).group_by(
        StatusDelivery.listener).tuples())
    for listener, last in cast(Iterable[tuple[str, int]], rounds):
        StatusDelivery.insert(request_id=rid, message_id=message_id, listener=listener, round=last + 1,
                              queued_at=at).on_conflict_ignore().execute()


# Hand-written: these run for every batch of image events (see eventlog.models.execute).
_IMAGE_COLUMNS = [f.column_name for f in StatusImage._meta.sorted_fields]
_SQL_TYPES = {"VARCHAR": "VARCHAR", "TEXT": "TEXT", "INT": "INTEGER", "DOUBLE": "DOUBLE PRECISION"}
# The counts add to the request's; queued -> processing with the first image event, in the same statement.
_REQUEST_ASSIGNMENTS = (
    'updated_at = v.updated_at, done = view_status_requests.done + v.done, '
    "failed = view_status_requests.failed + v.failed, status = CASE WHEN view_status_requests.status = 'queued' "
    "THEN 'processing' ELSE view_status_requests.status END"
)


def _image_changes(event: ImageEvent) -> dict[str, Any]:
    if isinstance(event, ImageDownloadRetried):
        return {"status": "retrying", "attempts": event.attempt, "error": event.error}
    if isinstance(event, ImageDownloaded):
        return {"status": "downloaded", "attempts": event.attempts, "bytes_in": event.bytes, "error": None}
    if isinstance(event, ImageCompressed):
        return {
            "status": "kept_original" if event.kept_original else "compressed", "output_name": event.name,
            "format": event.format, "width": event.width, "height": event.height, "bytes_in": event.bytes_in,
            "bytes_out": event.bytes_out, "note": event.note or None, "error": None, "quality": event.quality,
            "ssim": event.ssim,
        }
    if isinstance(event, ImageFailed):
        return {"status": "failed", "error": event.error, **({"attempts": event.attempts} if event.attempts else {})}
    if isinstance(event, ImageRequeued):
        return {"status": "pending", "attempts": 0, "error": None}
    raise TypeError(event)


def image_url(images_url: str, name: str | None) -> str | None:
    """An output image's URL; `images_url` is Settings.images_url (the store's public URL or the daemon's)."""
    return f"{images_url}/{name}" if name else None


@dataclass(frozen=True)
class Page:
    """Products `offset` to `offset + limit - 1` (0-based, in input order) of a request."""

    offset: int = 0
    limit: int | None = None


def request_status(request_id: str, public_url: str, with_products: bool = True,
                   page: Page | None = None, images_url: str | None = None) -> dict[str, Any] | None:
    """The GET /status body for one request, or None; without `products` when not asked for, or with one page of
    them (image URLs under `images_url`, by default the daemon's /images). Run it through EventLog.query, whose
    read transaction makes its queries see one moment."""
    return _request_status(request_id, public_url, with_products, page, images_url or f"{public_url}/images")


def _request_status(request_id: str, public_url: str, with_products: bool,
                    page: Page | None, images_url: str) -> dict[str, Any] | None:
    request = StatusRequest.get_or_none(StatusRequest.request_id == request_id)
    if request is None:
        return None
    body: dict[str, Any] = {
        "request_id": request.request_id,
        "status": request.status,
        "source": {"kind": request.source, "name": request.source_name},
        "created_at": request.created_at,
        "updated_at": request.updated_at,
        "completed_at": request.completed_at,
        "progress": progress(request),
        "compression": compression(request_id),
        "status_url": f"{public_url}/status/{request.request_id}",
    }
    if with_products:
        body["products"] = products(request_id, images_url, page or Page())
        if page is not None:
            body["page"] = page_links(request_id, public_url, page)
    body["webhooks"] = webhooks(request_id)
    body["notifications"] = [
        {"webhook_id": n.webhook_id or None, "kind": n.kind, "status": n.status, "verified": n.verified,
         "received_at": n.received_at}
        for n in StatusNotification.select().where(StatusNotification.request_id == request_id).order_by(
            StatusNotification.received_at)
    ]
    return body


def page_links(request_id: str, public_url: str, page: Page) -> dict[str, Any]:
    """Where a page of products sits among all of them, and the URL of the next page (None after the last)."""
    total = StatusImage.select(peewee.fn.COUNT(StatusImage.product.distinct())).where(
        StatusImage.request_id == request_id).scalar() or 0
    following = page.offset + page.limit if page.limit is not None else total
    return {
        "offset": page.offset, "limit": page.limit, "products_total": total,
        "next": f"{public_url}/status/{request_id}?offset={following}&limit={page.limit}" if following < total else None,
    }


def products(request_id: str, images_url: str, page: Page = Page()) -> list[dict[str, Any]]:
    """A request's products (all, or one page of them) with their images, in input order."""
    found: list[dict[str, Any]] = []
    # Plain rows, not model instances: this runs for every poll and the ORM objects cost most of it.
    columns = (StatusImage.product, StatusImage.serial, StatusImage.product_name, StatusImage.input_url,
               StatusImage.status, StatusImage.output_name, StatusImage.bytes_in, StatusImage.bytes_out,
               StatusImage.width, StatusImage.height, StatusImage.format, StatusImage.attempts, StatusImage.note,
               StatusImage.error, StatusImage.quality, StatusImage.ssim)
    where = (StatusImage.request_id == request_id) & (StatusImage.product >= page.offset)
    if page.limit is not None:
        where &= StatusImage.product < page.offset + page.limit
    rows = StatusImage.select(*columns).where(where).order_by(StatusImage.product, StatusImage.index).tuples()
    for (product, serial, name, input_url, state, output_name, bytes_in, bytes_out, width, height, fmt, attempts,
         note, error, quality, ssim) in cast(Iterable[tuple[Any, ...]], rows):
        if not found or found[-1]["_product"] != product:
            found.append({"_product": product, "serial": serial, "product_name": name, "images": []})
        found[-1]["images"].append({
            "input_url": input_url, "status": state, "output_url": image_url(images_url, output_name),
            "bytes_in": bytes_in, "bytes_out": bytes_out, "width": width, "height": height, "format": fmt,
            "attempts": attempts, "quality": quality, "ssim": ssim, "note": note, "error": error,
        })
    for product in found:
        del product["_product"]
    return found


def compression(request_id: str) -> dict[str, Any]:
    """What the request's done images came to: bytes in, out and saved, and the mean and lowest score of those
    scored (None while none is)."""
    done = (StatusImage.request_id == request_id) & StatusImage.status.in_(DONE_STATES)
    row = cast(tuple[Any, ...], StatusImage.select(
        peewee.fn.SUM(StatusImage.bytes_in), peewee.fn.SUM(StatusImage.bytes_out), peewee.fn.COUNT(StatusImage.ssim),
        peewee.fn.AVG(StatusImage.ssim), peewee.fn.MIN(StatusImage.ssim)).where(done).tuples().get())
    bytes_in, bytes_out, scored, mean, lowest = row
    bytes_in, bytes_out = int(bytes_in or 0), int(bytes_out or 0)
    return {"bytes_in": bytes_in, "bytes_out": bytes_out, "bytes_saved": bytes_in - bytes_out, "scored": scored,
            "ssim_mean": None if mean is None else round(float(mean), 5),
            "ssim_lowest": None if lowest is None else float(lowest)}


def webhooks(request_id: str) -> list[dict[str, Any]]:
    attempts: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for a in StatusAttempt.select().where(StatusAttempt.request_id == request_id).order_by(StatusAttempt.attempt):
        attempts.setdefault((a.message_id, a.listener, a.round), []).append({
            "attempt": a.attempt, "outcome": a.outcome, "status_code": a.status_code, "error": a.error or None,
            "latency_ms": a.latency_ms, "retry_in": a.retry_in, "at": a.at,
        })
    deliveries = StatusDelivery.select().where(StatusDelivery.request_id == request_id).order_by(
        StatusDelivery.queued_at, StatusDelivery.round, StatusDelivery.listener)
    return [
        {"message_id": d.message_id, "listener": d.listener, "round": d.round, "state": d.state,
         "attempts": attempts.get((d.message_id, d.listener, d.round), [])}
        for d in deliveries
    ]


def progress(request: StatusRequest) -> dict[str, int]:
    open_images = request.images - request.done - request.failed
    if request.status == "cancelled":  # never to be done: not pending
        return {"images": request.images, "done": request.done, "failed": request.failed, "pending": 0,
                "cancelled": open_images}
    return {"images": request.images, "done": request.done, "failed": request.failed, "pending": open_images}
