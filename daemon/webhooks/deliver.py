"""Outbound webhooks: on RequestCompleted, one signed Standard Webhooks message to every listener.

Each (message, listener) is queued as its own event, so a slow or dead listener holds up no one else.
Attempts are events; the next one is scheduled from the last attempt's time and `retry_in` in the log,
so pending retries survive a restart. The `webhook-id` is derived from the completion event.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from daemon.config import Settings
from daemon.eventlog.follower import Follower, Retry
from daemon.eventlog.store import EventLog, RecordedEvent, parse_iso
from daemon.events import (
    Event,
    RequestAccepted,
    RequestCompleted,
    RequestDeleted,
    WebhookAttempted,
    WebhookQueued,
    WebhookRedeliveryRequested,
)
from daemon.http_api import EVENTLOG, SETTINGS, STATUS_VIEW, json_error, json_response
from daemon.metrics import Metrics
from daemon.network import AddressNotAllowed
from daemon.stages.download import retry_after_seconds
from daemon.views.export import ExportImage, stream_images
from daemon.views.status import image_url

log = structlog.get_logger("webhooks")

TERMINAL = frozenset({"delivered", "failed", "gone"})
MAX_RETRY_AFTER = 86_400.0  # a listener may ask for a pause, not for a message to wait forever
LISTENER_ANSWER_BYTES = 64 * 1024  # of a listener's answer read before the connection is let go


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one delivery attempt came back with."""

    status: int | None
    error: str
    latency_ms: float
    retry_after: float | None = None
    final: bool = False  # another attempt cannot succeed: the delivery fails now


def message_id(request_id: str, completed_version: int) -> str:
    return f"msg_{request_id}_{completed_version}"


def completion_payload(records: Sequence[RecordedEvent], public_url: str,
                       with_products: bool = True, images_url: str | None = None) -> dict[str, Any]:
    """The request.completed message body, a pure function of the request's events."""
    accepted, images = stream_images(records)
    completed = [r for r in records if isinstance(r.event, RequestCompleted)][-1]
    event = completed.event
    assert isinstance(event, RequestCompleted)
    request_id = completed.stream
    data: dict[str, Any] = {
        "request_id": request_id,
        "status": event.status,
        "progress": {"images": event.images, "done": event.done, "failed": event.failed, "pending": 0},
        "status_url": f"{public_url}/status/{request_id}",
        "export_url": f"{public_url}/export/{request_id}",
        "products_omitted": not with_products,
    }
    if with_products:
        by_product: dict[int, list[ExportImage]] = {}
        for image in images:  # one pass: a scan per product made a 10,000-image payload take 1.5 s on the loop
            by_product.setdefault(image.product, []).append(image)
        products: list[dict[str, Any]] = []
        for p, product in enumerate(accepted.products):
            mine = by_product.get(p, [])
            products.append({"serial": product.serial, "product_name": product.product_name,
                             "input_urls": [i.input_url for i in mine],
                             "output_urls": [image_url(images_url or f"{public_url}/images", i.output_name)
                                             for i in mine]})
        data["products"] = products
    return {"type": "request.completed", "timestamp": completed.recorded_at, "data": data}


def completion_body(records: Sequence[RecordedEvent], public_url: str, max_bytes: int,
                    images_url: str | None = None) -> str:
    """The message as signed and sent: with its products if that stays within `max_bytes` of UTF-8, else
    without them (a listener's body limit, often 1 MB, would refuse it on every retry). The same events and
    settings give the same bytes, so a redelivery under the same webhook-id repeats the message exactly."""
    body = encode(completion_payload(records, public_url, images_url=images_url))
    if len(body.encode("utf-8")) > max_bytes:
        body = encode(completion_payload(records, public_url, with_products=False))
    return body


def encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def signed_headers(secret: str, msg_id: str, body: str) -> dict[str, str]:
    now = datetime.now(UTC)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
               "content-type": "application/json", "user-agent": "imgpipe/0.1"}
    if secret:
        headers["webhook-signature"] = Webhook(secret).sign(msg_id, now, body)
    return headers


