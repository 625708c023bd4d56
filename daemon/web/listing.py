"""GET /requests (a page of request summaries) and GET /events (the same summaries pushed as they change)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from daemon.eventlog.store import DatabaseAway
from daemon.http_api import EVENTLOG, SETTINGS, STATUS_VIEW, json_error, json_response, whole_number
from daemon.views.requests import STATUSES, BadCursor, Cursor, recent_requests, request_summaries

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
KEEPALIVE = 15.0  # seconds between comment lines on an idle stream, so proxies do not close it
PUSH_INTERVAL = 0.3  # at most this often per stream: a 10,000-image batch changes its request thousands of times
READ_PAGE = 1000
CLOSING = web.AppKey("events_closing", asyncio.Event)


async def list_requests(request: web.Request) -> web.Response:
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    limit = whole_number(request, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise json_error(web.HTTPBadRequest, "invalid_parameter",
                         f"status must be one of {', '.join(STATUSES)}, got {status!r}", field="status")
    before = None
    if "before" in request.query:
        try:
            before = Cursor.decode(request.query["before"])
        except BadCursor as exc:
            raise json_error(web.HTTPBadRequest, "invalid_parameter", f"before: {exc}", field="before") from None
    return json_response(await eventlog.query(recent_requests, settings.public_url, limit, status, before))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `request` with a summary whenever a request changes, `deleted` when one is gone.

    Woken by the event log (EventLog.subscribe); the summaries are read once the status view has folded the
    events in, so what is pushed is what GET /status shows."""
    eventlog, view, settings = request.app[EVENTLOG], request.app[STATUS_VIEW], request.app[SETTINGS]
    closing = request.app[CLOSING]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    wake = eventlog.subscribe(view.types)
    position = eventlog.head
    try:
        await response.write(b": connected\n\n")
        while not closing.is_set():
            if not await _woken(wake, closing):
                if not closing.is_set():
                    await response.write(b": keepalive\n\n")
                continue
            wake.clear()
            head = eventlog.head
            await view.wait_for(head)
            changed: dict[str, None] = {}
            while records := await eventlog.read_after(position, view.types, READ_PAGE):
                changed.update((r.stream, None) for r in records)
                position = records[-1].position
                if position >= head:
                    break
            if changed:
                summaries = await eventlog.query(request_summaries, list(changed), settings.public_url)
                await response.write(b"".join(_message(rid, s) for rid, s in summaries.items()))
            await asyncio.sleep(PUSH_INTERVAL)
    except ConnectionResetError:
        pass  # the page went away
    except DatabaseAway:  # the headers are sent, so no 503: end the stream; the page reconnects and reads the list
        pass
    finally:
        eventlog.unsubscribe(wake)
    return response


async def _woken(wake: asyncio.Event, closing: asyncio.Event) -> bool:
    """True once `wake` is set; False after KEEPALIVE seconds or when the daemon stops."""
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(closing.wait())]
    done, pending = await asyncio.wait(waits, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return wake.is_set() and not closing.is_set()


def _message(request_id: str, summary: dict[str, Any] | None) -> bytes:
    kind, data = ("request", summary) if summary is not None else ("deleted", {"request_id": request_id})
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def end_streams(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for open requests: event streams would hold it for its whole timeout."""
    app[CLOSING].set()


def add_routes(app: web.Application) -> None:
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(end_streams)
    app.router.add_get("/requests", list_requests)
    app.router.add_get("/events", events, allow_head=False)  # a HEAD would hold its stream open
