"""One process per database: the lock that `imgpipe run` and `imgpipe replay` hold while they work.

Two processes on one event log would both consume its events: every image downloaded twice, every webhook
sent twice, views rebuilt under a running daemon.

- A SQLite file: flock(2) on `<database file>.lock`, so the kernel drops it when its holder ends, however it ends.
  The holder writes its pid into the file so that whoever is refused can say who holds it.
- PostgreSQL: a session advisory lock keyed by the database and schema, held on a connection of its own for the
  process's life; the server drops it when that connection ends. The holder names itself in `application_name`.
  Daemons that keep their images in an object store may share a database (daemon.cluster): they take the lock
  shared, each also holding a lock on its node name; `imgpipe replay` and a daemon without a store take it
  exclusive, so either is refused while any daemon runs there, and refuses any daemon while it does.
- An in-memory database belongs to its process and needs no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("daemon")

APPLICATION_NAME = "imgpipe pid {pid}"
# Keyed by what the log lives in, so daemons on other databases or schemas of one server do not exclude each other.
LOCK_KEY = "hashtextextended('imgpipe/' || current_database() || '/' || current_schema(), 0)"
NODE_KEY = "hashtextextended('imgpipe-node/' || current_database() || '/' || current_schema() || '/' || %s, 0)"


class DatabaseInUse(Exception):
    """Another process holds the database's lock."""

    event = "database_in_use"

    def __init__(self, database: str, lock: str, pid: int | None, hint: str = "") -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"the database is in use by another imgpipe process ({holder}): {lock} is locked"
                         + (f"; {hint}" if hint else ""))
        self.details: dict[str, object] = {"database": without_password(database), "lock": lock, "pid": pid}


class DatabaseUnreachable(Exception):
    """The database server cannot be reached or refuses us; the message names the URL without its password."""

    event = "database_unreachable"

    def __init__(self, database: str, reason: str) -> None:
        super().__init__(f"cannot connect to the database {without_password(database)}: {reason}")
        self.details: dict[str, object] = {"database": without_password(database), "reason": reason}


