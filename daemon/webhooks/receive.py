"""POST /webhook: completion notifications in, verified when a secret is set, recorded once per webhook-id.

Accepts the classic `{"image_id", "status", "output_images"}` and our own `request.completed` payload.
A notification is recorded on the named request's stream; it never changes the processing state.
"""

from __future__ import annotations

import binascii
import json
from typing import Any

import structlog
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, NotificationReceived, RequestDeleted
from daemon.http_api import (
    EVENTLOG,
    SETTINGS,
    STATUS_VIEW,
    BodyTooLarge,
    json_error,
    json_response,
    read_limited,
)
from daemon.outside_text import storable

log = structlog.get_logger("webhooks")


def bad_request(message: str, field: str = "") -> web.HTTPException:
    return json_error(web.HTTPBadRequest, "invalid_notification", message, **({"field": field} if field else {}))


def parse_notification(payload: Any) -> tuple[str, str, str]:
    """(request id, kind, status) from either accepted shape, or a 400 naming what is wrong."""
    if not isinstance(payload, dict):
        raise bad_request("the body must be a JSON object")
    if payload.get("type") == "request.completed":
        data = payload.get("data")
        if not isinstance(data, dict):
            raise bad_request("missing object 'data'", "data")
        request_id, status, kind = data.get("request_id"), data.get("status"), "request.completed"
        prefix = "data."
    else:
        request_id, status, kind, prefix = payload.get("image_id"), payload.get("status"), "classic", ""
        if "output_images" not in payload:
            raise bad_request("missing field 'output_images'", "output_images")
        if not isinstance(payload["output_images"], list):
            raise bad_request("'output_images' must be a list", "output_images")
    if not isinstance(request_id, str) or not request_id:
        name = "request_id" if prefix else "image_id"
        raise bad_request(f"missing or empty field '{prefix}{name}'", prefix + name)
    if not isinstance(status, str) or not status:
        raise bad_request(f"missing or empty field '{prefix}status'", prefix + "status")
    return request_id, kind, status


async def record_once(eventlog: EventLog, request_id: str, notification: NotificationReceived) -> tuple[str, int]:
    """'recorded', 'duplicate' or 'unknown', and the position to wait for; decided on the request's events."""
    def decide(records: list[RecordedEvent]) -> tuple[list[Event], str]:
        if not records or any(isinstance(r.event, RequestDeleted) for r in records):
            return [], "unknown"
        if notification.webhook_id and any(
                isinstance(r.event, NotificationReceived) and r.event.webhook_id == notification.webhook_id
                for r in records):
            return [], "duplicate"
        return [notification], "recorded"

    position, outcome = await eventlog.decide(request_id, None, decide)
    return outcome, position


async def receive(request: web.Request) -> web.Response:
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    limit = settings.webhooks.max_inbound_bytes
    if request.content_type != "application/json":
        raise json_error(web.HTTPUnsupportedMediaType, "unsupported_media_type",
                         f"notifications must be application/json, not {request.content_type!r}")
    too_large = json_error(web.HTTPRequestEntityTooLarge, "too_large", f"notification over {limit} bytes", limit=limit)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await read_limited(request.content.read, limit)
    except BodyTooLarge:
        raise too_large from None
    webhook_id = storable(request.headers.get("webhook-id", ""))
    secret = settings.webhooks.inbound_secret
    verified = False
    if secret:
        try:
            Webhook(secret).verify(body, dict(request.headers), json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
            log.info("notification_refused", webhook_id=webhook_id, reason=str(exc))
            raise json_error(web.HTTPUnauthorized, "invalid_signature",
                             f"Standard Webhooks signature check failed: {exc}") from None
        verified = True
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"malformed JSON: {exc}") from None
    try:  # "\ud800" is valid JSON but no character: it could be neither stored nor shown
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"malformed JSON: a string holds {exc.object[exc.start:exc.end]!r}, "
                          "a lone surrogate that is not a character") from None
    request_id, kind, status = parse_notification(payload)
    structlog.contextvars.bind_contextvars(request_id=request_id)
    notification = NotificationReceived(webhook_id=webhook_id, verified=verified, kind=kind, status=status,
                                        payload=payload)
    outcome, position = await record_once(eventlog, request_id, notification)
    if outcome == "unknown":
        raise json_error(web.HTTPNotFound, "unknown_request", f"no request with id {request_id!r}")
    await request.app[STATUS_VIEW].caught_up(position)
    log.info("notification_received", kind=kind, status=status, verified=verified, webhook_id=webhook_id,
             duplicate=outcome == "duplicate")
    return json_response({"request_id": request_id, "recorded": outcome == "recorded",
                          "duplicate": outcome == "duplicate", "verified": verified}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/webhook", receive)
