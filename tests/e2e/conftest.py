"""The daemon as a real process: `imgpipe run` on a free port with IMGPIPE_* overrides and tmp paths; reading its
database (SQLite or PostgreSQL) from outside; a TCP proxy that cuts the daemon off its PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.instance import connect_postgresql, is_postgresql
from daemon.testing import clean_environment, free_port, imgpipe_command

START_DEADLINE = 30.0
STOP_DEADLINE = 20.0
ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


@pytest.fixture(scope="session")
def databases(pytestconfig: pytest.Config) -> Callable[[str, Path], AbstractContextManager[str]]:
    """`both_backends` for fixtures wider than one test (the crash scenario runs once per backend)."""
    # A conftest is registered as a plugin under its path; its fixture `both_backends` is function-scoped.
    root = pytestconfig.pluginmanager.get_plugin(str(ROOT_CONFTEST))
    assert root is not None, ROOT_CONFTEST
    backend_database: Callable[[str, Path], AbstractContextManager[str]] = root.backend_database
    return backend_database


def read_database(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows from the daemon's database (`?` placeholders) through a read-only connection of the test's own."""
    if is_postgresql(url):
        with connect_postgresql(url) as connection:
            connection.read_only = True
            return [tuple(row) for row in connection.execute(sql.replace("?", "%s"), params).fetchall()]
    path = urllib.parse.urlsplit(url).path[1:]  # sqlite:////abs/path, as peewee reads it
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


@pytest.fixture(scope="session")
def read_db() -> Callable[..., list[tuple[Any, ...]]]:
    """`read_db(database_url, sql, *params)`: rows from the daemon's database, on either backend."""
    return read_database


