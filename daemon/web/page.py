"""The page at `/`: plain HTML, CSS and JavaScript from daemon/web/static, nothing to build.

It is served without a token (it holds no data); everything it shows comes from the API, with the token the
person enters."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8",
                                                            "Cache-Control": "no-cache"})


def asset(name: str, kind: str) -> web.RouteDef:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers={"Content-Type": f"{kind}; charset=utf-8",
                                                        "Cache-Control": "no-cache"})

    return web.get(f"/ui/{name}", serve)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_routes([asset(name, kind) for name, kind in ASSETS.items()])
