"""POST /retry/<id>, POST /cancel/<id>, DELETE /requests/<id>: each answers once its effect shows in /status."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import structlog
from aiohttp import web

from daemon.control import commands
from daemon.control.commands import Refused
from daemon.http_api import (
    CANCELLATIONS,
    COMPLETE_STAGE,
    DELETE_STAGE,
    EVENTLOG,
    SETTINGS,
    STATUS_VIEW,
    json_error,
    json_response,
)
from daemon.views.status import request_status

log = structlog.get_logger("control")
T = TypeVar("T")

REFUSALS: dict[int, type[web.HTTPException]] = {404: web.HTTPNotFound, 409: web.HTTPConflict}


def refusal(exc: Refused) -> web.HTTPException:
    return json_error(REFUSALS[exc.status], exc.error, str(exc))


async def carried_out(command: Awaitable[T]) -> T:
    """The command's result; its refusal as the HTTP error it names."""
    try:
        return await command
    except Refused as exc:
        raise refusal(exc) from None


def request_id_of(request: web.Request) -> str:
    request_id = request.match_info["request_id"]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


async def retry(request: web.Request) -> web.Response:
    request_id, eventlog = request_id_of(request), request.app[EVENTLOG]
    position, retried = await carried_out(commands.retry(eventlog, request_id))
    request.app[CANCELLATIONS].forget(request_id)  # a cancellation that lost the race to the completion
    log.info("request_retried", round=retried.round, images=len(retried.images))
    await request.app[STATUS_VIEW].caught_up(position)
    return json_response({
        "request_id": request_id, "status": "processing", "round": retried.round, "images": len(retried.images),
        "status_url": f"{request.app[SETTINGS].public_url}/status/{request_id}",
    }, status=202)


async def cancel(request: web.Request) -> web.Response:
    request_id, eventlog = request_id_of(request), request.app[EVENTLOG]
    position = await carried_out(commands.cancel(eventlog, request_id))
    request.app[CANCELLATIONS].cancel(request_id)
    log.info("request_cancel_requested")
    # The complete stage records the outcome; the status view then shows it.
    await request.app[COMPLETE_STAGE].caught_up(position)
    await request.app[STATUS_VIEW].caught_up(eventlog.head)
    body = await eventlog.query(request_status, request_id, request.app[SETTINGS].public_url, False)
    assert body is not None
    if body["status"] != "cancelled":  # its last image finished first
        raise json_error(web.HTTPConflict, "already_finished",
                         f"request {request_id} finished ({body['status']}) before it could be cancelled")
    return json_response({key: body[key] for key in ("request_id", "status", "progress", "status_url")})


async def delete(request: web.Request) -> web.Response:
    request_id, eventlog = request_id_of(request), request.app[EVENTLOG]
    position = await carried_out(commands.delete(eventlog, request_id))
    await request.app[STATUS_VIEW].caught_up(position)
    await request.app[DELETE_STAGE].caught_up(position)  # its files are gone too when the answer comes
    return json_response({"request_id": request_id, "deleted": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/retry/{request_id}", retry)
    app.router.add_post("/cancel/{request_id}", cancel)
    app.router.add_delete("/requests/{request_id}", delete)
