"""The page and the endpoints behind it: the whole daemon on loopback with a real image origin; for the browser
tests, the daemon as a real process driven through Debian's chromium."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from daemon.app import build_app
from daemon.testing import Origin, eventually, jpeg_bytes, photo, pipeline_settings

PHOTOS = {f"p{n}.jpg": jpeg_bytes(photo(320, 240, seed=n)) for n in range(3)}


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin(PHOTOS) as server:
        yield server


def csv_of(*rows: tuple[str, list[str]]) -> bytes:
    """A CSV with one row per (product name, image URLs)."""
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{n},{name},"{",".join(urls)}"' for n, (name, urls) in enumerate(rows, start=1)]
    return ("\n".join(lines) + "\n").encode()


class Served:
    """The daemon's app on loopback with every consumer running."""

    def __init__(self, client: TestClient) -> None:  # type: ignore[type-arg]
        self.client = client

    async def upload(self, *rows: tuple[str, list[str]], headers: dict[str, str] | None = None) -> str:
        form = aiohttp.FormData()
        form.add_field("file", csv_of(*rows), filename="catalog.csv", content_type="text/csv")
        response = await self.client.post("/upload", data=form, headers=headers)
        assert response.status == 202, await response.text()
        return str((await response.json())["request_id"])

    async def finished(self, request_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            response = await self.client.get(f"/status/{request_id}", headers=headers)
            body = await response.json()
            return body if response.status == 200 and body["status"] not in ("queued", "processing") else None

        return await eventually(done, f"request {request_id} to finish")


@pytest.fixture
def serve(tmp_path: Path) -> Callable[..., Any]:
    """`async with serve(**sections) as served:` the whole daemon (pipeline_settings changed by `sections`)."""

    class Serving:
        def __init__(self, **sections: dict[str, object]) -> None:
            self.client = TestClient(TestServer(build_app(pipeline_settings(tmp_path, **sections))))

        async def __aenter__(self) -> Served:
            await self.client.start_server()
            return Served(self.client)

        async def __aexit__(self, *exc: object) -> None:
            await self.client.close()

    return Serving


@pytest.fixture
def photos() -> dict[str, bytes]:
    """The origin's files: name -> JPEG bytes."""
    return PHOTOS
