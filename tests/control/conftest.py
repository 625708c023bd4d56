"""Fixtures for commands on requests: the whole daemon on loopback, following the log, and a real image origin."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import FOLLOWERS, build_app
from daemon.config import Settings
from daemon.eventlog.follower import Follower
from daemon.http_api import EVENTLOG
from daemon.testing import Origin, eventually, jpeg_bytes, photo, pipeline_settings, with_database


@pytest.fixture
def database_url(either_database_url: str) -> str:
    """Every test here runs on both backends."""
    return either_database_url


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    return lambda **sections: pipeline_settings(tmp_path, **with_database(database_url, sections))


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin({"photo.jpg": jpeg_bytes(photo(320, 240, seed=5)),
                       "other.jpg": jpeg_bytes(photo(320, 240, seed=6))}) as server:
        yield server


class Daemon:
    """The daemon's app served on loopback with every consumer running, and a client for it."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self.app = client.server.app
        assert self.app is not None

    async def idle(self, follower: type[Follower]) -> None:
        """Wait until the running consumer of type `follower` has handled everything in the log so far."""
        found = [f for f in self.app[FOLLOWERS] if isinstance(f, follower)]
        assert await found[0].wait_for(self.app[EVENTLOG].head)

    async def upload(self, *rows: list[str], webhook_url: str = "") -> str:
        lines = ["S. No.,Product Name,Input Image Urls"]
        lines += [f'{n},Product {n},"{",".join(urls)}"' for n, urls in enumerate(rows, start=1)]
        form: dict[str, Any] = {"file": io.BytesIO(("\n".join(lines) + "\n").encode())}
        if webhook_url:
            form["webhook_url"] = webhook_url
        response = await self.client.post("/upload", data=form)
        assert response.status == 202, await response.text()
        return str((await response.json())["request_id"])

    async def status(self, request_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/status/{request_id}")
        assert response.status == 200, await response.text()
        return dict(await response.json())

    async def finished(self, request_id: str) -> dict[str, Any]:
        """The status once the request is no longer queued or processing."""

        async def done() -> dict[str, Any] | None:
            response = await self.client.get(f"/status/{request_id}")  # 404 until an inbox request shows
            body = await response.json()
            return body if response.status == 200 and body["status"] not in ("queued", "processing") else None

        return await eventually(done, f"request {request_id} to finish")


@pytest.fixture
def serve_daemon() -> Callable[[Settings], Any]:
    """`async with serve_daemon(settings) as daemon:` runs the whole daemon for the block."""

    class Serving:
        def __init__(self, settings: Settings) -> None:
            self.settings = settings
            self.client: TestClient | None = None

        async def __aenter__(self) -> Daemon:
            self.client = TestClient(TestServer(build_app(self.settings)))
            await self.client.start_server()
            return Daemon(self.client, self.settings)

        async def __aexit__(self, *exc: object) -> None:
            assert self.client is not None
            await self.client.close()

    return Serving
