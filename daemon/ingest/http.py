"""POST /upload: read a CSV (multipart `file` field or a raw text/csv body), validate, accept."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import BodyPartReader, web

from daemon.config import Settings
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import check_url, parse_csv
from daemon.web import EVENTLOG, SETTINGS, STATUS_VIEW, json_error, json_response

log = structlog.get_logger("ingest")

RAW_TYPES = frozenset({"text/csv", "application/csv", "text/plain", "application/vnd.ms-excel"})
FIELD_LIMIT = 8192
CHUNK = 64 * 1024


def too_large(limit: int) -> web.HTTPException:
    # HTTPRequestEntityTooLarge requires max_size, so json_error's cls(text=...) cannot build it.
    return json_error(functools.partial(web.HTTPRequestEntityTooLarge, limit), "too_large",  # type: ignore[arg-type]
                      f"the CSV is larger than the limit of {limit} bytes", limit=limit)


async def read_limited(read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    """Read a stream in chunks, refusing as soon as it passes `limit` (never buffers a huge body)."""
    data = bytearray()
    while chunk := await read(CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_large(limit)
    return bytes(data)


async def read_upload(request: web.Request, settings: Settings) -> tuple[bytes, str, dict[str, str]]:
    """The CSV bytes, its file name and the other form fields."""
    limit = settings.limits.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + FIELD_LIMIT * 4:
        raise too_large(limit)
    fields: dict[str, str] = {}
    if request.content_type == "multipart/form-data":
        body: bytes | None = None
        filename = "upload.csv"
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file":
                filename = part.filename or filename
                body = await read_limited(part.read_chunk, limit)
            elif part.name:
                fields[part.name] = (await read_limited(part.read_chunk, FIELD_LIMIT)).decode("utf-8", "replace").strip()
        if body is None:
            raise json_error(web.HTTPBadRequest, "missing_file",
                             "multipart upload has no 'file' field; send it as -F \"file=@batch.csv\"")
        return body, filename, fields
    if request.content_type in RAW_TYPES:
        return await read_limited(request.content.read, limit), "upload.csv", fields
    raise json_error(web.HTTPUnsupportedMediaType, "unsupported_media_type",
                     f"send the CSV as multipart/form-data (field 'file') or as text/csv, not {request.content_type!r}")


async def upload(request: web.Request) -> web.Response:
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    body, filename, fields = await read_upload(request, settings)
    webhook_url = fields.get("webhook_url") or request.query.get("webhook_url", "")
    if webhook_url and (reason := check_url(webhook_url, settings.limits)):
        raise json_error(web.HTTPBadRequest, "invalid_webhook_url", reason, field="webhook_url")
    parsed = await asyncio.to_thread(parse_csv, body, settings.limits)
    if isinstance(parsed, list):
        log.info("csv_rejected", source="upload", source_name=filename, problems=len(parsed),
                 first_problem=str(parsed[0]))
        raise json_error(
            web.HTTPBadRequest, "invalid_csv", f"{filename}: {len(parsed)} problem(s); nothing was accepted",
            problems=[{"line": p.line, "column": p.column, "reason": p.reason} for p in parsed],
        )
    accepted = await accept(eventlog, parsed, "upload", filename, webhook_url=webhook_url)
    # So that the status_url answers at once, wait (briefly) for the status view to fold the batch in.
    await request.app[STATUS_VIEW].wait_for(accepted.position, timeout=5.0)
    return json_response({
        "request_id": accepted.request_id,
        "status": "queued",
        "products": accepted.products,
        "images": accepted.images,
        "status_url": f"{settings.public_url}/status/{accepted.request_id}",
    }, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/upload", upload)
