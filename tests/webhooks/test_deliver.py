"""Outbound webhooks against real listeners on loopback, verified with the official standardwebhooks package."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from daemon.app import BODIES, CLIENT, EVENTLOG, WEBHOOK_CLIENT, build_app
from daemon.config import Settings
from daemon.eventlog.store import RecordedEvent
from daemon.events import (
    Event,
    ImageCompressed,
    ImageFailed,
    Product,
    RequestAccepted,
    RequestCompleted,
)
from daemon.http_api import SETTINGS
from daemon.ingest.accept import Accepted, accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.stages.download import fetch
from daemon.testing import Listener, Origin, daemon_app, drain, eventually
from daemon.views.status import StatusView, request_status
from daemon.webhooks.deliver import completion_payload, request_redelivery

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FAST = (0.05, 0.05, 0.05)


async def submit(app: web.Application, origin: Origin, webhook_url: str = "") -> Accepted:
    body = f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n".encode()
    batch = parse_csv(body, app[SETTINGS].limits)
    assert isinstance(batch, Batch)
    return await accept(app[EVENTLOG], batch, "upload", "t.csv", webhook_url=webhook_url)


async def status_of(app: web.Application, request_id: str) -> dict[str, Any]:
    body = await app[EVENTLOG].query(request_status, request_id, app[SETTINGS].public_url)
    assert body is not None
    return body


async def test_a_failing_listener_gets_three_attempts_under_one_id(make_settings: Callable[..., Settings],
                                                                   origin: Origin) -> None:
    """A listener that fails twice with 500 then succeeds receives one message id in three signed attempts."""
    async with Listener([500, 500, 200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "secret": SECRET, "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            status = await status_of(app, accepted.request_id)
    assert len(listener.received) == 3
    ids = {r.headers["webhook-id"] for r in listener.received}
    assert len(ids) == 1
    for received in listener.received:
        payload = Webhook(SECRET).verify(received.body, received.headers)  # raises if the signature is wrong
        assert payload["type"] == "request.completed"
    data = payload["data"]
    assert data["request_id"] == accepted.request_id and data["status"] == "completed"
    assert data["progress"] == {"images": 1, "done": 1, "failed": 0, "pending": 0}
    assert data["export_url"] == f"http://images.example/export/{accepted.request_id}"
    assert data["products_omitted"] is False  # within the default webhooks.max_payload_bytes
    assert data["products"] == [{
        "serial": "1", "product_name": "Shoe", "input_urls": [f"{origin.url}/img/photo.jpg"],
        "output_urls": [f"http://images.example/images/{accepted.request_id}_1_0.jpg"],
    }]
    (delivery,) = status["webhooks"]
    assert delivery["state"] == "delivered" and delivery["message_id"] == ids.pop()
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert [a["outcome"] for a in delivery["attempts"]] == ["retrying", "retrying", "delivered"]
    assert all(a["latency_ms"] >= 0 for a in delivery["attempts"])


async def test_redeliveries_requested_back_to_back_each_get_their_own_round(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """Two redeliveries requested before either is handled (a double click) are rounds 1 and 2, each delivered
    once with its own attempt 1; they used to share one round and count each other's attempts."""
    async with Listener([200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            eventlog = app[EVENTLOG]
            for _ in range(2):
                assert isinstance(await request_redelivery(eventlog, settings, accepted.request_id), tuple)
            await drain(app)
            status = await status_of(app, accepted.request_id)
    assert len(listener.received) == 3 and len({r.headers["webhook-id"] for r in listener.received}) == 1
    assert [(d["round"], d["state"], [a["attempt"] for a in d["attempts"]]) for d in status["webhooks"]] == [
        (0, "delivered", [1]), (1, "delivered", [1]), (2, "delivered", [1])]


async def test_gone_listener_is_not_retried(make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A 410 answer stops retries for that listener at once."""
    async with Listener([410]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            (delivery,) = (await status_of(app, accepted.request_id))["webhooks"]
    assert len(listener.received) == 1
    assert delivery["state"] == "gone" and delivery["attempts"][0]["status_code"] == 410


async def test_a_message_over_max_payload_bytes_is_sent_without_its_products(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A completion message over webhooks.max_payload_bytes arrives signed, without data.products and with
    data.products_omitted true and the URLs to fetch them; a redelivery sends the very same bytes."""
    async with Listener([200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "secret": SECRET, "retry_schedule": FAST,
                                           "max_payload_bytes": 100})
        app = build_app(settings, follow=False)
        async with TestClient(TestServer(app)) as client:
            accepted = await submit(app, origin)
            await drain(app)
            assert (await client.post(f"/redeliver/{accepted.request_id}")).status == 202
            await drain(app)
            status = await status_of(app, accepted.request_id)
    first, second = listener.received
    payload = Webhook(SECRET).verify(first.body, first.headers)  # raises if the signature is wrong
    data = payload["data"]
    assert data["products_omitted"] is True and "products" not in data
    assert data["export_url"] == f"http://images.example/export/{accepted.request_id}"
    assert data["status_url"] == f"http://images.example/status/{accepted.request_id}"
    assert data["status"] == "completed" and data["progress"]["done"] == 1
    assert len(first.body) > 100  # the rest of the message is sent whatever the limit
    assert second.body == first.body and second.headers["webhook-id"] == first.headers["webhook-id"]
    assert [d["state"] for d in status["webhooks"]] == ["delivered", "delivered"]


async def test_a_listener_refusing_the_message_as_too_large_is_not_retried(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A 413 answer ends the delivery as failed at once, saying why, since the same message would be refused again."""
    async with Listener([413, 200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            with capture_logs() as logs:
                await drain(app)
            (delivery,) = (await status_of(app, accepted.request_id))["webhooks"]
    assert len(listener.received) == 1
    (attempt,) = delivery["attempts"]
    size = len(listener.received[0].body)
    assert delivery["state"] == "failed" and attempt["outcome"] == "failed" and attempt["retry_in"] is None
    assert attempt["status_code"] == 413
    assert attempt["error"] == (
        f"HTTP 413 Request Entity Too Large: the listener refuses this {size}-byte message, the same on every "
        "attempt, so it is not retried (a lower [webhooks] max_payload_bytes sends it without its products)")
    (failed,) = [entry for entry in logs if entry["event"] == "webhook_failed"]
    assert failed["log_level"] == "warning" and failed["error"] == attempt["error"]


async def test_a_listener_answering_with_an_endless_body_is_read_only_a_little(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A listener that answers 200 and then streams 200 MB is recorded as delivered after the daemon read a
    little of it: the rest is never pulled into the daemon's memory."""
    sent = {"bytes": 0}
    chunk = b"x" * (1024 * 1024)

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(200):
                await response.write(chunk)
                sent["bytes"] += len(chunk)
        except (ConnectionResetError, RuntimeError):  # the daemon let go of the connection
            pass
        return response

    listener_app = web.Application()
    listener_app.router.add_post("/hook", endless)
    async with TestServer(listener_app, host="127.0.0.1") as listener:
        settings = make_settings(webhooks={"urls": (str(listener.make_url("/hook")),), "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            (delivery,) = (await status_of(app, accepted.request_id))["webhooks"]
    assert delivery["state"] == "delivered" and [a["status_code"] for a in delivery["attempts"]] == [200]
    assert sent["bytes"] < 50 * len(chunk)  # socket buffers took some; a full read would have taken all 200


async def test_hanging_listener_fails_without_delaying_the_others(make_settings: Callable[..., Settings],
                                                                  origin: Origin) -> None:
    """A listener that hangs past the timeout is retried then marked failed; another listener is served at once."""
    async with Listener(["hang"], hang_seconds=5) as slow, Listener([200]) as fast:
        settings = make_settings(webhooks={"urls": (slow.url, fast.url), "timeout": 0.3,
                                           "retry_schedule": (0.05, 0.05)})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            status = await status_of(app, accepted.request_id)
    deliveries = {d["listener"]: d for d in status["webhooks"]}
    assert deliveries[slow.url]["state"] == "failed"
    assert [a["error"] for a in deliveries[slow.url]["attempts"]] == ["timed out after 0.3 s"] * 3
    assert deliveries[fast.url]["state"] == "delivered"
    assert len(fast.received) == 1 and len(slow.received) == 3
    assert fast.received[0].at < slow.received[1].at  # served while the slow one was still being retried
    assert status["status"] == "completed"


async def test_hanging_listeners_hold_none_of_the_connections_downloads_wait_for(
        make_settings: Callable[..., Settings], origin: Origin) -> None:
    """With as many deliveries hanging as downloads may hold connections, an image still downloads within its
    connect timeout: webhooks have an HTTP client of their own (a shared one made downloads time out)."""
    async with Listener(["hang"], hang_seconds=5) as listener:
        settings = make_settings(download={"concurrency": 1, "connect_timeout": 1.0})
        async with daemon_app(settings) as app:
            hanging = [asyncio.create_task(app[WEBHOOK_CLIENT].post(listener.url, data=b"{}")) for _ in range(2)]
            try:
                await listener.wait_for(2, timeout=5)
                target = app[BODIES].path("r", 1, 0)
                size = await fetch(app[CLIENT], f"{origin.url}/img/photo.jpg", app[BODIES].writer(target),
                                   settings.download)
                assert size == len(origin.files["photo.jpg"]) == len(target.read_bytes())
            finally:
                for task in hanging:
                    task.cancel()
                await asyncio.gather(*hanging, return_exceptions=True)


async def test_pending_retry_survives_a_restart(make_settings: Callable[..., Settings], origin: Origin) -> None:
    """A retry scheduled before a stop is delivered after the restart, under the same webhook-id."""
    async with Listener([500, 200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "retry_schedule": (1.0, 1.0)})
        async with daemon_app(settings, follow=True) as app:
            accepted = await submit(app, origin)
            await listener.wait_for(1, timeout=20)
            for _ in range(400):  # until the failed attempt is in the log
                status = await status_of(app, accepted.request_id)
                if status["webhooks"] and status["webhooks"][0]["attempts"]:
                    break
                await asyncio.sleep(0.025)
        assert len(listener.received) == 1
        async with daemon_app(settings) as app:
            await drain(app)
            (delivery,) = (await status_of(app, accepted.request_id))["webhooks"]
    assert len(listener.received) == 2
    assert listener.received[0].headers["webhook-id"] == listener.received[1].headers["webhook-id"]
    assert delivery["state"] == "delivered" and [a["attempt"] for a in delivery["attempts"]] == [1, 2]
    assert listener.received[1].at - listener.received[0].at >= 0.85  # the schedule from the log was kept


async def test_per_request_listener_and_redelivery_over_http(make_settings: Callable[..., Settings],
                                                             origin: Origin) -> None:
    """A webhook_url given at upload is called, and POST /redeliver sends the same message id again."""
    async with Listener([200]) as listener:
        settings = make_settings()
        app = build_app(settings)
        async with TestClient(TestServer(app)) as client:
            form = {"file": io.BytesIO(f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n"
                                       .encode()), "webhook_url": listener.url}
            response = await client.post("/upload", data=form)
            assert response.status == 202
            request_id = (await response.json())["request_id"]
            await listener.wait_for(1, timeout=20)
            response = await client.post(f"/redeliver/{request_id}")
            assert response.status == 202
            # At once: the answer waited until the status view showed the new round.
            status = await (await client.get(f"/status/{request_id}")).json()
            assert [d["round"] for d in status["webhooks"]] == [0, 1]
            await listener.wait_for(2, timeout=20)
            unknown = await client.post("/redeliver/nope")
            assert (await unknown.json())["message"] == "no request with id 'nope'"
            assert unknown.status == 404 and (await unknown.json())["error"] == "unknown_request"

            async def both_rounds_recorded() -> dict[str, Any] | None:
                status = await (await client.get(f"/status/{request_id}")).json()
                return status if [d["state"] for d in status["webhooks"]] == ["delivered"] * 2 else None

            status = await eventually(both_rounds_recorded, "both delivery rounds in the status view")
    assert len(listener.received) == 2
    first, second = listener.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert json.loads(first.body) == json.loads(second.body)
    assert [d["round"] for d in status["webhooks"]] == [0, 1]


async def test_invalid_webhook_url_is_refused_at_upload(make_settings: Callable[..., Settings]) -> None:
    """An upload whose webhook_url is not http(s) is refused with 400 naming the field."""
    async with TestClient(TestServer(build_app(make_settings()))) as client:
        form = {"file": io.BytesIO(b"S. No.,Product Name,Input Image Urls\n1,a,http://x.example/a.jpg\n"),
                "webhook_url": "ftp://example.com/hook"}
        response = await client.post("/upload", data=form)
        body = await response.json()
    assert response.status == 400 and body["error"] == "invalid_webhook_url" and body["field"] == "webhook_url"


async def test_redirects_are_failures_and_retry_after_is_honoured(make_settings: Callable[..., Settings],
                                                                   origin: Origin) -> None:
    """A 302 is not followed and counts as a failure; a 503's Retry-After stretches the next wait beyond the schedule."""
    async with Listener([302, (503, {"Retry-After": "1"}), 200]) as listener:
        settings = make_settings(webhooks={"urls": (listener.url,), "retry_schedule": FAST})
        async with daemon_app(settings) as app:
            accepted = await submit(app, origin)
            await drain(app)
            (delivery,) = (await status_of(app, accepted.request_id))["webhooks"]
    first, second, third = delivery["attempts"]
    assert first["status_code"] == 302 and first["error"] == "HTTP 302 Found (redirects are not followed)"
    assert first["outcome"] == "retrying" and first["retry_in"] < 0.1
    assert second["status_code"] == 503 and second["retry_in"] >= 1.0
    assert third["outcome"] == "delivered" and delivery["state"] == "delivered"
    assert listener.received[2].at - listener.received[1].at >= 0.95
    assert len({r.headers["webhook-id"] for r in listener.received}) == 1


async def test_a_listener_told_of_completion_finds_status_and_export_complete(
        make_settings: Callable[..., Settings], origin: Origin, monkeypatch: Any) -> None:
    """Delivery waits for the status view, so a listener that calls back at once sees the request finished."""
    monkeypatch.setattr(StatusView, "batch_window", 2.0)  # a slow view: without the wait the callbacks see 409
    seen: list[tuple[int, str]] = []
    app = build_app(make_settings())
    async with TestClient(TestServer(app)) as client:

        async def on_webhook(request: web.Request) -> web.Response:
            request_id = (await request.json())["data"]["request_id"]
            export = await client.get(f"/export/{request_id}")
            status = await (await client.get(f"/status/{request_id}")).json()
            seen.append((export.status, status["status"]))
            return web.Response(status=204)

        listener_app = web.Application()
        listener_app.router.add_post("/hook", on_webhook)
        async with TestServer(listener_app) as listener:
            form = {"file": io.BytesIO(f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n"
                                       .encode()), "webhook_url": str(listener.make_url("/hook"))}
            response = await client.post("/upload", data=form)
            assert response.status == 202

            async def called_back() -> bool:
                return bool(seen)

            await eventually(called_back, "the webhook")
    assert seen == [(200, "completed")]


async def test_redelivery_without_a_listener_answers_409(make_settings: Callable[..., Settings],
                                                         origin: Origin) -> None:
    """POST /redeliver for a completed request with no configured listener and no webhook_url answers 409 JSON
    saying there is no one to redeliver to, and queues nothing."""
    settings = make_settings()
    app = build_app(settings)
    async with TestClient(TestServer(app)) as client:
        form = {"file": io.BytesIO(f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n"
                                   .encode())}
        request_id = (await (await client.post("/upload", data=form)).json())["request_id"]

        async def completed() -> bool:
            return (await (await client.get(f"/status/{request_id}")).json())["status"] == "completed"

        await eventually(completed, "the request to complete")
        response = await client.post(f"/redeliver/{request_id}")
        body = await response.json()
        events = [r.event.type for r in await app[EVENTLOG].read_stream(request_id)]
    assert response.status == 409
    assert body == {"error": "no_listener", "message": f"request {request_id} has no listener to redeliver to: "
                    "none in [webhooks] urls and no webhook_url given at upload"}
    assert "WebhookRedeliveryRequested" not in events and "WebhookQueued" not in events


def test_the_payload_lists_every_product_with_its_outputs_in_input_order() -> None:
    """Each product of the payload carries its own input URLs and outputs, in input order, a failed image as null."""
    products = tuple(Product(str(p), f"item {p}", str(p), tuple(f"http://o/{p}-{i}.jpg" for i in range(p + 1)))
                     for p in range(3))
    events: list[Event] = [RequestAccepted(source="upload", source_name="t.csv", products=products)]
    for p, i in [(2, 1), (0, 0), (2, 0), (1, 1), (2, 2)]:  # finished out of order; image (1, 0) failed
        events.append(ImageCompressed(product=p, index=i, name=f"r_{p}_{i}.jpg", format="JPEG", width=1, height=1,
                                      bytes_in=2, bytes_out=1, quality=50, kept_original=False, note=""))
    events += [ImageFailed(product=1, index=0, stage="download", error="HTTP 404"),
               RequestCompleted(status="completed_with_errors", images=6, done=5, failed=1)]
    records = [RecordedEvent(n, "r", n, "2026-01-01T00:00:00.000Z", e) for n, e in enumerate(events, start=1)]

    payload = completion_payload(records, "http://images.example")

    assert [(p["serial"], p["input_urls"], p["output_urls"]) for p in payload["data"]["products"]] == [
        ("0", ["http://o/0-0.jpg"], ["http://images.example/images/r_0_0.jpg"]),
        ("1", ["http://o/1-0.jpg", "http://o/1-1.jpg"], [None, "http://images.example/images/r_1_1.jpg"]),
        ("2", ["http://o/2-0.jpg", "http://o/2-1.jpg", "http://o/2-2.jpg"],
         [f"http://images.example/images/r_2_{i}.jpg" for i in range(3)]),
    ]
