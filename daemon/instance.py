"""One process per database: the advisory lock that `imgpipe run` and `imgpipe replay` hold while they work.

Two processes on one event log would both consume its events: every image downloaded twice, every webhook
sent twice, views rebuilt under a running daemon. The lock is flock(2) on `<database file>.lock`, so the
kernel drops it when its holder ends, however it ends: a crash never leaves a stale lock behind. The holder
writes its pid into the file so that whoever is refused can say who holds it.

A database that is not a SQLite file (a server URL) has no file to sit next to: it is locked through
`<temp folder>/imgpipe-<hash of the URL>.lock`, which keeps two processes on one machine apart, not
processes on different machines. An in-memory database belongs to its process and needs no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DatabaseInUse(Exception):
    """Another process holds the database's lock."""

    event = "database_in_use"

    def __init__(self, database: str, lock_file: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"the database is in use by another imgpipe process ({holder}): {lock_file} is locked")
        self.details: dict[str, object] = {"database": database, "lock_file": str(lock_file), "pid": pid}


def lock_file(database_url: str) -> Path | None:
    """Where the lock for `database_url` lives; None for an in-memory database."""
    parsed = urllib.parse.urlparse(database_url)
    if not parsed.scheme.startswith("sqlite"):
        digest = hashlib.sha256(database_url.encode("utf-8")).hexdigest()[:16]  # the URL may hold a password
        return Path(tempfile.gettempdir()) / f"imgpipe-{digest}.lock"
    database = parsed.path[1:]  # how peewee's db_url reads it: sqlite:////abs/path or sqlite:///rel/path
    if database in ("", ":memory:"):
        return None
    return Path(database).with_name(Path(database).name + ".lock")


@contextmanager
def exclusive(database_url: str) -> Iterator[Path | None]:
    """Hold the database's lock for the block; DatabaseInUse at once (never waiting) if another process has it."""
    path = lock_file(database_url)
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseInUse(database_url, path, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # while still locked: a pid left behind would name a process that has gone
    finally:
        os.close(fd)  # releases the lock; the file stays, deleting it would race with the next process opening it


def _holder(fd: int) -> int | None:
    """The pid the holder wrote; None if it has not written it yet."""
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
