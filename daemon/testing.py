"""Helpers for tests and the benchmark: generated photos and a loopback origin that serves them.

The origin is a real aiohttp server on 127.0.0.1 with the misbehaviours image hosts show in the wild.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import socket
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from aiohttp import web
from PIL import Image, ImageFilter

from daemon.config import Settings, load_settings, replace
from daemon.eventlog.follower import run_until_idle
from daemon.stages import similarity

T = TypeVar("T")


def photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A photograph-like RGB image: smooth gradients plus noise (not flat colour, which compresses absurdly)."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((width, height))
    channels = [
        base.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=rng.randrange(256))
        for _ in range(3)
    ]
    image = Image.merge("RGB", channels).filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((width, height), 24 + seed % 8).convert("RGB")
    return Image.blend(image, noise, 0.18)


def smooth_photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A photograph of smooth surfaces: `photo` softened (2000x2000 at quality 90: about 340 KB)."""
    return photo(width, height, seed).filter(ImageFilter.GaussianBlur(1.2))


def fine_grain_photo(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A photograph with fine colour grain, as from a small sensor (2000x2000 at quality 90: about 1.5 MB)."""
    grain = Image.merge("RGB", [Image.effect_noise((width, height), 40) for _ in range(3)])
    return Image.blend(photo(width, height, seed), grain, 0.3)


def ssim(a: Image.Image, b: Image.Image) -> float:
    """The score's SSIM (daemon.stages.similarity) of two images' luma at full resolution."""
    return similarity.ssim(np.asarray(similarity.luma(a)), np.asarray(similarity.luma(b)))


def pipeline_settings(tmp_path: Path, **sections: dict[str, object]) -> Settings:
    """Settings for a daemon living in `tmp_path`: quick retries, two workers, inbox off; `sections` override."""
    base = load_settings(None, env={})
    defaults: dict[str, dict[str, object]] = {
        "paths": {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
                  "images": str(tmp_path / "images"), "database": f"sqlite:///{tmp_path / 'imgpipe.db'}"},
        "inbox": {"enabled": False, "settle_seconds": 0.1},
        "download": {"backoff_base": 0.01, "backoff_max": 0.05, "total_timeout": 3.0, "connect_timeout": 1.0},
        "compress": {"workers": 2},
        "server": {"public_url": "http://images.example"},
        "network": {"allow_private": True},  # the test origins live on 127.0.0.1
    }
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    return replace(base, **defaults)


def with_database(url: str, sections: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """`sections` for pipeline_settings with the database at `url` (unless they name one)."""
    return {**sections, "paths": {"database": url, **sections.get("paths", {})}}


def imgpipe_command() -> list[str]:
    """The installed `imgpipe` console script of this interpreter's environment, else `python -m daemon`."""
    script = Path(sys.executable).with_name("imgpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]


def clean_environment(**overrides: str) -> dict[str, str]:
    """This process's environment without any IMGPIPE_* variable, plus `overrides` (for `imgpipe` subprocesses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **overrides}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bomb_png(width: int, height: int) -> bytes:
    """A decompression bomb: a valid 1-bit PNG of all-black rows, built without ever holding the pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row_block = bytes(1 + (width + 7) // 8) * 1000  # filter byte 0 + packed zero bits, 1000 rows
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row_block) for _ in range(height // 1000)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def jpeg_bytes(image: Image.Image, quality: int = 90, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, **options)
    return out.getvalue()


class Origin:
    """A loopback image host: `/img/<name>` serves `files`, other routes misbehave on purpose."""

    def __init__(self, files: Mapping[str, bytes] | None = None, flaky_failures: int = 2) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.flaky_failures = flaky_failures
        self.hits: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/img/{name}", self._image)
        app.router.add_get("/code/{status}", self._code)
        app.router.add_get("/flaky/{name}", self._flaky)
        app.router.add_get("/redirect/{name}", self._redirect)
        app.router.add_get("/loop", self._loop)
        app.router.add_get("/to", self._to)
        app.router.add_get("/stall", self._stall)
        app.router.add_get("/html", self._html)
        app.router.add_get("/empty", self._empty)
        app.router.add_get("/huge", self._huge)
        # A short shutdown: /stall and /huge would otherwise hold stop() for aiohttp's 60 s default.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Origin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1

    async def _image(self, request: web.Request) -> web.Response:
        self._count(request)
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.Response:
        if name not in self.files:
            raise web.HTTPNotFound()
        # A deliberately unhelpful content type: what the bytes are is decided by decoding them.
        return web.Response(body=self.files[name], content_type="application/octet-stream")

    async def _code(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(status=int(request.match_info["status"]), text="no image here")

    async def _flaky(self, request: web.Request) -> web.Response:
        """503 (with Retry-After: 0) for the first `flaky_failures` hits, then the image."""
        self._count(request)
        if self.hits[request.path] <= self.flaky_failures:
            return web.Response(status=503, headers={"Retry-After": "0"}, text="busy")
        return self._file(request.match_info["name"])

    async def _redirect(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound(f"/img/{request.match_info['name']}")

    async def _to(self, request: web.Request) -> web.Response:
        """A redirect to anywhere: `/to?url=...`."""
        self._count(request)
        raise web.HTTPFound(request.query["url"])

    async def _loop(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPFound("/loop")

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        """Headers at once, then a body that never finishes."""
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff")
        await asyncio.sleep(3600)
        return response

    async def _html(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text="<!DOCTYPE html><html><body>Not found</body></html>", content_type="image/jpeg")

    async def _empty(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=b"", content_type="image/jpeg")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A body of `?mb=` megabytes (default 300) streamed without a Content-Length."""
        self._count(request)
        megabytes = int(request.query.get("mb", "300"))
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\0" * (1024 * 1024)
        try:
            for _ in range(megabytes):
                await response.write(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return response


@asynccontextmanager
async def daemon_app(settings: Settings, follow: bool = False) -> AsyncIterator[web.Application]:
    """The whole daemon (event log, pool, client, consumers, inbox) set up without an HTTP listener.

    With follow=False nothing runs by itself: drive it with `await drain(app)`.
    """
    from daemon.app import build_app

    app = build_app(settings, follow=follow)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield app
    finally:
        await runner.cleanup()


async def drain(app: web.Application) -> int:
    """Burst mode: run every consumer until the whole pipeline is idle; returns events handled."""
    from daemon.app import FOLLOWERS

    followers = app[FOLLOWERS]
    return await run_until_idle(followers)


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class Listener:
    """A loopback webhook receiver that answers from a script: e.g. [500, (503, {"Retry-After": "1"}), "hang", 200]."""

    def __init__(self, script: list[int | str | tuple[int, dict[str, str]]] | None = None,
                 hang_seconds: float = 30.0) -> None:
        self.script = list(script or [200])
        self.hang_seconds = hang_seconds
        self.received: list[Received] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[Received]:
        """Wait until `count` deliveries have arrived (without polling); the deliveries so far."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout)
        return self.received

    async def __aenter__(self) -> Listener:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(Received(dict(request.headers), await request.read(), time.time()))
        async with self._arrived:
            self._arrived.notify_all()
        step = self.script[min(len(self.received), len(self.script)) - 1]
        if step == "hang":
            await asyncio.sleep(self.hang_seconds)
            step = 200
        code, headers = step if isinstance(step, tuple) else (int(step), {})
        return web.json_response({"ok": code == 200}, status=code, headers=headers)


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0,
                     interval: float = 0.05) -> T:
    """Await `check` until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


# Jobs for the codec pool's tests: top-level here, so a worker can import them by name.
class PickyFailure(Exception):
    """An exception that pickles but does not unpickle: its __init__ takes two arguments, its args hold one."""

    def __init__(self, first: object, second: object) -> None:
        super().__init__(f"{first} {second}")


def fail_unpicklably() -> None:
    raise PickyFailure(1, 2)


def end_worker() -> None:
    """Ends the worker process at once, as a crash inside a codec library would."""
    os._exit(70)


def hang() -> None:
    """Never answers, as a codec caught in a loop on a pathological image would."""
    while True:
        time.sleep(3600)
