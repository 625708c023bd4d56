"""Shared fixtures for the spine tests: settings on tmp paths, the real app on loopback, CSVs, polling.

Test folders have no __init__.py, so helpers are handed out as fixtures rather than imported.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import test_utils, web

from daemon.app import INBOX, build_app
from daemon.config import Settings, load_settings, replace
from daemon.eventlog.store import EventLog, open_store
from daemon.http_api import STATUS_VIEW
from daemon.ingest.csvfile import COLUMNS
from daemon.ingest.inbox import Inbox
from daemon.instance import DatabaseUnreachable, connect_postgresql, is_postgresql
from daemon.s3server import SeaweedFS, Unavailable
from daemon.testing import clean_environment, free_port, imgpipe_command
from daemon.views.export import FINISHED

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "sample.csv"
SETTLE_SECONDS = 0.3
DEADLINE = 10.0


@pytest.fixture(autouse=True, scope="module")
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test module starts (observers, executors, the event-log writer) has ended by its end."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + DEADLINE
    while leaked := [t for t in threading.enumerate() if t not in before]:
        if time.monotonic() > deadline:
            raise AssertionError(f"threads left running: {sorted(t.name for t in leaked)}")
        time.sleep(0.01)  # a thread told to stop may take a moment to end



def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(folder: Path, port: int, database_url: str | None = None) -> Path:
    """A config file in `folder` naming absolute paths inside it (the way an operator would)."""
    database_url = database_url or "sqlite:///" + str(folder / "imgpipe.db")
    path = folder / "config.toml"
    path.write_text(
        "[server]\n"
        f"port = {port}\n"
        "[paths]\n"
        f"inbox = {toml_string(str(folder / 'inbox'))}\n"
        f"outbox = {toml_string(str(folder / 'outbox'))}\n"
        f"images = {toml_string(str(folder / 'images'))}\n"
        f"database = {toml_string(database_url)}\n"
        "[inbox]\n"
        f"settle_seconds = {SETTLE_SECONDS}\n",
        encoding="utf-8",
    )
    return path


def csv_bytes(rows: Iterable[Sequence[str]], header: Sequence[str] = COLUMNS) -> bytes:
    """A CSV file as a spreadsheet writes it: a header, then one line per row, URL cells quoted."""
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(f'"{cell}"' if "," in cell else cell for cell in row))
    return ("\n".join(lines) + "\n").encode("utf-8")


def batch_rows(count: int, urls_per_row: int = 1, prefix: str = "SKU",
               host: str = "https://img.example.com") -> list[tuple[str, str, str]]:
    """`count` valid rows with distinct serials."""
    return [
        (str(n), f"{prefix}{n}", ",".join(f"{host}/{prefix.lower()}{n}-{i}.jpg" for i in range(urls_per_row)))
        for n in range(1, count + 1)
    ]


def db_file(settings: Settings) -> Path:
    prefix = "sqlite:///"
    assert settings.database_url.startswith(prefix)
    return Path(settings.database_url[len(prefix):])


def execute(settings: Settings, sql: str, *params: Any) -> None:
    """Run and commit one statement (`?` placeholders) on the daemon's database through a connection of its own."""
    query(settings, sql, *params, rows=False)


def query(settings: Settings, sql: str, *params: Any, rows: bool = True) -> list[tuple[Any, ...]]:
    """Rows from the daemon's database (`?` placeholders) through a connection of its own: sqlite3 or psycopg."""
    if is_postgresql(settings.database_url):
        with connect_postgresql(settings.database_url) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
            return [tuple(row) for row in cursor.fetchall()] if rows and cursor.description else []
    connection = sqlite3.connect(db_file(settings), timeout=10)
    try:
        with connection:
            return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def stored_events(settings: Settings, stream: str | None = None) -> list[tuple[int, str, int, str, dict[str, Any]]]:
    """(position, stream, version, type, data) of every event in the log, in log order."""
    sql = "SELECT position, stream, version, type, data FROM events"
    params: tuple[Any, ...] = ()
    if stream is not None:
        sql, params = sql + " WHERE stream = ?", (stream,)
    rows = query(settings, sql + " ORDER BY position", *params)
    return [(p, s, v, t, json.loads(d)) for p, s, v, t, d in rows]


