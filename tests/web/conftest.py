"""The page and the endpoints behind it: the whole daemon on loopback with a real image origin; for the browser
tests, the daemon as a real process driven through Debian's chromium."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
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


# The browser tests --------------------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download cannot work here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
REQUIRE_BROWSER = os.environ.get("IMGPIPE_TEST_REQUIRE_BROWSER") == "1"
BROWSER_LEFT_OUT = pytest.StashKey[tuple[int, str]]()
E2E_CONFTEST = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without chromium (and unless CI requires it), the browser tests are left out, said once at the end."""
    browser_tests = [item for item in items if item.get_closest_marker("browser")]
    if not browser_tests or REQUIRE_BROWSER or not (reason := browser_missing()):
        return
    items[:] = [item for item in items if not item.get_closest_marker("browser")]
    config.hook.pytest_deselected(items=browser_tests)
    config.stash[BROWSER_LEFT_OUT] = (len(browser_tests), reason)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if left_out := config.stash.get(BROWSER_LEFT_OUT, None):
        count, reason = left_out
        terminalreporter.write_line(f"{count} browser tests not run: {reason}; "
                                    "IMGPIPE_TEST_REQUIRE_BROWSER=1 makes that a failure")


@functools.cache
def e2e_conftest() -> ModuleType:
    """tests/e2e/conftest.py, whose `launch` runs the daemon as a real process (test folders are no packages)."""
    spec = importlib.util.spec_from_file_location("imgpipe_e2e_conftest", E2E_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def launch_daemon() -> Callable[..., Any]:
    """`with launch_daemon(tmp_path, database_url, IMGPIPE_X="...") as daemon:` runs `imgpipe run` for the block."""
    return e2e_conftest().launch  # type: ignore[no-any-return]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless chromium with a fresh profile, driven by Playwright."""
    if reason := browser_missing():
        pytest.fail(reason)  # only reached when IMGPIPE_TEST_REQUIRE_BROWSER=1 kept the test
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()
