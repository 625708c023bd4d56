"""HTTP plumbing shared by every route: app keys, JSON errors, and the read-only endpoints."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from daemon.config import Settings
from daemon.control.cancellations import Cancellations
from daemon.diskspace import DiskSpace, is_disk_full
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import DatabaseAway, EventLog
from daemon.storage import ImageStore, ObjectStore, StoreUnavailable, content_type
from daemon.views.export import EXTRA_COLUMNS, FINISHED, export_rows, finished_request_ids, to_csv
from daemon.views.status import Page, StatusView, request_status

log = structlog.get_logger("http")

SETTINGS = web.AppKey("settings", Settings)
EVENTLOG = web.AppKey("eventlog", EventLog)
STATUS_VIEW = web.AppKey("status_view", StatusView)
COMPLETE_STAGE = web.AppKey("complete_stage", Follower)
DELETE_STAGE = web.AppKey("delete_stage", Follower)
CANCELLATIONS = web.AppKey("cancellations", Cancellations)
DISK_SPACE = web.AppKey("disk_space", DiskSpace)
IMAGE_STORE = web.AppKey("image_store", ImageStore)
DISK_FULL_RETRY_AFTER = 30  # seconds a client told 503 for a full disk is asked to wait
DATABASE_AWAY_RETRY_AFTER = 5  # seconds a client told 503 for an unreachable database is asked to wait
STORE_RETRY_AFTER = 5  # seconds a client told 503 for an image store that is down is asked to wait

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(cls: type[web.HTTPException], error: str, message: str, **extra: Any) -> web.HTTPException:
    """An HTTP error whose body is JSON: {"error", "message", ...}."""
    body = json.dumps({"error": error, "message": message, **extra}, ensure_ascii=False)
    if isinstance(cls, type) and issubclass(cls, web.HTTPRequestEntityTooLarge):
        return cls(max_size=int(extra.get("limit", 0)), actual_size=0, text=body, content_type="application/json")
    return cls(text=body, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON; an unexpected one is logged and answered 500 without details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        slug = (exc.reason or "error").lower().replace(" ", "_")
        # Rewrite the body in place: some subclasses (405, 413) need constructor arguments, and
        # their headers (Allow) must survive.
        message = exc.text or exc.reason or slug
        exc.text = json.dumps({"error": slug, "message": message}, ensure_ascii=False)
        exc.content_type = "application/json"
        raise
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding whose bytes do not decompress
        reason = getattr(exc.__cause__, "message", "") or str(exc)
        response = web.json_response({"error": "invalid_body", "message": f"the request body cannot be read: {reason}"},
                                     status=400)
        response.force_close()  # aiohttp drops the connection after a broken body: tell the client so
        return response
    except Exception as exc:
        if is_disk_full(exc):  # the daemon's disk, not the client's request: ask it to come back
            log.warning("http_disk_full", method=request.method, path=request.path, error=str(exc))
            error = json_error(web.HTTPServiceUnavailable, "disk_full",
                               "the daemon's disk is full, so nothing could be recorded; try again later",
                               retry_after=DISK_FULL_RETRY_AFTER)
            error.headers["Retry-After"] = str(DISK_FULL_RETRY_AFTER)
            raise error from None
        if isinstance(exc, DatabaseAway):  # logged once by the store; whether a write landed is unknown
            error = json_error(web.HTTPServiceUnavailable, "database_unreachable",
                               "the daemon cannot reach its database right now; try again later",
                               retry_after=DATABASE_AWAY_RETRY_AFTER)
            error.headers["Retry-After"] = str(DATABASE_AWAY_RETRY_AFTER)
            raise error from None
        log.exception("http_unhandled_error", method=request.method, path=request.path)
        raise json_error(web.HTTPInternalServerError, "internal_error", "unexpected error; see the daemon's log") from None


# The page and its files hold no data: the page asks for the token and sends it with every API call.
OPEN_PATHS = frozenset({"/healthz", "/", "/ui/page.js", "/ui/page.css"})


def bearer_auth(tokens: tuple[str, ...]) -> Middleware:
    """When tokens are configured, every endpoint but /healthz needs `Authorization: Bearer <token>`."""
    expected = [t.encode() for t in tokens]

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected and request.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Compare against every token, so the time taken says nothing about which one matched.
            # surrogateescape: aiohttp decodes header bytes that are not UTF-8 so, and they must read as a wrong token.
            matched = [hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)
                       for token in expected]
            if scheme.lower() != "bearer" or not any(matched):
                error = json_error(web.HTTPUnauthorized, "unauthorized",
                                   "send a valid API token as 'Authorization: Bearer <token>'")
                error.headers["WWW-Authenticate"] = 'Bearer realm="imgpipe"'
                raise error
        return await handler(request)

    return auth


CHUNK = 64 * 1024


class BodyTooLarge(Exception):
    """A request body passed its limit while being read."""


async def read_limited(read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    """Read a stream in chunks, stopping as soon as it passes `limit` (never buffers a huge body)."""
    data = bytearray()
    while chunk := await read(CHUNK):
        data += chunk
        if len(data) > limit:
            raise BodyTooLarge
    return bytes(data)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, ensure_ascii=False))


async def healthz(request: web.Request) -> web.Response:
    """200 while the daemon runs; "degraded" with reasons (never paths: it needs no token) while work waits."""
    reasons = request.app[DISK_SPACE].reasons() + request.app[EVENTLOG].reasons()
    return json_response({"status": "degraded", "reasons": reasons} if reasons else {"status": "ok"})


FLAG_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def flag(request: web.Request, name: str, default: bool) -> bool:
    """A true/false query parameter; 400 naming it for any other value."""
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() not in FLAG_VALUES:
        raise json_error(web.HTTPBadRequest, "invalid_parameter", f"{name} must be true or false, got {value!r}",
                         field=name)
    return FLAG_VALUES[value.lower()]


def whole_number(request: web.Request, name: str, minimum: int, maximum: int) -> int | None:
    """A whole-number query parameter from `minimum` to `maximum`, or None when absent; 400 naming it otherwise."""
    value = request.query.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not minimum <= int(value) <= maximum:
        raise json_error(web.HTTPBadRequest, "invalid_parameter",
                         f"{name} must be a whole number from {minimum} to {maximum}, got {value!r}", field=name)
    return int(value)


MAX_PAGE = 100_000


async def status(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    with_products = flag(request, "products", default=True)
    offset = whole_number(request, "offset", 0, 10**9)
    limit = whole_number(request, "limit", 1, MAX_PAGE)
    page = None if offset is None and limit is None else Page(offset or 0, limit)

    def encoded() -> bytes | None:
        body = request_status(request_id, settings.public_url, with_products, page, settings.images_url)
        return None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")

    # Built and encoded on a reader thread: a 10,000-image body must not hold up the event loop.
    data = await eventlog.query(encoded)
    if data is None:
        raise json_error(web.HTTPNotFound, "unknown_request", f"no request with id {request_id!r}")
    return web.Response(body=data, content_type="application/json", charset="utf-8")


def csv_response(data: bytes, filename: str) -> web.Response:
    return web.Response(body=data, content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def export_columns(request: web.Request) -> tuple[str, ...]:
    """The columns `?columns=ssim,quality` adds to an export, in its order; 400 naming an unknown or repeated one."""
    value = request.query.get("columns", "")
    columns = tuple(c.strip() for c in value.split(",") if c.strip())
    for i, column in enumerate(columns):
        if column not in EXTRA_COLUMNS or column in columns[:i]:
            reason = "is named twice" if column in EXTRA_COLUMNS else "is not a column"
            raise json_error(web.HTTPBadRequest, "invalid_parameter", f"columns: {column!r} {reason}; the columns "
                             f"an export can add are {', '.join(EXTRA_COLUMNS)}", field="columns")
    return columns


async def export_all(request: web.Request) -> web.Response:
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    extra = export_columns(request)

    def csv_bytes() -> bytes:  # on a reader thread, like every large body
        return to_csv(export_rows(finished_request_ids(), settings.images_url, extra), extra).encode("utf-8")

    return csv_response(await eventlog.query(csv_bytes), "export.csv")


async def export_one(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    structlog.contextvars.bind_contextvars(request_id=request_id)
    settings, eventlog = request.app[SETTINGS], request.app[EVENTLOG]
    extra = export_columns(request)
    body = await eventlog.query(request_status, request_id, settings.public_url, False)
    if body is None:
        raise json_error(web.HTTPNotFound, "unknown_request", f"no request with id {request_id!r}")
    if body["status"] not in FINISHED:
        raise json_error(web.HTTPConflict, "not_finished", f"request {request_id} is still {body['status']}",
                         status=body["status"], progress=body["progress"])

    def csv_bytes() -> bytes:
        return to_csv(export_rows([request_id], settings.images_url, extra), extra).encode("utf-8")

    return csv_response(await eventlog.query(csv_bytes), f"{request_id}.csv")


IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


async def image(request: web.Request) -> web.StreamResponse:
    """Serve a compressed image; only plain names inside the images folder (or the store) are reachable."""
    name = request.match_info["name"]
    settings, store = request.app[SETTINGS], request.app[IMAGE_STORE]
    if not IMAGE_NAME.match(name) or ".." in name:
        raise json_error(web.HTTPNotFound, "unknown_image", f"no image named {name!r}")
    # With API tokens, a shared cache (a CDN or proxy in front) must not hand the image to callers without one.
    scope = "private" if settings.server.tokens else "public"
    headers = {"Content-Type": content_type(name), "Cache-Control": f"{scope}, max-age=86400"}
    if isinstance(store, ObjectStore):
        return await _stored_image(request, store, name, headers)
    folder = settings.path("images")
    path = folder / name
    if path.parent != folder or not path.is_file():
        raise json_error(web.HTTPNotFound, "unknown_image", f"no image named {name!r}")
    return web.FileResponse(path, headers=headers)


async def _stored_image(request: web.Request, store: ObjectStore, name: str,
                        headers: dict[str, str]) -> web.StreamResponse:
    """With storage.public_url, a redirect there (the store or its CDN serves the bytes; URLs handed out before it
    was set keep working); without, the bucket may be private, so the daemon streams the object, chunk by chunk."""
    public = request.app[SETTINGS].storage.public_url
    if public:
        raise web.HTTPFound(f"{public.rstrip('/')}/{name}")
    try:
        found = await store.read(name)
    except StoreUnavailable as exc:
        log.warning("image_store_unavailable", path=request.path, error=str(exc))
        error = json_error(web.HTTPServiceUnavailable, "image_store_unavailable",
                           "the image store does not answer right now; try again later",
                           retry_after=STORE_RETRY_AFTER)
        error.headers["Retry-After"] = str(STORE_RETRY_AFTER)
        raise error from None
    if found is None:
        raise json_error(web.HTTPNotFound, "unknown_image", f"no image named {name!r}")
    size, etag, chunks = found
    response = web.StreamResponse(headers={**headers, **({"ETag": etag} if etag else {})})
    response.content_length = size
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except StoreUnavailable as exc:  # the status line is sent: all that is left is to cut the body short
        log.warning("image_store_unavailable", path=request.path, error=str(exc))
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status/{request_id}", status)
    app.router.add_get("/export", export_all)
    app.router.add_get("/export/{request_id}", export_one)
    app.router.add_get("/images/{name}", image)
