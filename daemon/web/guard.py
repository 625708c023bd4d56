"""What a browser being a client asks of every response: the daemon answers only to its own names (DNS rebinding),
state-changing requests from other sites are refused (CSRF), and every response carries a Content-Security-Policy
that allows no inline script.

Programs (curl, the CLI, webhooks from other servers) send neither Origin nor Sec-Fetch-Site: they pass."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from daemon.http_api import Handler, json_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = frozenset({"/healthz"})  # load balancers probe it under names of their own; it tells nothing
DEFAULT_PORTS = {"http": 80, "https": 443}
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}

Place = tuple[str, int | None]  # a host name (lower case, IPv6 in brackets) and its port, None for the default


def place(netloc: str, scheme: str = "http") -> Place | None:
    """The host and port of a Host header or an origin's netloc; None when it cannot be read."""
    try:
        parts = urlsplit(f"//{netloc}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.username is not None or parts.path:
        return None
    name = f"[{name}]" if ":" in name else name.rstrip(".")
    return name.lower(), None if port == DEFAULT_PORTS.get(scheme) else port


def own_places(public_url: str, request: web.Request) -> set[Place]:
    """The names the daemon answers to: its public URL's, and loopback names and the address it was reached at,
    with the port it listens on."""
    public = urlsplit(public_url)
    places = {p for p in (place(public.netloc, public.scheme),) if p is not None}
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if sockname:
        address, port = sockname[0], sockname[1]
        names = (*LOCAL_NAMES, f"[{address}]" if ":" in address else address)
        places |= {(name, None if port == 80 else port) for name in names}
    return places


def request_guard(public_url: str) -> Middleware:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            host = place(request.headers.get("Host", ""))
            if host is None or host not in own_places(public_url, request):
                raise json_error(web.HTTPMisdirectedRequest, "unknown_host",
                                 f"this daemon does not answer to the host {request.headers.get('Host', '')!r}; "
                                 "use its address or set [server] public_url", field="Host")
            if request.method not in SAFE_METHODS and (reason := cross_site(request, host, public_url)):
                raise json_error(web.HTTPForbidden, "cross_site_request", reason)
        return await handler(request)

    return guard


def cross_site(request: web.Request, host: Place, public_url: str) -> str | None:
    """Why a state-changing request comes from another site, or None when it does not (or says nothing)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"refused a request from another site (Sec-Fetch-Site: {fetch_site})"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    parts = urlsplit(origin)
    public = urlsplit(public_url)
    allowed = {host, place(public.netloc, public.scheme)}
    if parts.scheme not in DEFAULT_PORTS or place(parts.netloc, parts.scheme) not in allowed:
        return f"refused a request from another site (Origin: {origin})"
    return None


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def add_security_headers(app: web.Application) -> None:
    app.on_response_prepare.append(security_headers)
