"""The daemon as a real process: `imgpipe run` on a free port with IMGPIPE_* overrides and tmp paths."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.testing import clean_environment, free_port, imgpipe_command

START_DEADLINE = 30.0
STOP_DEADLINE = 20.0




@dataclass
class Daemon:
    """A running `imgpipe run` process and where it keeps things."""

    base_url: str
    port: int
    root: Path
    inbox: Path
    outbox: Path
    images: Path
    database: Path
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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """`imgpipe run` in an empty folder, configured only by IMGPIPE_* variables; stopped with SIGTERM."""
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
        "IMGPIPE_PATHS_DATABASE": f"sqlite:///{database}",
        "IMGPIPE_INBOX_SETTLE_SECONDS": "0.2",
        "IMGPIPE_COMPRESS_WORKERS": "2",
        "IMGPIPE_DOWNLOAD_BACKOFF_BASE": "0.05",
        "IMGPIPE_DOWNLOAD_BACKOFF_MAX": "0.2",
        "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",  # the test origins live on 127.0.0.1
    }
    client_config = tmp_path / "client.toml"
    client_config.write_text(f"[server]\nport = {port}\n", encoding="utf-8")
    stdout_path, stderr_path = tmp_path / "daemon.stdout", tmp_path / "daemon.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen([*imgpipe_command(), "run"], cwd=run_dir, env=clean_environment(**overrides),
                                   stdout=out, stderr=err)
    running = Daemon(f"http://127.0.0.1:{port}", port, tmp_path, inbox, outbox, images, database, overrides,
                     client_config, stdout_path, stderr_path, process)
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
