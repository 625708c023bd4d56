"""The status view: one row per request and per image, folded from the log. Rebuildable from 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import peewee

from daemon.eventlog.follower import Follower
from daemon.eventlog.models import BaseModel
from daemon.eventlog.store import RecordedEvent
from daemon.events import (
    Event, ImageCompressed, ImageDownloaded, ImageDownloadRetried, ImageEvent, ImageFailed, RequestAccepted,
    RequestCompleted,
)

DONE_STATES = ("compressed", "kept_original")


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


class StatusImage(BaseModel):
    request_id = peewee.CharField(max_length=64)
    product = peewee.IntegerField()
    index = peewee.IntegerField()
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

    class Meta:
        table_name = "view_status_images"
        primary_key = peewee.CompositeKey("request_id", "product", "index")


STATUS_TABLES: tuple[type[BaseModel], ...] = (StatusRequest, StatusImage)


class StatusView(Follower):
    name = "view.status"
    types = frozenset({
        "RequestAccepted", "ImageDownloadRetried", "ImageDownloaded", "ImageCompressed", "ImageFailed",
        "RequestCompleted",
    })
    ordered = True
    concurrency = 500

    def write(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        apply(record)


def apply(record: RecordedEvent) -> None:
    """Fold one event into the status tables (pure: only the event's own data and time)."""
    event, rid, at = record.event, record.stream, record.recorded_at
    if isinstance(event, RequestAccepted):
        StatusRequest.insert(
            request_id=rid, source=event.source, source_name=event.source_name, status="queued",
            created_at=at, updated_at=at, images=event.image_count,
        ).on_conflict_ignore().execute()
        rows = [
            {"request_id": rid, "product": p, "index": i, "serial": product.serial,
             "product_name": product.product_name, "input_url": url}
            for p, product in enumerate(event.products) for i, url in enumerate(product.input_urls)
        ]
        for start in range(0, len(rows), 2000):
            StatusImage.insert_many(rows[start:start + 2000]).on_conflict_ignore().execute()
        return
    if isinstance(event, RequestCompleted):
        StatusRequest.update(status=event.status, completed_at=at, updated_at=at).where(
            StatusRequest.request_id == rid).execute()
        return
    assert isinstance(event, ImageEvent)
    image = StatusImage.update(**_image_changes(event)).where(
        (StatusImage.request_id == rid) & (StatusImage.product == event.product) & (StatusImage.index == event.index))
    image.execute()
    request: dict[Any, Any] = {StatusRequest.updated_at: at}
    if isinstance(event, ImageCompressed):
        request[StatusRequest.done] = StatusRequest.done + 1
    elif isinstance(event, ImageFailed):
        request[StatusRequest.failed] = StatusRequest.failed + 1
    StatusRequest.update(request).where(StatusRequest.request_id == rid).execute()
    StatusRequest.update(status="processing").where(
        (StatusRequest.request_id == rid) & (StatusRequest.status == "queued")).execute()


def _image_changes(event: ImageEvent) -> dict[str, Any]:
    if isinstance(event, ImageDownloadRetried):
        return {"status": "retrying", "attempts": event.attempt, "error": event.error}
    if isinstance(event, ImageDownloaded):
        return {"status": "downloaded", "attempts": event.attempts, "bytes_in": event.bytes, "error": None}
    if isinstance(event, ImageCompressed):
        return {
            "status": "kept_original" if event.kept_original else "compressed", "output_name": event.name,
            "format": event.format, "width": event.width, "height": event.height, "bytes_in": event.bytes_in,
            "bytes_out": event.bytes_out, "note": event.note or None, "error": None,
        }
    if isinstance(event, ImageFailed):
        return {"status": "failed", "error": event.error}
    raise TypeError(event)


def image_url(public_url: str, name: str | None) -> str | None:
    return f"{public_url}/images/{name}" if name else None


def request_status(request_id: str, public_url: str) -> dict[str, Any] | None:
    """The GET /status body for one request, or None (reader thread)."""
    request = StatusRequest.get_or_none(StatusRequest.request_id == request_id)
    if request is None:
        return None
    products: list[dict[str, Any]] = []
    images = StatusImage.select().where(StatusImage.request_id == request_id).order_by(
        StatusImage.product, StatusImage.index)
    for image in images:
        if not products or products[-1]["_product"] != image.product:
            products.append({"_product": image.product, "serial": image.serial,
                             "product_name": image.product_name, "images": []})
        products[-1]["images"].append({
            "input_url": image.input_url,
            "status": image.status,
            "output_url": image_url(public_url, image.output_name),
            "bytes_in": image.bytes_in,
            "bytes_out": image.bytes_out,
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "attempts": image.attempts,
            "note": image.note,
            "error": image.error,
        })
    for product in products:
        del product["_product"]
    return {
        "request_id": request.request_id,
        "status": request.status,
        "source": {"kind": request.source, "name": request.source_name},
        "created_at": request.created_at,
        "updated_at": request.updated_at,
        "completed_at": request.completed_at,
        "progress": progress(request),
        "status_url": f"{public_url}/status/{request.request_id}",
        "products": products,
    }


def progress(request: StatusRequest) -> dict[str, int]:
    return {
        "images": request.images, "done": request.done, "failed": request.failed,
        "pending": request.images - request.done - request.failed,
    }
