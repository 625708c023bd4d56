"""The event catalogue's JSON form: what the log stores and reads back."""

from __future__ import annotations

import dataclasses
import json

import pytest

from daemon.events import (
    Event,
    ImageCompressed,
    ImageFailed,
    Product,
    RequestAccepted,
    decode,
)

EXAMPLES: list[Event] = [
    RequestAccepted(source="upload", source_name="batch.csv", webhook_url="https://hooks.example/x",
                    products=(Product(serial="1", product_name="Ünïcode ☂", slug="1",
                                      input_urls=("https://a.example/1.jpg", "https://a.example/2.png")),)),
    ImageCompressed(product=0, index=1, name="r_1_1.jpg", format="JPEG", width=20, height=10, bytes_in=900,
                    bytes_out=400, kept_original=False, quality=50, note=""),
    ImageFailed(product=2, index=0, stage="download", error="download failed: HTTP 404 Not Found"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_events_round_trip_through_their_json(event: Event) -> None:
    """Decoding an event's stored JSON gives back an equal event, nested products and all."""
    assert decode(event.type, event.to_json()) == event


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_stored_json_is_the_dataclass_fields_unescaped(event: Event) -> None:
    """The stored form is every field by name, non-ASCII kept as is: logs written before and after agree."""
    stored = event.to_json()
    assert json.loads(stored) == json.loads(json.dumps(dataclasses.asdict(event)))
    assert "\\u" not in stored