def without_password(url: str) -> str:
    """`url` with any password (in its user part or its query) replaced by ***, fit for logs and messages."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None and "password" not in urllib.parse.parse_qs(parsed.query):
        return url  # untouched: a round trip would drop the slashes of sqlite:////abs/path
    if parsed.password is not None:
        user, _, host = parsed.netloc.rpartition("@")
        parsed = parsed._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    if "password" in urllib.parse.parse_qs(parsed.query):
        query = [(k, "***" if k == "password" else v) for k, v in urllib.parse.parse_qsl(parsed.query)]
        parsed = parsed._replace(query=urllib.parse.urlencode(query, safe="*"))
    return urllib.parse.urlunsplit(parsed)


def postgresql_parameters(database_url: str) -> dict[str, Any]:
    """The connection parameters of a postgresql:// URL, user and password percent-decoded (peewee's parser keeps
    them as written, so a password holding @, : or / could not be given)."""
    from playhouse.db_url import parse

    params: dict[str, Any] = parse(database_url)
    params["dbname"] = params.pop("database")
    for key in ("user", "password"):
        if isinstance(params.get(key), str):
            params[key] = urllib.parse.unquote(params[key])
    return params


def is_postgresql(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.split("+")[0] in ("postgres", "postgresql")


def lock_file(database_url: str) -> Path | None:
    """Where the lock file for a SQLite `database_url` lives; None for an in-memory database."""
    parsed = urllib.parse.urlparse(database_url)
    database = parsed.path[1:]  # how peewee's db_url reads it: sqlite:////abs/path or sqlite:///rel/path
    if database in ("", ":memory:"):
        return None
    return Path(database).with_name(Path(database).name + ".lock")


@dataclass(frozen=True)
class Sharing:
    """How a PostgreSQL database's lock is held: shared by daemons each on its own `node` (with an object store),
    else exclusive; `hint` says in a refusal what to do about it."""

    shared: bool = False
    node: str = ""
    hint: str = ""


@contextmanager
def exclusive(database_url: str, sharing: Sharing = Sharing()) -> Iterator[str | None]:
    """Hold the database's lock for the block (yields what is locked); DatabaseInUse at once (never waiting) if
    another process has it, DatabaseUnreachable if a database server cannot be reached. On PostgreSQL, `sharing`
    may let other daemons hold it too."""
    if is_postgresql(database_url):
        with _advisory_lock(database_url, sharing) as held:
            yield held
        return
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
            raise DatabaseInUse(database_url, str(path), _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield str(path)
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


def connect_postgresql(database_url: str, **extra: Any) -> Any:
    """A plain psycopg connection to `database_url` (autocommit); DatabaseUnreachable when that fails."""
    import psycopg

    params = postgresql_parameters(database_url)
    try:
        return psycopg.connect(autocommit=True, connect_timeout=10, **{**params, **extra})
    except psycopg.Error as exc:
        raise DatabaseUnreachable(database_url, str(exc).strip().splitlines()[0] if str(exc).strip() else
                                  type(exc).__name__) from None


def _take(connection: Any, sharing: Sharing) -> tuple[int, bool]:
    """The lock's key, and whether it (and the node's lock, when shared) was taken."""
    how = "pg_try_advisory_lock_shared" if sharing.shared else "pg_try_advisory_lock"
    key, taken = connection.execute(f"SELECT {LOCK_KEY}, {how}({LOCK_KEY})").fetchone()
    if taken and sharing.shared:
        return int(key), bool(connection.execute(f"SELECT pg_try_advisory_lock({NODE_KEY})",
                                                 (sharing.node,)).fetchone()[0])
    return int(key), bool(taken)


@contextmanager
def _advisory_lock(database_url: str, sharing: Sharing) -> Iterator[str]:
    connection = _lock_connection(database_url)
    try:
        key, taken = _take(connection, sharing)
        lock = f"advisory lock {key}"
        if not taken and sharing.shared and _holds_shared(connection, key):
            raise DatabaseInUse(database_url, f"node {sharing.node!r}", None,
                                "another daemon runs under this node name: give each its own cluster.node")
        if not taken:
            raise DatabaseInUse(database_url, lock, _holder_pid(connection, key), sharing.hint)
        keeper = _LockKeeper(database_url, connection, sharing)
        keeper.start()
        try:
            yield lock
        finally:
            keeper.stop()
            connection = keeper.connection
    finally:
        connection.close()  # the server releases the lock with the session


def _lock_connection(database_url: str) -> Any:
    # Keepalives: a connection dropped by a firewall or a failover is noticed, not held open as a ghost.
    return connect_postgresql(database_url, application_name=APPLICATION_NAME.format(pid=os.getpid()),
                              keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)


def _holds_shared(connection: Any, key: int) -> bool:
    """Whether this session holds the database's lock shared (so what was refused is its node's lock)."""
    return connection.execute(
        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() "
        "AND mode = 'ShareLock' AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s",
        (key,)).fetchone() is not None


def _holder_pid(connection: Any, key: int) -> int | None:
    """The pid the lock's holder named itself with, if it is an imgpipe."""
    holder = connection.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s", (key,)).fetchone()
    name = holder[0] if holder else ""
    return int(name.rsplit(" ", 1)[1]) if name.startswith("imgpipe pid ") else None


LOCK_CHECK_SECONDS = 5.0


class _LockKeeper(threading.Thread):
    """Looks at the lock's connection now and then: the server releases the lock if that connection is lost (a
    restart, a failover, an idle timeout), so it is taken again at once; if another process took it meanwhile,
    this one stops (SIGTERM, a clean stop) rather than share the log with it."""

    def __init__(self, database_url: str, connection: Any, sharing: Sharing) -> None:
        super().__init__(name="database-lock", daemon=True)
        self.database_url, self.connection, self.sharing = database_url, connection, sharing
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=2 * LOCK_CHECK_SECONDS)

    def run(self) -> None:
        while not self._stopped.wait(LOCK_CHECK_SECONDS):
            try:
                self.connection.execute("SELECT 1")
                continue
            except Exception:  # psycopg.OperationalError: the session, and with it the lock, is gone
                pass
            with contextlib.suppress(Exception):
                self.connection.close()
            try:
                connection = _lock_connection(self.database_url)
            except DatabaseUnreachable:
                continue  # the store pauses meanwhile; try again at the next look
            key, taken = _take(connection, self.sharing)
            self.connection = connection
            if taken:
                log.warning("database_lock_retaken", database=without_password(self.database_url))
                continue
            log.error("database_in_use", database=without_password(self.database_url),
                      message="another imgpipe process took the database while this one had lost its lock; stopping",
                      pid=_holder_pid(connection, key))
            os.kill(os.getpid(), signal.SIGTERM)
            return