async def eventually(check: Callable[[], T | None] | Callable[[], Awaitable[T | None]], what: str,
                     timeout: float = DEADLINE, interval: float = 0.02) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def finished(client: test_utils.TestClient[Any, Any], request_id: str, timeout: float = 30.0,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The request's status once the status view has it and it has finished."""

    async def done() -> dict[str, Any] | None:
        response = await client.get(f"/status/{request_id}", headers=headers)
        body = await response.json()
        return body if response.status == 200 and body["status"] in FINISHED else None

    return dict(await eventually(done, "the request to finish", timeout=timeout))


@dataclass
class Served:
    """The daemon's aiohttp app served on 127.0.0.1, with a client pointed at it."""

    app: web.Application
    client: test_utils.TestClient
    settings: Settings

    @property
    def inbox(self) -> Inbox:
        return self.app[INBOX]

    @property
    def folder(self) -> Path:
        return self.settings.path("inbox")

    async def status(self, request_id: str) -> tuple[int, dict[str, Any]]:
        response = await self.client.get(f"/status/{request_id}")
        return response.status, await response.json()

    async def status_when_ready(self, request_id: str) -> dict[str, Any]:
        """The status body once the status view has folded the request in."""

        async def ready() -> dict[str, Any] | None:
            code, body = await self.status(request_id)
            return body if code == 200 else None

        return await eventually(ready, f"GET /status/{request_id} to answer 200")


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Served]:
    """Run the daemon's app on a real loopback port (settings.server.port, so status URLs are right).

    Only the status view follows the log: the pipeline stages would fetch image URLs, which is not
    what the spine tests are about (the e2e test runs the whole daemon).
    """
    app = build_app(settings, follow=False)
    server = test_utils.TestServer(app, host="127.0.0.1", port=settings.server.port)
    async with test_utils.TestClient(server) as client:
        view = asyncio.create_task(app[STATUS_VIEW].run(), name="test:view.status")
        try:
            yield Served(app, client, settings)
        finally:
            view.cancel()
            await asyncio.gather(view, return_exceptions=True)


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> Callable[..., Settings]:
    """Settings loaded from a config file in tmp_path (free port, tmp paths), some sections changed."""

    def make(**sections: dict[str, Any]) -> Settings:
        settings = load_settings(write_config(tmp_path, free_port(), database_url), env={})
        return replace(settings, **sections) if sections else settings

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


# PostgreSQL for the tests that run on both backends: each test gets a schema of its own in this database.
POSTGRES_URL = os.environ.get("IMGPIPE_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("IMGPIPE_TEST_REQUIRE_POSTGRES") == "1"
BACKENDS = ("sqlite", "postgresql")


@functools.cache
def postgres_unreachable() -> str | None:
    """Why the test PostgreSQL cannot be used (None: it can)."""
    try:
        connect_postgresql(POSTGRES_URL).close()
    except DatabaseUnreachable as exc:
        return str(exc)
    return None


@contextmanager
def backend_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on `backend`, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'imgpipe.db'}"
        return
    if reason := postgres_unreachable():
        message = (f"{reason}; start PostgreSQL or set IMGPIPE_TEST_DATABASE_URL=postgresql://user@host:port/db "
                   "to run the PostgreSQL tests")
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with connect_postgresql(POSTGRES_URL) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    finally:
        with connect_postgresql(POSTGRES_URL) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """The daemon's database: SQLite, except in the folders whose conftest runs their tests on both backends."""
    with backend_database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def either_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """For a folder's conftest whose tests run on both backends: `database_url` returns this."""
    with backend_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def both_backends() -> Callable[[str, Path], AbstractContextManager[str]]:
    """For a folder's conftest: `database_url` on the backend its parameter names."""
    return backend_database


