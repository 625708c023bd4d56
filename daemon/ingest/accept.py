"""Turn a validated batch into the events that open a request's stream."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import structlog

from daemon.eventlog.store import EventLog
from daemon.events import Event, ImageRequested, Product, RequestAccepted
from daemon.ingest.csvfile import Batch

log = structlog.get_logger("ingest")


@dataclass(frozen=True)
class Accepted:
    request_id: str
    products: int
    images: int
    position: int


def new_request_id() -> str:
    return uuid.uuid4().hex


def idempotent_request_id(key: str) -> str:
    """The request id an Idempotency-Key maps to: the stream's uniqueness then makes the key single-use."""
    return hashlib.sha256(f"idempotency-key:{key}".encode()).hexdigest()[:32]


def image_stem(request_id: str, product: Product, index: int) -> str:
    """The output file name without extension: <request_id>_<product slug>_<index>."""
    return f"{request_id}_{product.slug}_{index}"


def opening_events(request_id: str, batch: Batch, source: str, source_name: str, webhook_url: str = "",
                   idempotency_key: str = "", body_sha256: str = "", node: str = "") -> list[Event]:
    accepted = RequestAccepted(
        source=source, source_name=source_name, products=batch.products, webhook_url=webhook_url,
        idempotency_key=idempotency_key, body_sha256=body_sha256, node=node,
    )
    images: list[Event] = [
        ImageRequested(product=p, index=i, url=url, stem=image_stem(request_id, product, i))
        for p, product in enumerate(batch.products)
        for i, url in enumerate(product.input_urls)
    ]
    return [accepted, *images]


async def accept(eventlog: EventLog, batch: Batch, source: str, source_name: str, *,
                 request_id: str | None = None, webhook_url: str = "", idempotency_key: str = "",
                 body_sha256: str = "", node: str = "") -> Accepted:
    """Open a new stream; raises StreamConflict if `request_id` was accepted already. `node`: the daemon taking it
    in, when several share the database (its outbox gets the result)."""
    request_id = request_id or new_request_id()
    events = opening_events(request_id, batch, source, source_name, webhook_url, idempotency_key, body_sha256, node)
    position = await eventlog.append(request_id, events, expected_version=0)
    accepted = Accepted(request_id, len(batch.products), batch.image_count, position)
    log.info("csv_accepted", request_id=request_id, source=source, source_name=source_name,
             products=accepted.products, images=accepted.images)
    return accepted
