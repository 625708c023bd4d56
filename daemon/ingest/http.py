"""POST /upload: read a CSV (multipart `file` field or a raw text/csv body), validate, accept."""

from __future__ import annotations

import asyncio
import hashlib

import structlog
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from daemon.config import Settings
from daemon.eventlog.store import StreamConflict
from daemon.events import RequestAccepted, RequestDeleted
from daemon.http_api import (
    EVENTLOG,
    SETTINGS,
    STATUS_VIEW,
    BodyTooLarge,
    json_error,
    json_response,
    read_limited,
)
from daemon.ingest.accept import Accepted, accept, idempotent_request_id
from daemon.ingest.csvfile import Batch, check_url, parse_csv
from daemon.network import AddressPolicy
from daemon.outside_text import storable

log = structlog.get_logger("ingest")

RAW_TYPES = frozenset({"text/csv", "application/csv", "text/plain", "application/vnd.ms-excel"})
FIELD_LIMIT = 8192
FORM_FIELDS = frozenset({"webhook_url"})  # the form fields read; any others are skipped
MAX_FIELDS = 4  # how many fields' worth of bytes, besides the file, the whole body may hold
IDEMPOTENCY_HEADER = "Idempotency-Key"


def too_large(limit: int) -> web.HTTPException:
    return json_error(web.HTTPRequestEntityTooLarge, "too_large", f"the CSV is larger than the limit of {limit} bytes",
                      limit=limit)


async def read_upload(request: web.Request, settings: Settings) -> tuple[bytes, str, dict[str, str]]:
    """The CSV bytes, its file name and the other form fields; 413 as soon as the body passes the limit."""
    limit = settings.limits.max_upload_bytes
    budget = limit + FIELD_LIMIT * MAX_FIELDS  # the whole body: the file plus a few small form fields
    if request.content_length is not None and request.content_length > budget:
        raise too_large(limit)
    fields: dict[str, str] = {}
    try:
        if request.content_type == "multipart/form-data":
            body: bytes | None = None
            filename = "upload.csv"
            async for part in await request.multipart():
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "file":
                    filename = storable(part.filename or filename)
                    body = await read_limited(part.read_chunk, min(limit, budget))
                    budget -= len(body)
                elif part.name in FORM_FIELDS:
                    try:
                        value = await read_limited(part.read_chunk, min(FIELD_LIMIT, budget))
                    except BodyTooLarge:
                        if budget > FIELD_LIMIT:  # this field, not the whole body, is what is too large
                            raise json_error(web.HTTPRequestEntityTooLarge, "too_large",
                                             f"form field {part.name!r} is larger than {FIELD_LIMIT} bytes",
                                             field=part.name, limit=FIELD_LIMIT) from None
                        raise
                    budget -= len(value)
                    fields[part.name] = value.decode("utf-8", "replace").strip()
                else:  # a field we do not read (a form's submit button...): skipped, within the body's budget
                    budget -= len(await read_limited(part.read_chunk, budget))
            if body is None:
                raise json_error(web.HTTPBadRequest, "missing_file",
                                 "multipart upload has no 'file' field; send it as -F \"file=@batch.csv\"")
            return body, filename, fields
        if request.content_type in RAW_TYPES:
            # A raw body may name its file the standard way: Content-Disposition: attachment; filename="x.csv".
            _, params = parse_content_disposition(request.headers.get(hdrs.CONTENT_DISPOSITION))
            filename = storable(content_disposition_filename(params, "filename") or "upload.csv")
            return await read_limited(request.content.read, limit), filename, fields
    except BodyTooLarge:
        raise too_large(limit) from None
    # What aiohttp raises for a broken multipart body; BadHttpMessage: a part's header it cannot parse.
    except (KeyError, ValueError, AssertionError, BadHttpMessage) as exc:
        raise json_error(web.HTTPBadRequest, "invalid_multipart", f"malformed multipart/form-data body: {exc!r}",
                         field="file") from None
    raise json_error(web.HTTPUnsupportedMediaType, "unsupported_media_type",
                     f"send the CSV as multipart/form-data (field 'file') or as text/csv, not {request.content_type!r}")


