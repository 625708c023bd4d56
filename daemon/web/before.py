"""GET /requests/<id>/images/<product>/<index>/original: the image as its origin serves it now ("before").

Originals are not kept; the daemon fetches this one on demand through the downloads' guarded client, so it refuses
the addresses downloads refuse, follows as many redirects and stops at the same byte cap, streaming the body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from daemon.http_api import EVENTLOG, SETTINGS, json_error
from daemon.network import AddressNotAllowed
from daemon.views.requests import input_url

log = structlog.get_logger("http")

# The image types a browser shows, by their first bytes; anything else is sent as opaque bytes.
SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
              (b"RIFF", "image/webp"))


def sniffed_type(head: bytes) -> str:
    return next((kind for magic, kind in SIGNATURES if head.startswith(magic)), "application/octet-stream")


def unavailable(reason: str) -> web.HTTPException:
    return json_error(web.HTTPBadGateway, "original_unavailable", f"the original image cannot be fetched: {reason}")


def original_route(client_key: web.AppKey[aiohttp.ClientSession]) -> web.RouteDef:
    """The route, given the app key of the downloads' client (it lives in daemon.app)."""

    async def original(request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        structlog.contextvars.bind_contextvars(request_id=request_id)
        product = whole_number_in_path(request, "product")
        index = whole_number_in_path(request, "index")
        url = await request.app[EVENTLOG].query(input_url, request_id, product, index)
        if url is None:
            raise json_error(web.HTTPNotFound, "unknown_image",
                             f"request {request_id!r} has no image {index} in product {product}")
        return await _relay(request, request.app[client_key], url)

    return web.get("/requests/{request_id}/images/{product}/{index}/original", original)


def whole_number_in_path(request: web.Request, name: str) -> int:
    value = request.match_info[name]
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise json_error(web.HTTPNotFound, "unknown_image", f"{name} must be a whole number, got {value!r}")
    return int(value)


async def _relay(request: web.Request, client: aiohttp.ClientSession, url: str) -> web.StreamResponse:
    settings = request.app[SETTINGS].download
    limit = settings.max_bytes
    timeout = aiohttp.ClientTimeout(total=settings.total_timeout, connect=settings.connect_timeout,
                                    sock_connect=settings.connect_timeout)
    try:
        async with client.get(url, timeout=timeout, max_redirects=settings.max_redirects + 1,
                              headers={"Accept": "image/*,*/*;q=0.5"}) as upstream:
            if upstream.status != 200:
                raise unavailable(f"the origin answered HTTP {upstream.status}")
            if upstream.content_length is not None and upstream.content_length > limit:
                raise unavailable(f"it is {upstream.content_length} bytes, over the limit of {limit} bytes")
            chunks = upstream.content.iter_any()
            first = await anext(chunks, b"")
            response = web.StreamResponse(headers={"Content-Type": sniffed_type(first),
                                                   "Cache-Control": "private, no-store"})
            await response.prepare(request)
            return await _stream(request, response, first, chunks, limit)
    except AddressNotAllowed as exc:  # the daemon's own rules, not a failing origin: refused, as downloads are
        raise json_error(web.HTTPForbidden, "original_refused",
                         f"the original image is not fetched: {exc}") from None
    except aiohttp.TooManyRedirects:
        raise unavailable(f"too many redirects (more than {settings.max_redirects})") from None
    except TimeoutError:
        raise unavailable(f"timed out after {settings.total_timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise unavailable(f"{exc.__class__.__name__}: {exc}") from None


async def _stream(request: web.Request, response: web.StreamResponse, first: bytes, chunks: AsyncIterator[bytes],
                  limit: int) -> web.StreamResponse:
    """The rest of the body under the cap; past it, or when the origin fails, the status line is already sent, so
    all that is left is to cut the body short."""
    size, chunk = 0, first
    try:
        while chunk:
            size += len(chunk)
            if size > limit:
                log.warning("original_over_limit", limit=limit)
                break
            await response.write(chunk)
            chunk = await anext(chunks, b"")
        else:
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("original_cut_short", error=f"{exc.__class__.__name__}: {exc}")
    if request.transport is not None:
        request.transport.close()
    return response
