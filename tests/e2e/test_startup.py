"""Start-up refusals, as an operator meets them: one line on stderr, one error event in the log, exit status 1."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from daemon.testing import free_port


def log_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def assert_refused_as_in_use(result: Any, daemon: Any) -> None:
    """`result` exited 1 naming the running daemon's lock file and pid, and started nothing."""
    lock_file = f"{daemon.database}.lock"
    message = (f"the database is in use by another imgpipe process (pid {daemon.process.pid}): "
               f"{lock_file} is locked")
    assert result.returncode == 1
    assert result.stderr == f"imgpipe: {message}\n"
    (event,) = log_events(result.stdout)
    assert (event["event"], event["level"], event["message"]) == ("database_in_use", "error", message)
    assert (event["lock"], event["pid"]) == (lock_file, daemon.process.pid)


def test_a_second_daemon_on_the_same_database_exits_1_and_the_first_keeps_serving(daemon: Any) -> None:
    """`imgpipe run` on a database a running daemon uses (another port) is refused, naming the lock and its pid."""
    second = daemon.cli("run", env={**daemon.env, "IMGPIPE_SERVER_PORT": str(free_port())}, timeout=30)
    assert_refused_as_in_use(second, daemon)
    assert daemon.healthy()
    assert daemon.process.poll() is None
    assert [e["event"] for e in daemon.log_lines()].count("daemon_started") == 1


def test_replay_is_refused_while_the_daemon_runs(daemon: Any, helpers: Any) -> None:
    """`imgpipe replay` while the daemon runs exits 1 naming the lock and its pid, and the daemon keeps working."""
    replay = daemon.cli("replay", env=daemon.env, timeout=30)
    assert_refused_as_in_use(replay, daemon)
    assert daemon.healthy()
    submitted = daemon.cli("--config", str(daemon.client_config), "submit", str(helpers.sample_csv))
    assert submitted.returncode == 0, submitted.stderr
    status = daemon.cli("--config", str(daemon.client_config), "status", submitted.stdout.strip(), "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["request_id"] == submitted.stdout.strip()


def test_a_busy_port_exits_1_with_one_error_event_and_no_traceback(tmp_path: Path, helpers: Any) -> None:
    """With the HTTP port taken, `imgpipe run` logs port_in_use (and never daemon_started) and exits 1, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = helpers.write_config(tmp_path, port)
        result = helpers.run_imgpipe("--config", str(config), "run", cwd=tmp_path, timeout=30)
    message = f"cannot listen on 127.0.0.1:{port}: the port is in use by another process"
    assert result.returncode == 1
    assert result.stderr == f"imgpipe: {message}\n"
    (event,) = log_events(result.stdout)
    assert event["event"] == "port_in_use"
    assert (event["level"], event["host"], event["port"], event["message"]) == ("error", "127.0.0.1", port, message)
    assert not (tmp_path / "imgpipe.db").exists()  # refused before the event log was opened


def test_an_address_not_on_this_machine_exits_1_with_one_error_event(tmp_path: Path, helpers: Any) -> None:
    """With server.host an address this machine does not have, `imgpipe run` logs listen_failed with the reason."""
    port = free_port()
    config = helpers.write_config(tmp_path, port)
    result = helpers.run_imgpipe("--config", str(config), "run", cwd=tmp_path, timeout=30,
                                 env={"IMGPIPE_SERVER_HOST": "192.0.2.1"})  # TEST-NET-1: nobody's address
    message = f"cannot listen on 192.0.2.1:{port}: Cannot assign requested address"
    assert result.returncode == 1
    assert result.stderr == f"imgpipe: {message}\n"
    (event,) = log_events(result.stdout)
    assert (event["event"], event["host"], event["port"], event["error"]) == (
        "listen_failed", "192.0.2.1", port, "Cannot assign requested address")