def given_webhook_url(in_form: str, in_query: str) -> str:
    """The upload's listener, from the form or the query; 400 if both name one and they differ."""
    if in_form and in_query and in_form != in_query:
        raise json_error(web.HTTPBadRequest, "invalid_webhook_url",
                         "webhook_url given twice: in the query and in the form, and they differ "
                         f"({in_query!r} and {in_form!r})",
                         field="webhook_url")
    return in_form or in_query


async def upload(request: web.Request) -> web.Response:
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    body, filename, fields = await read_upload(request, settings)
    webhook_url = given_webhook_url(fields.get("webhook_url", ""), request.query.get("webhook_url", ""))
    # Checked now, so an uploader learns at once of a listener the daemon would never reach.
    if webhook_url and (reason := check_url(webhook_url, settings.limits)
                        or AddressPolicy(settings.network).url_refusal(webhook_url)):
        raise json_error(web.HTTPBadRequest, "invalid_webhook_url", f"webhook_url: {reason}",
                         field="webhook_url")
    parsed = await asyncio.to_thread(parse_csv, body, settings.limits)
    if isinstance(parsed, list):
        log.info("csv_rejected", source="upload", source_name=filename, problems=len(parsed),
                 first_problem=str(parsed[0]))
        raise json_error(
            web.HTTPBadRequest, "invalid_csv", f"{filename}: {len(parsed)} problem(s); nothing was accepted",
            problems=[{"line": p.line, "column": p.column, "reason": p.reason} for p in parsed],
        )
    key = request.headers.get(IDEMPOTENCY_HEADER, "")
    if key:
        return await _idempotent_upload(request, key, body, parsed, filename, webhook_url)
    accepted = await accept(eventlog, parsed, "upload", filename, webhook_url=webhook_url)
    return await _accepted_response(request, accepted)


async def _accepted_response(request: web.Request, accepted: Accepted, status: int = 202,
                             headers: dict[str, str] | None = None) -> web.Response:
    # So that the status_url answers at once, wait for the status view to fold the batch in.
    await request.app[STATUS_VIEW].caught_up(accepted.position)
    response = json_response({
        "request_id": accepted.request_id,
        "status": "queued",
        "products": accepted.products,
        "images": accepted.images,
        "status_url": f"{request.app[SETTINGS].public_url}/status/{accepted.request_id}",
    }, status=status)
    response.headers.update(headers or {})
    return response


async def _idempotent_upload(request: web.Request, key: str, body: bytes, batch: Batch, filename: str,
                             webhook_url: str) -> web.Response:
    """Same key and body: the same request again, nothing new. Same key, other body: 422."""
    if len(key) > 255 or not key.isprintable():
        raise json_error(web.HTTPBadRequest, "invalid_idempotency_key",
                         "Idempotency-Key must be at most 255 printable characters", field=IDEMPOTENCY_HEADER)
    eventlog = request.app[EVENTLOG]
    digest = hashlib.sha256(body + b"\0" + webhook_url.encode()).hexdigest()
    request_id = idempotent_request_id(key)
    try:
        accepted = await accept(eventlog, batch, "upload", filename, request_id=request_id, webhook_url=webhook_url,
                                idempotency_key=key, body_sha256=digest)
        return await _accepted_response(request, accepted)
    except StreamConflict:
        records = await eventlog.read_stream(request_id)
    # Checked first: once a deleted request's events are purged, its deletion is all that is left.
    if any(isinstance(r.event, RequestDeleted) for r in records):
        raise json_error(web.HTTPConflict, "request_deleted",
                         f"Idempotency-Key {key!r} belongs to request {request_id}, which was deleted; use a new key",
                         request_id=request_id)
    first = records[0].event
    assert isinstance(first, RequestAccepted)
    if first.body_sha256 != digest:
        raise json_error(web.HTTPUnprocessableEntity, "idempotency_key_reused",
                         f"Idempotency-Key {key!r} was already used with a different body (request {request_id})",
                         request_id=request_id)
    log.info("upload_replayed", request_id=request_id, idempotency_key=key)
    replay = Accepted(request_id, len(first.products), first.image_count, records[-1].position)
    return await _accepted_response(request, replay, status=200, headers={"Idempotent-Replayed": "true"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/upload", upload)