@pytest.fixture
def postgres_url(tmp_path: Path, both_backends: Callable[[str, Path], AbstractContextManager[str]]) -> Iterator[str]:
    """A PostgreSQL database of this test's own (for what only PostgreSQL has: claims, leadership, clusters)."""
    with both_backends("postgresql", tmp_path) as url:
        yield url


@pytest.fixture
async def postgres_eventlog(postgres_url: str) -> AsyncIterator[EventLog]:
    """An open store on `postgres_url`."""
    log = open_store(postgres_url)
    await log.open()
    yield log
    await log.close()


@pytest.fixture
def serve_app() -> Callable[[Settings], AbstractAsyncContextManager[Served]]:
    """`async with serve_app(settings) as served:` runs the app on loopback for the block."""
    return serve


def run_imgpipe(*args: str, cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `imgpipe ARGS` as a real process in `cwd`, with only `env`'s IMGPIPE_* variables set."""
    return subprocess.run([*imgpipe_command(), *args], cwd=cwd, env=clean_environment(**(env or {})),
                          capture_output=True, text=True, timeout=timeout, check=False)


class Helpers:
    """The module-level helpers of this conftest (CSV builders, DB readers, polling, the CLI)."""

    csv_bytes = staticmethod(csv_bytes)
    batch_rows = staticmethod(batch_rows)
    query = staticmethod(query)
    execute = staticmethod(execute)
    stored_events = staticmethod(stored_events)
    eventually = staticmethod(eventually)
    finished = staticmethod(finished)
    db_file = staticmethod(db_file)
    free_port = staticmethod(free_port)
    write_config = staticmethod(write_config)
    run_imgpipe = staticmethod(run_imgpipe)
    sample_csv = SAMPLE_CSV
    root = ROOT
    settle_seconds = SETTLE_SECONDS


@pytest.fixture
def helpers() -> type[Helpers]:
    return Helpers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a reachable PostgreSQL (and unless CI requires it), its tests are left out, said once at the end."""
    if REQUIRE_POSTGRES or not any(_on_postgresql(item) for item in items) or not postgres_unreachable():
        return
    left_out = [item for item in items if _on_postgresql(item)]
    items[:] = [item for item in items if not _on_postgresql(item)]
    config.hook.pytest_deselected(items=left_out)
    config.stash[POSTGRES_LEFT_OUT] = len(left_out)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if left_out := config.stash.get(POSTGRES_LEFT_OUT, 0):
        terminalreporter.write_line(
            f"{left_out} PostgreSQL tests not run: {postgres_unreachable()}; start PostgreSQL or set "
            "IMGPIPE_TEST_DATABASE_URL=postgresql://user@host:port/db to run them")


POSTGRES_LEFT_OUT = pytest.StashKey[int]()


def _on_postgresql(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgresql" in callspec.params.values()


REQUIRE_S3 = os.environ.get("IMGPIPE_TEST_REQUIRE_S3") == "1"
# SeaweedFS without an S3 identity file accepts any key; set before the codec's forkserver starts, whose workers
# keep the environment it had (the daemon reads its credentials from these variables only).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "imgpipe-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "imgpipe-test")


def s3_unavailable(reason: str) -> None:
    if REQUIRE_S3:
        pytest.fail(f"SeaweedFS is required here (IMGPIPE_TEST_REQUIRE_S3=1): {reason}")
    pytest.skip(reason)


def started(server: SeaweedFS) -> SeaweedFS:
    """`server` started, or the test skipped (failed under IMGPIPE_TEST_REQUIRE_S3=1)."""
    try:
        server.start()
    except Unavailable as exc:
        s3_unavailable(str(exc))
    return server


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server for the run's tests; each test writes under a prefix of its own."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield started(server)
    finally:
        server.stop()


@pytest.fixture
def start_s3() -> Callable[[SeaweedFS], SeaweedFS]:
    """`start_s3(SeaweedFS(folder))`: started (blocking), or the test skipped as the `seaweed` fixture would be."""
    return started