class Proxy:
    """A TCP proxy on 127.0.0.1 to `target`, on an event loop in a thread of its own (so a test blocked in a
    subprocess call does not stall it): `cut()` ends every connection and refuses new ones until `restore()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.accepted = 0  # connections taken since the start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def url(self, database_url: str, password: str) -> str:
        """`database_url` pointed at this proxy instead of its server, with `password` unless it has one (a
        server that trusts loopback ignores it; the test checks that no log line shows it)."""
        parsed = urllib.parse.urlsplit(database_url)
        user = urllib.parse.quote(parsed.username or "", safe="")
        secret = urllib.parse.quote(parsed.password or password, safe="")
        return urllib.parse.urlunsplit(parsed._replace(netloc=f"{user}:{secret}@127.0.0.1:{self.port}"))

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        self._thread.start()
        self.restore()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        async def listen() -> None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

        self._call(listen())

    def cut(self) -> None:
        """Close the listening socket (new connections are refused) and abort every open connection."""
        async def cut() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._open):
                writer.transport.abort()
            self._open.clear()

        self._call(cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        pair = {client_writer, server_writer}
        self._open |= pair

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()  # one side gone: the other goes too, as with a real network cut

        await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))
        self._open -= pair


@pytest.fixture
def postgres_proxy() -> Iterator[Callable[[str], Proxy]]:
    """`postgres_proxy(url)`: a started Proxy to the PostgreSQL server of `url`, closed after the test."""
    proxies: list[Proxy] = []

    def make(url: str) -> Proxy:
        parsed = urllib.parse.urlsplit(url)
        proxy = Proxy(parsed.hostname or "127.0.0.1", parsed.port or 5432)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()



@dataclass
class Daemon:
    """A running `imgpipe run` process and where it keeps things."""

    base_url: str
    port: int
    root: Path
    inbox: Path
    outbox: Path
    images: Path
    database: Path  # the SQLite file, when `database_url` names one
    database_url: str
    env: dict[str, str]
    client_config: Path
    stdout_path: Path
    stderr_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def archive(self) -> Path:
        return self.inbox / "archive"

    @property
    def rejected(self) -> Path:
        return self.inbox / "rejected"

    def log_lines(self) -> list[dict[str, Any]]:
        """Every complete line the daemon wrote to stdout, each parsed as a JSON object (fails otherwise)."""
        text = self.stdout_path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]
        entries = []
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"daemon stdout line is not JSON: {line!r}")
            if not isinstance(entry, dict) or "event" not in entry:
                pytest.fail(f"daemon stdout line is not a JSON object with an 'event' key: {line!r}")
            entries.append(entry)
        return entries

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def healthy(self) -> bool:
        return _healthy(self.base_url)

    def cli(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `imgpipe ARGS` as a client of this daemon (pass --config or IMGPIPE_* in env to find it)."""
        folder = cwd or self.root / "client"
        folder.mkdir(exist_ok=True)
        return subprocess.run([*imgpipe_command(), *args], cwd=folder, env=clean_environment(**(env or {})),
                              capture_output=True, text=True, timeout=timeout, check=False)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def launch(tmp_path: Path, database_url: str, **env: str) -> Iterator[Daemon]:
    """`imgpipe run` in an empty folder, configured only by IMGPIPE_* variables (`env` adds or overrides some),
    once it answers /healthz; stopped with SIGTERM at the end of the block, which it must obey with exit status 0."""
    port = free_port()
    run_dir = tmp_path / "run"  # no config.toml here: every setting comes from the environment
    run_dir.mkdir()
    inbox, outbox, images = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "images"
    database = tmp_path / "imgpipe.db"
    overrides = {
        "IMGPIPE_SERVER_PORT": str(port),
        "IMGPIPE_PATHS_INBOX": str(inbox),
        "IMGPIPE_PATHS_OUTBOX": str(outbox),
        "IMGPIPE_PATHS_IMAGES": str(images),
        "IMGPIPE_PATHS_DATABASE": database_url,
        "IMGPIPE_INBOX_SETTLE_SECONDS": "0.2",
        "IMGPIPE_COMPRESS_WORKERS": "2",
        "IMGPIPE_DOWNLOAD_BACKOFF_BASE": "0.05",
        "IMGPIPE_DOWNLOAD_BACKOFF_MAX": "0.2",
        "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",  # the test origins live on 127.0.0.1
        **env,
    }
    client_config = tmp_path / "client.toml"
    client_config.write_text(f"[server]\nport = {port}\n", encoding="utf-8")
    stdout_path, stderr_path = tmp_path / "daemon.stdout", tmp_path / "daemon.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen([*imgpipe_command(), "run"], cwd=run_dir, env=clean_environment(**overrides),
                                   stdout=out, stderr=err)
    running = Daemon(f"http://127.0.0.1:{port}", port, tmp_path, inbox, outbox, images, database, database_url,
                     overrides, client_config, stdout_path, stderr_path, process)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not _healthy(running.base_url):
            if process.poll() is not None:
                pytest.fail(f"the daemon exited with {process.returncode} before answering /healthz:\n"
                            f"{running.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the daemon did not answer /healthz within {START_DEADLINE:g} s:\n{running.stderr()}")
            time.sleep(0.05)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail(f"the daemon ignored SIGTERM for {STOP_DEADLINE:g} s and had to be killed:\n"
                            f"{running.stderr()}")
        if process.returncode != 0:
            pytest.fail(f"the daemon exited with {process.returncode} after SIGTERM:\n{running.stderr()}")


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path,
                 both_backends: Callable[[str, Path], AbstractContextManager[str]]) -> Iterator[str]:
    """SQLite, or each backend a module names: `pytestmark = pytest.mark.parametrize("database_url",
    ["sqlite", "postgresql"], indirect=True)`."""
    with both_backends(getattr(request, "param", "sqlite"), tmp_path) as url:
        yield url


@pytest.fixture
def daemon(tmp_path: Path, database_url: str) -> Iterator[Daemon]:
    """`imgpipe run` in an empty folder on `database_url` (SQLite unless a module asks for both backends)."""
    with launch(tmp_path, database_url) as running:
        yield running


@pytest.fixture
def launch_daemon() -> Callable[..., AbstractContextManager[Daemon]]:
    """`with launch_daemon(tmp_path, database_url, IMGPIPE_X="...") as daemon:` runs the daemon for the block."""
    return launch