class WebhookDelivery(Follower):
    name = "webhooks.deliver"
    types = frozenset({"RequestCompleted", "WebhookQueued", "WebhookRedeliveryRequested"})
    concurrency = 256  # a waiting retry holds a slot; these are cheap sleeping tasks

    def __init__(self, eventlog: EventLog, client: aiohttp.ClientSession, settings: Settings, metrics: Metrics,
                 status_view: Follower | None = None) -> None:
        super().__init__(eventlog)
        self.client, self.settings, self.status_view = client, settings, status_view
        self.metrics = metrics

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        event = record.event
        if isinstance(event, RequestCompleted | WebhookRedeliveryRequested):
            return await self._queue(record)
        assert isinstance(event, WebhookQueued)
        return await self._deliver(record, event)

    async def _queue(self, record: RecordedEvent) -> list[Event]:
        records = await self.eventlog.read_stream(record.stream)
        accepted = records[0].event
        assert isinstance(accepted, RequestAccepted)
        if isinstance(record.event, WebhookRedeliveryRequested):
            # The n-th request for a message is its round n, counted in the log up to this request: the rounds
            # queued so far would not do, as a request handled before the one ahead of it committed its round
            # would take the same number, and the two would share one round's attempts.
            msg_id = record.event.message_id
            next_round = sum(1 for r in records if r.version <= record.version
                             and isinstance(r.event, WebhookRedeliveryRequested) and r.event.message_id == msg_id)
        else:
            msg_id, next_round = message_id(record.stream, record.version), 0
            if self.status_view is not None:
                # A listener told "completed" may fetch /status or /export at once: they must agree.
                await self.status_view.wait_for(record.position)
        return [WebhookQueued(message_id=msg_id, listener=url, round=next_round)
                for url in listeners(self.settings, accepted)]

    async def _deliver(self, record: RecordedEvent, queued: WebhookQueued) -> list[Event]:
        records = await self.eventlog.read_stream(record.stream)
        tried = [r for r in records if isinstance(r.event, WebhookAttempted) and r.event.message_id == queued.message_id
                 and r.event.listener == queued.listener and r.event.round == queued.round]
        if tried:
            last = tried[-1].event
            assert isinstance(last, WebhookAttempted)
            if last.outcome in TERMINAL:
                return []
            # Scheduled from the log: after a restart the wait is whatever is left of it.
            due = parse_iso(tried[-1].recorded_at) + (last.retry_in or 0)
            wait = due - time.time()
            if wait > 0:
                raise Retry(defer=wait)
        number = len(tried) + 1
        # The message is of one completion (a retried request completes again, with a message of its own).
        completed = next(i for i, r in enumerate(records) if message_id(r.stream, r.version) == queued.message_id)
        body = completion_body(records[: completed + 1], self.settings.public_url,
                               self.settings.webhooks.max_payload_bytes, self.settings.images_url)
        answer = await self._post(queued, body)

        def attempted(outcome: str, retry_in: float | None = None) -> WebhookAttempted:
            self.metrics.webhook_attempted(outcome)
            return WebhookAttempted(message_id=queued.message_id, listener=queued.listener, round=queued.round,
                                    attempt=number, outcome=outcome, status_code=answer.status, error=answer.error,
                                    latency_ms=answer.latency_ms, retry_in=retry_in)

        schedule = self.settings.webhooks.retry_schedule
        if answer.status is not None and 200 <= answer.status < 300:
            result = attempted("delivered")
        elif answer.status == 410:
            result = attempted("gone")
        elif answer.final or number > len(schedule):
            result = attempted("failed")
        else:
            delay = schedule[number - 1] * random.uniform(0.9, 1.1)
            if answer.retry_after is not None and answer.status in (429, 503):
                delay = max(delay, min(answer.retry_after, MAX_RETRY_AFTER))
            retrying = attempted("retrying", retry_in=round(delay, 3))
            log.info("webhook_retrying", request_id=record.stream, **dataclasses.asdict(retrying))
            raise Retry(defer=delay, events=(retrying,))
        level = log.warning if result.outcome == "failed" else log.info
        level(f"webhook_{result.outcome}", request_id=record.stream, **dataclasses.asdict(result))
        return [result]

    async def _post(self, queued: WebhookQueued, body: str) -> Answer:
        """One attempt."""
        headers = signed_headers(self.settings.webhooks.secret, queued.message_id, body)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhooks.timeout)
        data = body.encode("utf-8")
        started = time.perf_counter()

        def latency() -> float:
            return round((time.perf_counter() - started) * 1000, 1)

        try:
            async with self.client.post(queued.listener, data=data, headers=headers,
                                        timeout=timeout, allow_redirects=False) as response:
                # Read a little, so a short answer leaves the connection reusable; never the whole of a long one:
                # a listener (any uploader may name one) streaming gigabytes must not fill the daemon's memory.
                await response.content.read(LISTENER_ANSWER_BYTES)
                status = response.status
                error = "" if 200 <= status < 300 else f"HTTP {status} {response.reason or ''}".strip()
                if 300 <= status < 400:
                    error += " (redirects are not followed)"
                if status == 413:
                    error += (f": the listener refuses this {len(data)}-byte message, the same on every attempt, so it"
                              " is not retried (a lower [webhooks] max_payload_bytes sends it without its products)")
                return Answer(status, error, latency(), retry_after_seconds(response.headers.get("Retry-After")),
                              final=status == 413)
        except AddressNotAllowed as exc:  # the listener's name resolves inside: so will every retry's
            return Answer(None, str(exc), latency(), final=True)
        except TimeoutError:
            error = f"timed out after {self.settings.webhooks.timeout:g} s"
        except aiohttp.ClientError as exc:
            error = f"{exc.__class__.__name__}: {exc}"
        except ValueError as exc:  # e.g. a URL the client refuses
            error = f"invalid listener URL: {exc}"
        return Answer(None, error, latency())


