"""POST /webhook: signed, unsigned, tampered, stale and replayed notifications against the real app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook

from daemon.app import build_app
from daemon.config import Settings
from daemon.views.status import StatusView

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CSV = b"S. No.,Product Name,Input Image Urls\n1,Shoe,http://127.0.0.1:9/a.jpg\n"


def signed(body: bytes, msg_id: str, when: datetime | None = None, secret: str = SECRET) -> dict[str, str]:
    """Headers a Standard Webhooks sender would send, made with the official package."""
    when = when or datetime.now(UTC)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
            "Content-Type": "application/json"}


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    def factory(**webhooks: object) -> TestClient:  # type: ignore[type-arg]
        settings = make_settings(webhooks=webhooks, download={"attempts": 1})
        return TestClient(TestServer(build_app(settings)))
    return factory


@pytest.fixture
async def client(make_client: Callable[..., TestClient]) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with make_client(inbound_secret=SECRET) as c:
        yield c


async def new_request(client: TestClient) -> str:  # type: ignore[type-arg]
    response = await client.post("/upload", data=CSV, headers={"Content-Type": "text/csv"})
    assert response.status == 202
    return str((await response.json())["request_id"])


def classic(request_id: str) -> bytes:
    return json.dumps({"image_id": request_id, "status": "completed",
                       "output_images": ["http://x.example/a.jpg"]}).encode()


async def notifications(client: TestClient, request_id: str) -> list[dict[str, Any]]:  # type: ignore[type-arg]
    for _ in range(200):  # the status view folds the notification promptly
        body = await (await client.get(f"/status/{request_id}")).json()
        if body["notifications"]:
            return list(body["notifications"])
        await asyncio.sleep(0.02)
    return []


async def test_signed_classic_notification_is_recorded_as_verified(client: TestClient) -> None:  # type: ignore[type-arg]
    """A correctly signed classic notification answers 202 and shows under notifications, verified."""
    request_id = await new_request(client)
    body = classic(request_id)
    response = await client.post("/webhook", data=body, headers=signed(body, "msg_1"))
    assert response.status == 202
    assert await response.json() == {"request_id": request_id, "recorded": True, "duplicate": False,
                                     "verified": True}
    (note,) = await notifications(client, request_id)
    assert note["webhook_id"] == "msg_1" and note["kind"] == "classic" and note["verified"] is True


async def test_our_own_payload_is_accepted(client: TestClient) -> None:  # type: ignore[type-arg]
    """A request.completed payload (one daemon notifying another) is recorded with its status."""
    request_id = await new_request(client)
    body = json.dumps({"type": "request.completed", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"request_id": request_id, "status": "completed_with_errors"}}).encode()
    response = await client.post("/webhook", data=body, headers=signed(body, "msg_own"))
    assert response.status == 202
    (note,) = await notifications(client, request_id)
    assert note["kind"] == "request.completed" and note["status"] == "completed_with_errors"


async def test_replayed_webhook_id_is_acknowledged_once(client: TestClient) -> None:  # type: ignore[type-arg]
    """The same webhook-id sent twice is acknowledged both times and recorded once."""
    request_id = await new_request(client)
    body = classic(request_id)
    first = await client.post("/webhook", data=body, headers=signed(body, "msg_dup"))
    second = await client.post("/webhook", data=body, headers=signed(body, "msg_dup"))
    assert first.status == second.status == 202
    assert (await second.json())["duplicate"] is True
    assert len(await notifications(client, request_id)) == 1


@pytest.mark.parametrize("case", ["unsigned", "tampered", "stale", "wrong_secret", "garbage_signature"])
async def test_bad_signatures_are_refused(client: TestClient, case: str) -> None:  # type: ignore[type-arg]
    """Without a valid, fresh signature the notification is refused with 401 and nothing is recorded."""
    request_id = await new_request(client)
    body = classic(request_id)
    headers = {
        "unsigned": {"Content-Type": "application/json"},
        "tampered": signed(classic("someone-else"), "msg_t"),
        "stale": signed(body, "msg_s", datetime.now(UTC) - timedelta(minutes=6)),
        "wrong_secret": signed(body, "msg_w", secret="whsec_" + "A" * 32),
        "garbage_signature": {**signed(body, "msg_g"), "webhook-signature": "v1"},
    }[case]
    response = await client.post("/webhook", data=body, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_signature"
    status = await (await client.get(f"/status/{request_id}")).json()
    assert status["notifications"] == []


async def test_unsigned_notifications_are_recorded_unverified_without_a_secret(
        make_client: Callable[..., TestClient]) -> None:  # type: ignore[type-arg]
    """With no inbound secret configured, a notification is accepted and marked unverified."""
    async with make_client() as client:
        request_id = await new_request(client)
        response = await client.post("/webhook", data=classic(request_id), headers={"Content-Type": "application/json"})
        assert response.status == 202 and (await response.json())["verified"] is False
        (note,) = await notifications(client, request_id)
        assert note["verified"] is False and note["webhook_id"] is None


async def test_notification_does_not_change_processing_state(make_client: Callable[..., TestClient]) -> None:  # type: ignore[type-arg]
    """A 'completed' notification leaves the status the daemon computed itself (here: failed) untouched."""
    async with make_client() as client:
        request_id = await new_request(client)  # its one image points at a closed port, so it fails
        for _ in range(500):
            before = await (await client.get(f"/status/{request_id}")).json()
            if before["status"] == "failed":
                break
            await asyncio.sleep(0.02)
        assert before["status"] == "failed"
        response = await client.post("/webhook", data=classic(request_id), headers={"Content-Type": "application/json"})
        assert response.status == 202
        await notifications(client, request_id)
        after = await (await client.get(f"/status/{request_id}")).json()
    assert after["status"] == "failed" and after["progress"] == before["progress"]
    assert after["products"] == before["products"]


@pytest.mark.parametrize(("body", "headers", "status", "error", "field"), [
    (b"{not json", {"Content-Type": "application/json"}, 400, "invalid_notification", None),
    (b'["a list"]', {"Content-Type": "application/json"}, 400, "invalid_notification", None),
    (b'{"status": "completed", "output_images": []}', {"Content-Type": "application/json"}, 400,
     "invalid_notification", "image_id"),
    (b'{"image_id": "x", "status": "completed"}', {"Content-Type": "application/json"}, 400,
     "invalid_notification", "output_images"),
    (b'{"type": "request.completed", "data": {"status": "completed"}}', {"Content-Type": "application/json"},
     400, "invalid_notification", "data.request_id"),
    (b'{"image_id": "nope", "status": "completed", "output_images": []}', {"Content-Type": "application/json"},
     404, "unknown_request", None),
    (b"image_id=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type", None),
    (b"{" + b" " * (2 * 1024 * 1024) + b"}", {"Content-Type": "application/json"}, 413, "too_large", None),
])
async def test_malformed_notifications_get_clear_errors(make_client: Callable[..., TestClient], body: bytes,
                                                        headers: dict[str, str], status: int, error: str,
                                                        field: str | None) -> None:  # type: ignore[type-arg]
    """Malformed, unknown, wrongly typed or oversized notifications get a 4xx JSON naming the problem."""
    async with make_client() as client:
        response = await client.post("/webhook", data=body, headers=headers)
        payload = await response.json()
    assert response.status == status and payload["error"] == error
    if field:
        assert payload["field"] == field and field.split(".")[-1] in payload["message"]


async def test_text_that_is_no_unicode_is_refused_or_replaced(make_client: Callable[..., TestClient]) -> None:  # type: ignore[type-arg]
    """A JSON string holding a lone surrogate escape answers 400 naming it, and a webhook-id header that is not UTF-8
    is recorded with U+FFFD for its bad byte; both used to answer 500, as neither could be stored."""
    async with make_client() as client:
        request_id = await new_request(client)
        lone = json.dumps({"image_id": request_id, "status": "\ud800", "output_images": []}).encode()
        response = await client.post("/webhook", data=lone, headers={"Content-Type": "application/json"})
        payload = await response.json()
        assert (response.status, payload["error"]) == (400, "invalid_notification")
        assert payload["message"] == "malformed JSON: a string holds '\\ud800', a lone surrogate that is not a character"
        # A raw request: aiohttp's client only sends UTF-8 headers.
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        body = classic(request_id)
        host = f"{client.server.host}:{client.server.port}".encode()  # the daemon refuses names not its own
        writer.write(b"POST /webhook HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"webhook-id: msg_\xe4\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (host, len(body), body))
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 202"), answer
        (note,) = await notifications(client, request_id)
    assert note["webhook_id"] == "msg_\ufffd"


async def test_a_recorded_notification_shows_in_the_status_at_once(make_client: Callable[..., Any],
                                                                   monkeypatch: Any) -> None:
    """POST /webhook answers only once the status view shows the notification, however slow the view."""
    monkeypatch.setattr(StatusView, "batch_window", 2.0)
    async with make_client() as client:
        request_id = await new_request(client)
        response = await client.post("/webhook", data=classic(request_id), headers={"webhook-id": "msg_now",
                                                                                    "Content-Type": "application/json"})
        assert response.status == 202
        body = await (await client.get(f"/status/{request_id}")).json()
    assert [n["webhook_id"] for n in body["notifications"]] == ["msg_now"]
