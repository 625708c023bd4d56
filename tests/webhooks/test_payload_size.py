"""The request.completed body against webhooks.max_payload_bytes, built from recorded events."""

from __future__ import annotations

import json

from daemon.config import WebhookSettings
from daemon.eventlog.store import RecordedEvent
from daemon.events import (
    Event,
    ImageCompressed,
    Product,
    RequestAccepted,
    RequestCompleted,
)
from daemon.webhooks.deliver import completion_body


def completed_request(products: int) -> list[RecordedEvent]:
    """The events of a completed request whose products have non-ASCII names (more bytes than characters)."""
    listed = tuple(Product(str(p), f"Chaussure bleue № {p} — été", str(p), (f"http://o/{p}.jpg",))
                   for p in range(products))
    events: list[Event] = [RequestAccepted(source="upload", source_name="t.csv", products=listed)]
    events += [ImageCompressed(product=p, index=0, name=f"r_{p}_0.jpg", format="JPEG", width=1, height=1,
                               bytes_in=2, bytes_out=1, quality=50, kept_original=False, note="")
               for p in range(products)]
    events.append(RequestCompleted(status="completed", images=products, done=products, failed=0))
    return [RecordedEvent(n, "r", n, "2026-01-01T00:00:00.000Z", e) for n, e in enumerate(events, start=1)]


def test_the_limit_counts_the_utf8_bytes_of_the_body_as_sent() -> None:
    """Products are kept up to exactly max_payload_bytes of the UTF-8 body and left out one byte below, and
    characters are not bytes."""
    records = completed_request(3)
    full = completion_body(records, "http://images.example", 10**9)
    size = len(full.encode("utf-8"))
    assert len(full) < size  # the names' non-ASCII characters take several bytes each

    assert completion_body(records, "http://images.example", size) == full
    for limit in (size - 1, len(full)):
        data = json.loads(completion_body(records, "http://images.example", limit))["data"]
        assert data["products_omitted"] is True and "products" not in data
    data = json.loads(full)["data"]
    assert data["products_omitted"] is False and len(data["products"]) == 3
    assert data["products"][0]["product_name"] == "Chaussure bleue № 0 — été"


def test_ten_thousand_products_fit_a_one_megabyte_listener_by_default() -> None:
    """With the default limit a 10,000-product completion is sent without its products, well under the 1 MB a
    stock listener (and our own POST /webhook) accepts; a 10-product one keeps them."""
    default = WebhookSettings().max_payload_bytes
    assert default == 256 * 1024
    large = completion_body(completed_request(10_000), "http://images.example", default)
    assert len(large.encode("utf-8")) < default and json.loads(large)["data"]["products_omitted"] is True
    small = json.loads(completion_body(completed_request(10), "http://images.example", default))["data"]
    assert small["products_omitted"] is False and len(small["products"]) == 10