def listeners(settings: Settings, accepted: RequestAccepted) -> list[str]:
    """Who is told of the request's completion: the configured listeners, then the upload's own."""
    return list(dict.fromkeys([*settings.webhooks.urls, *filter(None, [accepted.webhook_url])]))


async def request_redelivery(eventlog: EventLog, settings: Settings, request_id: str) -> tuple[str, int]:
    """Queue the request's completion message again (same webhook-id): its id and the request's position; the
    error to answer is raised."""
    def decide(records: list[RecordedEvent]) -> tuple[list[Event], str]:
        if not records or any(isinstance(r.event, RequestDeleted) for r in records):
            raise json_error(web.HTTPNotFound, "unknown_request", f"no request with id {request_id!r}")
        completed = [r for r in records if isinstance(r.event, RequestCompleted)]
        if not completed:
            raise json_error(web.HTTPConflict, "not_finished", f"request {request_id} has not completed yet")
        accepted = records[0].event
        assert isinstance(accepted, RequestAccepted)
        if not listeners(settings, accepted):
            raise json_error(web.HTTPConflict, "no_listener",
                             f"request {request_id} has no listener to redeliver to: none in [webhooks] urls "
                             "and no webhook_url given at upload")
        msg_id = message_id(request_id, completed[-1].version)
        return [WebhookRedeliveryRequested(message_id=msg_id)], msg_id

    position, msg_id = await eventlog.decide(
        request_id, frozenset({"RequestAccepted", "RequestCompleted", "RequestDeleted"}), decide)
    return msg_id, position


async def redeliver(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    eventlog = request.app[EVENTLOG]
    msg_id, position = await request_redelivery(eventlog, request.app[SETTINGS], request_id)
    await request.app[STATUS_VIEW].caught_up(position)
    log.info("webhook_redelivery_requested", request_id=request_id, message_id=msg_id)
    return json_response({"request_id": request_id, "message_id": msg_id, "status": "queued"}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/redeliver/{request_id}", redeliver)
