"""The PostgreSQL backend: the log on a server that many machines can share.

- Positions come from an identity column. Two transactions could take positions 7 and 8 and commit 8 first, and a
  reader that saw 8 would skip 7 for ever: so a transaction takes one transaction-level advisory lock before its
  first append, and appends commit one after the other, in position order. It costs what SQLite's single writer
  costs anyway: appends do not run in parallel. Readers never wait for it, nor do transactions that only write
  views and checkpoints.
- Wake-ups: each appending transaction sends one NOTIFY, after its last INSERT; its payload names the sending store,
  the newest position, how many events the transaction appended and their types (never rows: payloads are capped
  near 8 KB). A thread LISTENs on a connection of its own and passes on what other stores announce (a store with
  no consumer of those types need not read them), and reads the head once a second as well, since a connection
  pooler in transaction mode drops LISTEN.
- A lost connection: the store drops it (the next job connects again) and pauses the work until the server
  answers; the LISTEN thread reconnects every RECONNECT_SECONDS and says when it is back.
- Connections: one per store thread (a writer and `readers` readers), one for LISTEN, one for the instance lock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import peewee
import psycopg
from psycopg.pq import TransactionStatus

from daemon.eventlog.models import ROWS_PER_INSERT, execute, sqlstate
from daemon.eventlog.store import SAVE_CHECKPOINT, STREAM_VERSION, Backend, Inserted, OnHead, Tracking, conflict
from daemon.instance import DatabaseUnreachable, connect_postgresql, postgresql_parameters

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "stream VARCHAR(64) NOT NULL, version INTEGER NOT NULL, type VARCHAR(64) NOT NULL, data TEXT NOT NULL, "
    "recorded_at VARCHAR(40) NOT NULL, UNIQUE (stream, version))",
    "CREATE INDEX IF NOT EXISTS events_type_position ON events (type, position)",
    "CREATE TABLE IF NOT EXISTS checkpoints (consumer VARCHAR(64) PRIMARY KEY, position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tracking (consumer VARCHAR(64) NOT NULL, position BIGINT NOT NULL, "
    "PRIMARY KEY (consumer, position))",
)
# Per database and schema, like everything of one log.
LOG_KEY = "'imgpipe-log/' || current_database() || '/' || current_schema()"
POLL_SECONDS = 1.0
RAISED_AS_PEEWEE: AbstractContextManager[None] = getattr(peewee, "__exception_wrapper__")  # driver errors as peewee's
RECONNECT_SECONDS = 1.0
DIVISION_BY_ZERO = "22012"  # the SQLSTATE of a failed check (store.refused_unless)


class PostgresBackend(Backend):
    readers: ClassVar[int] = 2

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._lock_key: int | None = None
        self._channel = ""
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._locked = False  # the appending transaction holds the log's lock (writer thread)
        self._appended: dict[str, int] = {}  # the appending transaction's events: how many of each kind (writer)
        # The appending transaction's checks (writer thread): each one's cursor and what to raise if it failed.
        self._checks: list[tuple[Any, Callable[[], Exception | None]]] = []
        self.sender = uuid.uuid4().hex  # the NOTIFY payload of this store's appends

    def connect(self) -> peewee.Database:
        params = postgresql_parameters(self.url)
        name = params.pop("dbname")
        return peewee.PostgresqlDatabase(name, prefer_psycopg3=True, connect_timeout=10, **params)

    def create_schema(self) -> None:
        existed = execute("SELECT to_regclass('events') IS NOT NULL").fetchone()[0]
        for statement in SCHEMA:
            execute(statement)
        self.stamp_version(bool(existed))
        self._keys()

    def _keys(self) -> tuple[int, str]:
        if self._lock_key is None:
            key, channel = execute(f"SELECT hashtextextended({LOG_KEY}, 0), "
                                   f"'imgpipe_' || to_hex(hashtextextended({LOG_KEY}, 1))").fetchone()
            self._lock_key, self._channel = int(key), str(channel)
        return self._lock_key, self._channel

    @contextmanager
    def appending(self) -> Iterator[None]:
        # In psycopg's pipeline mode, statements whose results nobody reads before COMMIT go out together: BEGIN,
        # the lock, the INSERTs (their RETURNING is read after COMMIT), the checks (which fail the transaction rather
        # than answer), view and checkpoint writes, COMMIT. A commit takes one round trip, not one per statement.
        # Errors arrive at the next read or at the end, raised as peewee's like all others.
        self._locked = False
        self._checks = []
        self._appended = {}
        connection: psycopg.Connection[Any] = self.db.connection()  # type: ignore[no-untyped-call]
        try:
            try:
                with RAISED_AS_PEEWEE, connection.pipeline(), self.db.atomic():
                    yield
                    if self._locked:
                        # Sent at COMMIT. While the lock is held nobody else appends: the newest position is ours,
                        # and so are the ones before it, as many as we appended.
                        execute("SELECT pg_notify(?, ? || ' ' || (SELECT MAX(position) FROM events) || ?)",
                                (self._keys()[1], self.sender,
                                 f" {sum(self._appended.values())} {','.join(sorted(self._appended))}"))
            finally:
                if not connection.closed and connection.info.transaction_status != TransactionStatus.IDLE:
                    # A failed statement aborts the rest of its pipeline, the ROLLBACK that followed it included.
                    with contextlib.suppress(psycopg.Error):
                        connection.rollback()
        except Exception as exc:
            refusal = self._refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc

    def save_tracking(self, tracking: Tracking) -> None:
        # One statement rather than three: the handled positions and the pruning in a data-modifying WITH.
        consumer, checkpoint = tracking.consumer, tracking.checkpoint
        handled = [p for p in tracking.handled if p > checkpoint]
        parts: list[str] = []
        params: list[Any] = []
        if handled:
            parts.append("handled AS (INSERT INTO tracking (consumer, position) SELECT ?, unnest(?::bigint[]) "
                         "ON CONFLICT DO NOTHING)")
            params += [consumer, handled]
        if tracking.prune:
            parts.append("pruned AS (DELETE FROM tracking WHERE consumer = ? AND position <= ?)")
            params += [consumer, checkpoint]
        execute(f"WITH {', '.join(parts)} {SAVE_CHECKPOINT}" if parts else SAVE_CHECKPOINT, [*params, consumer, checkpoint])

    def announce(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            if "," in kind or not kind.isprintable() or " " in kind:  # a node name the payload cannot carry
                kind = kind.partition("@")[0]
            self._appended[kind] = self._appended.get(kind, 0) + 1

    def check(self, sql: str, params: Sequence[Any], refusal: Callable[[], Exception | None]) -> None:
        self._checks.append((execute(sql, params), refusal))

    def _refusal(self, exc: Exception) -> Exception | None:
        """(after the rollback) What the check that failed the transaction raises, if a check did."""
        if sqlstate(exc) != DIVISION_BY_ZERO:
            return None
        for cursor, refusal in self._checks:
            # The failed one has no result; those before it have theirs, those after it were skipped.
            if cursor.pgresult is None:
                return refusal()
        return None

    def lock(self) -> None:
        if not self._locked:
            # Before the transaction draws its first position, held until COMMIT (see the module's docstring).
            execute("SELECT pg_advisory_xact_lock(?)", (self._keys()[0],))
            self._locked = True

    def insert_events(self, stream: str, expected_version: int | None,
                      rows: Sequence[tuple[str, str, str]]) -> Inserted:
        self.lock()
        cursors: list[Any] = []
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start:start + ROWS_PER_INSERT]
            values = ", ".join(["(?::integer, ?, ?, ?)"] * len(chunk))
            # The stream's version read and the rows inserted in one statement, which reads no answer back.
            cursors.append(execute(
                "INSERT INTO events (stream, version, type, data, recorded_at) "
                "SELECT ?, newest.version + r.n, r.type, r.data, r.recorded_at FROM (SELECT COALESCE(("
                f"{STREAM_VERSION}), 0) AS version) AS newest, (VALUES {values}) AS r (n, type, data, recorded_at) "
                "ORDER BY r.n RETURNING version, position",
                [stream, stream, *(v for n, row in enumerate(chunk, start=1) for v in (n, *row))]))

        @functools.cache
        def inserted() -> tuple[int, list[int]]:
            found = sorted((int(v), int(p)) for cursor in cursors for v, p in cursor.fetchall())
            return found[0][0] - 1, [p for _, p in found]

        if expected_version is not None:
            current = inserted()[0]  # read now, a round trip: a conflict must roll this transaction back
            if current != expected_version:
                raise conflict(stream, current, expected_version)
        return inserted

    def snapshot(self) -> AbstractContextManager[Any]:
        # READ COMMITTED, the default, gives each statement its own moment.
        return self.db.atomic(isolation_level="REPEATABLE READ")

    def broken(self) -> bool:
        return not self.db.is_closed() and not self.db.is_connection_usable()

    def lost(self, exc: Exception) -> bool:
        # A connection error leaves no usable connection behind; a bad statement leaves it usable, or rolled back.
        return isinstance(exc, peewee.OperationalError | peewee.InterfaceError) and (
            self.db.is_closed() or not self.db.is_connection_usable())

    # wake-ups from other processes -----------------------------------------------------------------
    def watch(self, on_head: OnHead, on_connection: Callable[[str | None], None]) -> None:
        self._stopped.clear()
        self._watcher = threading.Thread(target=self._watch, args=(on_head, on_connection), name="eventlog-listen",
                                         daemon=True)
        self._watcher.start()

    def unwatch(self) -> None:
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5 * POLL_SECONDS)
            self._watcher = None

    def _watch(self, on_head: OnHead, on_connection: Callable[[str | None], None]) -> None:
        """(thread) LISTEN, and poll the head between notifications; reconnect after a lost connection, which
        `on_connection` hears of (the store logs it and pauses its work until the server is back)."""
        _, channel = self._keys()
        lost = False
        while not self._stopped.is_set():
            try:
                connection = connect_postgresql(self.url, application_name="imgpipe listen")
            except DatabaseUnreachable as exc:
                if not lost:
                    on_connection(str(exc.details["reason"]))
                    lost = True
                self._stopped.wait(RECONNECT_SECONDS)
                continue
            if lost:
                on_connection(None)
                lost = False
            try:
                with connection:
                    connection.execute(f"LISTEN {channel}")
                    while not self._stopped.is_set():
                        head = connection.execute("SELECT MAX(position) FROM events").fetchone()[0]
                        if head:
                            on_head(int(head))
                        self._hear(connection, on_head)
            except Exception as exc:  # psycopg.OperationalError and the like: the connection is gone
                if not self._stopped.is_set():
                    on_connection(str(exc).strip().partition("\n")[0] or type(exc).__name__)
                    lost = True
                    self._stopped.wait(RECONNECT_SECONDS)

    def _hear(self, connection: psycopg.Connection[Any], on_head: OnHead) -> None:
        """(thread) Pass on the appends other stores announce, for POLL_SECONDS or until a notice names no position
        (an older imgpipe's): then the caller reads the head. One generator for the whole wait: this store's own
        notices (one per commit) cost a comparison each."""
        for notify in connection.notifies(timeout=POLL_SECONDS):
            sender, _, rest = notify.payload.partition(" ")
            if sender == self.sender:
                continue
            position, _, rest = rest.partition(" ")
            if not position.isdigit():
                return
            count, _, types = rest.partition(" ")
            if count.isdigit() and int(count) > 0 and types:
                on_head(int(position), int(position) - int(count) + 1, frozenset(types.split(",")))
            else:  # an older imgpipe's notice: the position only
                on_head(int(position))
            if self._stopped.is_set():
                return
