"""The one-process-per-database lock: where it lives, what it says, and that a dead holder never keeps it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from daemon import instance
from daemon.instance import (
    DatabaseInUse,
    connect_postgresql,
    exclusive,
    lock_file,
    postgresql_parameters,
    without_password,
)


def test_the_lock_file_sits_next_to_a_sqlite_database(tmp_path: Path) -> None:
    """A SQLite file's lock is `<file>.lock` beside it; an in-memory database has none."""
    assert lock_file(f"sqlite:///{tmp_path / 'imgpipe.db'}") == tmp_path / "imgpipe.db.lock"
    assert lock_file(f"sqliteext:///{tmp_path / 'log.db'}") == tmp_path / "log.db.lock"
    assert lock_file("sqlite:///:memory:") is None


def test_a_url_shown_in_logs_and_messages_has_no_password() -> None:
    """A database URL's password is replaced by *** wherever the URL is shown."""
    assert without_password("postgresql://imgpipe:s3cret@db.example:5432/imgpipe?sslmode=require") == \
        "postgresql://imgpipe:***@db.example:5432/imgpipe?sslmode=require"
    assert without_password("postgresql://imgpipe@db.example/imgpipe") == "postgresql://imgpipe@db.example/imgpipe"
    assert without_password("sqlite:////data/imgpipe.db") == "sqlite:////data/imgpipe.db"
    assert without_password("postgresql://imgpipe@db/imgpipe?password=s3cret&sslmode=require") == \
        "postgresql://imgpipe@db/imgpipe?password=***&sslmode=require"


def test_a_password_with_reserved_characters_is_given_percent_encoded() -> None:
    """A password holding @, : or / is written percent-encoded in the URL and reaches the driver decoded."""
    params = postgresql_parameters("postgresql://image%40pipe:p%40ss%3Aw%2Fd@db.example:5432/imgpipe")
    assert (params["user"], params["password"], params["host"], params["dbname"]) == (
        "image@pipe", "p@ss:w/d", "db.example", "imgpipe")


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    """Taking a held lock fails at once naming the file and the holder's pid; once released it is free again."""
    url = f"sqlite:///{tmp_path / 'data' / 'imgpipe.db'}"
    with exclusive(url) as path:
        assert path == str(tmp_path / "data" / "imgpipe.db.lock")
        assert Path(path).read_text() == f"{os.getpid()}\n"
        with pytest.raises(DatabaseInUse) as refused, exclusive(url):
            pass
        assert refused.value.details == {"database": url, "lock": path, "pid": os.getpid()}
        assert str(refused.value) == f"the database is in use by another imgpipe process (pid {os.getpid()}): " \
                                     f"{path} is locked"
    assert Path(path).read_text() == ""
    with exclusive(url):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """A process killed with SIGKILL while holding the lock leaves it free for the next one."""
    url = f"sqlite:///{tmp_path / 'imgpipe.db'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom daemon.instance import exclusive\n"
         f"with exclusive({url!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DatabaseInUse), exclusive(url):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(url) as path:
        assert path is not None and Path(path).read_text() == f"{os.getpid()}\n"


def test_a_postgresql_database_is_held_by_one_process_at_a_time(
        tmp_path: Path, both_backends: Callable[[str, Path], AbstractContextManager[str]]) -> None:
    """On PostgreSQL the lock is an advisory lock: a second holder is refused naming the first's pid, then it is free."""
    with both_backends("postgresql", tmp_path) as url:
        with exclusive(url) as lock:
            with pytest.raises(DatabaseInUse) as refused, exclusive(url):
                pass
            assert refused.value.details == {"database": url, "lock": lock, "pid": os.getpid()}
        with exclusive(url):  # the server released it with its connection
            pass


def test_a_postgresql_lock_whose_connection_is_lost_is_taken_again(
        tmp_path: Path, both_backends: Callable[[str, Path], AbstractContextManager[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When the server ends the lock's session (a restart, an idle timeout), the holder takes the lock again, so a
    second process is still refused."""
    monkeypatch.setattr(instance, "LOCK_CHECK_SECONDS", 0.05)
    with both_backends("postgresql", tmp_path) as url, exclusive(url):
        with connect_postgresql(url) as admin:
            ended = admin.execute("SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = %s", (f"imgpipe pid {os.getpid()}",)).fetchall()
            assert [terminated for _, terminated in ended] == [True]
            deadline = time.monotonic() + 10
            # Held again by a new session: not only connected (a session shows before its lock does), and not the
            # ended one (it shows, lock and all, until its backend has exited).
            while not admin.execute("SELECT 1 FROM pg_locks JOIN pg_stat_activity USING (pid) WHERE "
                                    "locktype = 'advisory' AND granted AND application_name = %s AND pid != %s",
                                    (f"imgpipe pid {os.getpid()}", ended[0][0])).fetchall():
                assert time.monotonic() < deadline, "the lock was not taken again"
                time.sleep(0.02)
        with pytest.raises(DatabaseInUse), exclusive(url):
            pass
