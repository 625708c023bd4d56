"""The daemon answers only to its own names, refuses cross-site writes, and sends a CSP without inline script."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from daemon.testing import Origin


def own_host(served: Any) -> str:
    return f"127.0.0.1:{served.client.server.port}"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost", "[::2]:{port}",
                                  "user@127.0.0.1:{port}"])
async def test_a_host_that_is_not_the_daemons_is_refused(serve: Callable[..., Any], host: str) -> None:
    """A Host header naming another site (a DNS rebinding) answers 421 JSON, for reads and writes alike."""
    async with serve() as served:
        port = served.client.server.port
        for method, path in (("GET", "/requests"), ("GET", "/"), ("POST", "/upload")):
            response = await served.client.request(method, path, headers={"Host": host.format(port=port)})
            body = await response.json()
            assert response.status == 421, (method, path)
            assert body["error"] == "unknown_host" and body["field"] == "Host"
        assert (await served.client.get("/healthz", headers={"Host": "evil.example"})).status == 200


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}",
                                  "images.example", "images.example:80"])
async def test_the_daemons_own_names_are_answered(serve: Callable[..., Any], host: str) -> None:
    """Loopback names with the daemon's port and the public URL's host are answered."""
    async with serve() as served:
        response = await served.client.get("/requests", headers={"Host": host.format(port=served.client.server.port)})
        assert response.status == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
])
async def test_cross_site_writes_are_refused(serve: Callable[..., Any], origin: Origin,
                                             headers: dict[str, str]) -> None:
    """An upload, a cancel and a delete sent from another site answer 403 JSON, and nothing is accepted."""
    async with serve() as served:
        rid = await served.upload(("Shoe", [f"{origin.url}/img/p0.jpg"]))
        await served.finished(rid)
        sent = {k: v.format(port=served.client.server.port) for k, v in headers.items()}
        for method, path in (("POST", "/upload"), ("POST", f"/cancel/{rid}"), ("POST", f"/retry/{rid}"),
                             ("DELETE", f"/requests/{rid}")):
            response = await served.client.request(method, path, headers={**sent, "Content-Type": "text/csv"},
                                                   data=b"S. No.,Product Name,Input Image Urls\n1,A,http://x.example/a\n")
            body = await response.json()
            assert response.status == 403, (method, path)
            assert body["error"] == "cross_site_request"
        listed = await (await served.client.get("/requests")).json()
        assert [r["request_id"] for r in listed["requests"]] == [rid]


@pytest.mark.parametrize("headers", [
    {}, {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}, {"Origin": "http://images.example"},
    {"Sec-Fetch-Site": "none"},
])
async def test_same_origin_and_non_browser_writes_pass(serve: Callable[..., Any], headers: dict[str, str]) -> None:
    """A write from the page itself, from the public URL's origin, or from a program without Origin is accepted."""
    async with serve() as served:
        sent = {k: v.format(port=served.client.server.port) for k, v in headers.items()}
        rid = await served.upload(("Shoe", ["http://127.0.0.1:9/a.jpg"]), headers=sent)
        assert rid


async def test_every_response_carries_a_csp_without_inline_script(serve: Callable[..., Any]) -> None:
    """The page, its script and the API's answers (errors too) send a CSP allowing only the daemon's own scripts."""
    async with serve() as served:
        for path in ("/", "/ui/page.js", "/requests", "/status/none"):
            response = await served.client.get(path)
            csp = response.headers["Content-Security-Policy"]
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["default-src"] == "'self'", path
            assert "script-src" not in directives and "unsafe" not in csp, path
            assert directives["frame-ancestors"] == "'none'", path
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        page = await (await served.client.get("/")).text()
        assert re.findall(r"<script\b[^>]*>", page) == ['<script src="/ui/page.js" defer>']  # no inline script
        assert re.search(r"\son[a-z]+\s*=", page) is None  # and no inline event handler
