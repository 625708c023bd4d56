"""The event store: the one API through which the daemon appends to and reads the event log.

Stages, views and webhooks never choose threads, open transactions or wake anyone: they append, read, and commit
their results together with their tracking record. What differs between databases (connecting, the schema,
keeping positions in commit order, wake-ups from other processes) lives in one module per backend:
`eventlog.sqlite` and `eventlog.postgres`.

Every write runs on one thread (the writer) and every append is serialised in the database, so positions become
visible in commit order: a reader that has seen position N has seen every event before it. The most recent events
are also kept in memory as committed, so a consumer close behind the head reads its next page without SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, TypeVar

import peewee
import structlog

from daemon.diskspace import DiskSpace, is_disk_full
from daemon.eventlog.models import add_missing_columns, database, execute, insert_rows, placeholders
from daemon.eventlog.recent import RecentEvents, wanted
from daemon.events import Event, decode
from daemon.instance import is_postgresql, without_password

T = TypeVar("T")
RECENT_EVENTS = 10_000  # at least this many of the newest events are kept in memory
SCHEMA_VERSION = 2  # 1: the tables as imgpipe 0.1 made them, with no version row; 2: the version row
DECIDE_ATTEMPTS = 20
AWAY_RETRY_SECONDS = 2.0  # work paused for a lost database tries again at least this often

log = structlog.get_logger("eventlog")


class StreamConflict(Exception):
    """The stream was not at the expected version (for a new stream: it exists already)."""


class SchemaTooNew(Exception):
    """The database was written by a newer imgpipe; the message says which versions."""


class DatabaseAway(peewee.OperationalError):
    """The database server cannot be reached (a connection lost or refused). What was being written may or may not
    have been committed; the work waits for the server (`EventLog.reachable`) rather than failing."""


@dataclass(frozen=True)
class RecordedEvent:
    position: int
    stream: str
    version: int
    recorded_at: str
    event: Event

    @property
    def type(self) -> str:
        return self.event.type


@dataclass(frozen=True)
class Tracking:
    """A consumer's progress, committed with its results: the handled positions and the new low-water mark."""

    consumer: str
    checkpoint: int
    handled: tuple[int, ...]
    prune: bool = True  # False: no tracking row at or below the mark exists, so there is nothing to delete


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(at: str) -> float:
    """A time now_iso wrote (an event's recorded_at), as a Unix timestamp."""
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


# Told of another process's append: the log's newest position, and when known the append's first one and its types.
class OnHead(Protocol):
    def __call__(self, position: int, first: int = 0, types: frozenset[str] | None = None) -> None: ...


# The version before the rows an append inserted, and their positions: called once its transaction has ended.
Inserted = Callable[[], tuple[int, list[int]]]


def refused_unless(condition: str) -> str:
    """A SELECT that fails with a division by zero unless `condition` (an SQL boolean, never NULL) holds: it refuses
    a commit without a result to wait for, so it goes out with the commit's other statements (Backend.check)."""
    return f"SELECT 1 / ({condition})::integer"


class Backend(ABC):
    """What one kind of database does differently. Methods run on the store's threads unless said otherwise."""

    readers: ClassVar[int] = 2  # reader threads, each with its own connection

    def __init__(self, url: str) -> None:
        self.url = url
        self.safe_url = without_password(url)  # for logs: never the password
        self.db = self.connect()
        database.initialize(self.db)

    @abstractmethod
    def connect(self) -> peewee.Database:
        """The peewee database (not yet connected; each thread connects on first use)."""

    @abstractmethod
    def create_schema(self) -> None:
        """Create the log's tables if missing, or upgrade them; SchemaTooNew for a newer imgpipe's (writer)."""

    @abstractmethod
    def appending(self) -> AbstractContextManager[None]:
        """A write transaction whose appends commit in the order of their positions (writer)."""

    def lock(self) -> None:
        """In the appending transaction: hold the log's write lock from now until it ends (writer)."""

    @abstractmethod
    def insert_events(self, stream: str, expected_version: int | None,
                      rows: Sequence[tuple[str, str, str]]) -> Inserted:
        """Append (type, data, recorded_at) rows to `stream` after its newest version (StreamConflict if that is not
        `expected_version`, when given). Returns what gives the version before them and their positions, in order,
        once the transaction has ended: a backend may read them only then (writer)."""

    def save_tracking(self, tracking: Tracking) -> None:
        """In the appending transaction: record the handled positions above the checkpoint, forget those at or below
        it (unless there are none) and move the checkpoint (writer)."""
        consumer, checkpoint = tracking.consumer, tracking.checkpoint
        insert_rows("INSERT INTO tracking (consumer, position)",
                    [(consumer, p) for p in tracking.handled if p > checkpoint], " ON CONFLICT DO NOTHING")
        if tracking.prune:
            execute("DELETE FROM tracking WHERE consumer = ? AND position <= ?", (consumer, checkpoint))
        execute(SAVE_CHECKPOINT, (consumer, checkpoint))

    def announce(self, kinds: Iterable[str]) -> None:
        """(writer thread, in the appending transaction) What the events just inserted are (Event.announced_as), for the
        backend's announcement to other processes."""

    def check(self, sql: str, params: Sequence[Any], refusal: Callable[[], Exception | None]) -> None:
        """In the appending transaction: run `sql`, a statement that fails with a division by zero when the commit
        must not be made (`refused_unless`). The transaction then rolls back, and `refusal()` (which may read the
        database) is raised from the commit; when it returns None, the database's error is (writer)."""
        raise NotImplementedError("checks need PostgreSQL: only daemons that share a database make them")

    def snapshot(self) -> AbstractContextManager[Any]:
        """A read transaction that sees one moment of the database, for queries made of several statements."""
        return self.db.atomic()

    def watch(self, on_head: OnHead, on_connection: Callable[[str | None], None]) -> None:
        """Start calling `on_head(position)` (from any thread) when another process appends (with the append's first
        position and its events' types, `on_head(position, first, types)`, when the backend knows them), and
        `on_connection(reason)` when the watching connection is lost (`None` once it is back) (loop)."""

    def unwatch(self) -> None:
        """Stop watching (loop)."""

    def broken(self) -> bool:
        """Whether this thread's connection is lost, so the next job must connect again."""
        return False

    def lost(self, exc: Exception) -> bool:
        """Whether `exc`, just raised on this thread, means the server cannot be reached (not a bad statement)."""
        return False

    def ping(self) -> None:
        """Run a trivial statement on this thread's connection, if it has one (raises if it is gone)."""
        if not self.db.is_closed():
            execute("SELECT 1")

    def version_sql(self) -> str:
        return "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

    def stamp_version(self, existed: bool) -> None:
        """Record SCHEMA_VERSION, upgrading a database of version 1 in place (writer, in a transaction)."""
        execute(self.version_sql())
        row = execute("SELECT MAX(version) FROM schema_version").fetchone()
        found = row[0] if row and row[0] is not None else (1 if existed else 0)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(f"the database's schema is version {found}, written by a newer imgpipe; this one "
                               f"knows versions up to {SCHEMA_VERSION}: run that newer imgpipe, or another database")
        if found < SCHEMA_VERSION:
            execute("DELETE FROM schema_version")
            execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            if existed:
                log.info("schema_upgraded", from_version=found, to_version=SCHEMA_VERSION)


class EventLog:
    """Append and read events; wakes subscribed consumers after every append."""

    def __init__(self, backend: Backend, space: DiskSpace | None = None) -> None:
        self.backend = backend
        self.db = backend.db
        self.space = space or DiskSpace()  # the daemon's, which its consumers share (daemon.diskspace)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="eventlog-writer")
        self._readers = ThreadPoolExecutor(backend.readers, thread_name_prefix="eventlog-reader")
        self._subscribers: list[tuple[asyncio.Event, frozenset[str] | None, str | None]] = []
        self.head = 0
        self._head_lock = threading.Lock()
        self._closing = False
        # In the open transaction (writer thread): each append's stream, events, time and what gives its positions.
        self._appended: list[tuple[str, Sequence[Event], str, Inserted]] = []
        self._committed: deque[RecordedEvent] = deque()  # handed from the writer thread to the loop
        self._recent = RecentEvents(RECENT_EVENTS)  # (loop thread)
        self._remote_head = 0  # the newest position another process appended, as last heard (loop)
        self._fetching: asyncio.Task[None] | None = None  # reading another process's events into memory (loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._away: _Away | None = None  # the database found unreachable, until something reaches it again (loop)
        self._losses = 0  # connections found lost so far: each thread checks its own once after a new one
        self._thread = threading.local()

    # lifecycle -------------------------------------------------------------------------------
    async def open(self, view_tables: Iterable[type[peewee.Model]] = ()) -> None:
        self._loop = asyncio.get_running_loop()

        def create() -> int:
            with self.db.atomic():
                self.backend.create_schema()
                self.db.create_tables(list(view_tables), safe=True)
                if added := add_missing_columns(list(view_tables)):
                    log.info("view_columns_added", columns=added)
            return int(execute("SELECT MAX(position) FROM events").fetchone()[0] or 0)

        self.head = await self._on(self._writer, create)
        self._recent = RecentEvents(RECENT_EVENTS, end=self.head)
        self._closing = False
        self.backend.watch(self._other_process_appended, self._watcher_connection)

    async def close(self) -> None:
        """Close every thread's connection (peewee keeps one per thread), then the threads."""
        self.backend.unwatch()
        self._closing = True  # a look the watcher queued before it stopped starts no read now
        if self._fetching is not None:
            self._fetching.cancel()
            await asyncio.gather(self._fetching, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for pool, workers in ((self._writer, 1), (self._readers, self.backend.readers)):
            # The barrier holds each task until all have started, so each runs on a thread of its own.
            barrier = threading.Barrier(workers)

            def close_thread_connection(barrier: threading.Barrier = barrier) -> None:
                try:
                    self.db.close()
                except peewee.PeeweeException:  # a lost connection with its transaction still open
                    self.db.dispose()
                barrier.wait(timeout=10)

            await asyncio.gather(*(loop.run_in_executor(pool, close_thread_connection) for _ in range(workers)))
            pool.shutdown(wait=True)

    # threads ---------------------------------------------------------------------------------
    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(pool, self._guarded, fn, args)
        except DatabaseAway as exc:
            self._lost(str(exc))
            raise
        self._reached()
        return result

    def _guarded(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Run `fn` on this thread's connection; a connection found lost is dropped, so the next job connects anew,
        and the failure is raised as DatabaseAway."""
        losses = self._losses
        if getattr(self._thread, "losses", losses) != losses:
            # Another thread lost its connection since this one last ran: this one was likely cut too, and
            # finding out now, rather than halfway through a commit, spares a commit of unknown outcome.
            try:
                self.backend.ping()
            except Exception:
                self.db.dispose()
        self._thread.losses = losses
        try:
            return fn(*args)
        except Exception as exc:
            lost = self.backend.lost(exc)
            if self.backend.broken():
                self.db.dispose()
            if lost:
                self._losses += 1
                self._thread.losses = self._losses
                first_line = str(exc).strip().partition("\n")[0]
                raise DatabaseAway(first_line or type(exc).__name__) from exc
            raise

    # the database lost and back ----------------------------------------------------------------
    def _lost(self, reason: str) -> None:
        """(loop) The database could not be reached: logged once per episode."""
        if self._away is None:
            self._away = _Away()
            log.warning("database_connection_lost", database=self.backend.safe_url, reason=reason)
        self._away.failures += 1

    def _reached(self) -> None:
        """(loop) The database answered: an episode ends, and everything paused for it goes on."""
        away, self._away = self._away, None
        if away is not None:
            away.back.set()
            log.info("database_connection_back", database=self.backend.safe_url,
                     paused_s=round(time.monotonic() - away.since, 3), failures=away.failures)

    def _watcher_connection(self, reason: str | None) -> None:
        """(any thread) The backend's watching connection was lost (a reason) or is back (None)."""
        assert self._loop is not None
        if reason is None:
            self._loop.call_soon_threadsafe(self._reached)
        else:
            self._loop.call_soon_threadsafe(self._lost, reason)

    def reasons(self) -> list[str]:
        """Why the store is degraded, for /healthz; empty when it is not."""
        return ["database unreachable"] if self._away is not None else []

    async def reachable(self) -> None:
        """Wait until the database may be reachable again: it answered, or AWAY_RETRY_SECONDS went by."""
        away = self._away
        if away is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(away.back.wait(), AWAY_RETRY_SECONDS)

    async def query(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only `fn` (view queries) on a reader thread, off the event loop and beside the writer, in one
        read transaction: its statements see one moment, so a commit landing between them cannot show an image
        compressed beside a progress that does not count it yet."""
        return await self._on(self._readers, self._in_snapshot, fn, args)

    def _in_snapshot(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.backend.snapshot():
            return fn(*args)

    async def write_beside(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in a transaction of its own on a reader thread: writes outside the log that need no place in
        its order and must not queue behind its commits (claims on images and their leases)."""
        return await self._on(self._readers, self._in_transaction, fn, args)

    def _in_transaction(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self.db.atomic():
            return fn(*args)

    # subscribers -------------------------------------------------------------------------------
    def subscribe(self, types: frozenset[str] | None = None, wake: asyncio.Event | None = None,
                  addressee: str | None = None) -> asyncio.Event:
        """An event (`wake`, or a new one) set whenever events of `types` (None: any) are appended. Another
        process's appends are read only when someone here subscribes to their types, for their addressee (None:
        whatever the addressee, see Event.addressee)."""
        wake = wake or asyncio.Event()
        self._subscribers.append((wake, types, addressee))
        return wake

    def unsubscribe(self, wake: asyncio.Event) -> None:
        self._subscribers = [s for s in self._subscribers if s[0] is not wake]

    def _notify(self, types: Iterable[str] | None = None) -> None:
        """Wake the subscribers interested in `types` (None: everyone)."""
        appended = None if types is None else set(types)
        for wake, subscribed, _ in self._subscribers:
            if subscribed is None or appended is None or not subscribed.isdisjoint(appended):
                wake.set()

    def _other_process_appended(self, position: int, first: int = 0, types: frozenset[str] | None = None) -> None:
        """(any thread) Another process's append, `position` being the log's newest when the watcher looked (or the
        append's last, with its `first` position and its events' `types` when its notice names them): not compared
        with `head` here, since our own append may have passed another process's before the look (its events would
        then never be read); `_grown_to` compares with what memory holds."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._grown_to, position, first, types)

    def _grown_to(self, position: int, first: int = 0, types: frozenset[str] | None = None) -> None:
        """(loop) Another process appended up to `position`: its events are read once, into memory, and wake only
        the consumers of their types, who read them from there (not each with a query of its own: with several
        daemons on a database, every commit of one woke every consumer of the others). An append of types no
        consumer here reads is not read at all, only noted."""
        self._remote_head = max(self._remote_head, position)
        if self._closing:
            return
        self._drain()
        if position <= self._recent.end or self._reading():
            return
        if types is not None and not self._wanted(types) and self._recent.add_unread(first, position, types):
            self._move_head(position)
            return
        self._fetch()

    def _reading(self) -> asyncio.Task[None] | None:
        """(loop) The read of another process's events under way, if one is."""
        return self._fetching if self._fetching is not None and not self._fetching.done() else None

    def _fetch(self) -> None:
        """(loop) Read what memory lacks, unless a read is under way: it reads on until nothing is lacking."""
        if not self._closing and not self._reading():
            self._fetching = asyncio.create_task(self._fetch_remote(), name="eventlog-remote")

    def _wanted(self, types: frozenset[str]) -> bool:
        """Whether a consumer here reads events of any of `types`."""
        return any(wanted(types, subscribed, addressee) for _, subscribed, addressee in self._subscribers)

    def _drain(self) -> None:
        """(loop) Our own commits into memory; should one land beyond positions memory has not seen (another
        process's append, its notice still on the way), those are read now, once for every consumer."""
        committed = self._committed
        if committed:
            self._recent.add_own([committed.popleft() for _ in range(len(committed))])
            if self._recent.gap_end() > self._recent.end:
                self._fetch()

    async def _fetch_remote(self) -> None:
        while (target := max(self._remote_head, self._recent.gap_end())) > (after := self._recent.end):
            types: set[str] | None = None  # unknown: everyone looks
            if target - after <= RECENT_EVENTS:
                try:
                    records = await self._on(self._readers, self.read_after_sync, after, None, target - after)
                except DatabaseAway:
                    pass  # logged once by the store; the woken consumers find out too
                except Exception:
                    log.exception("remote_events_unread", after=after, head=target)
                else:
                    types = self._recent.add_read(records, target - after, target)
            if types is None:  # too far behind, or unread: consumers read the database themselves
                self._recent.skip_to(target)
            self._drain()
            self._move_head(self._recent.end)
            self._notify(types)

    # writing ---------------------------------------------------------------------------------
    def _append_sync(self, stream: str, events: Sequence[Event], expected_version: int | None = None) -> None:
        """Append inside the open appending transaction (writer thread)."""
        if events:
            at = now_iso()
            inserted = self.backend.insert_events(stream, expected_version, [(e.type, e.to_json(), at) for e in events])
            self.backend.announce(e.announced_as for e in events)
            self._appended.append((stream, events, at, inserted))

    def _write_sync(self, body: Callable[[], T]) -> tuple[T, int]:
        """Run `body` in an appending transaction; `head` moves only once it has committed. What `body` returned and
        the last position appended (the head when nothing was) (writer thread)."""
        self._appended = []
        try:
            with self.backend.appending():
                result = body()
            appended, last = [], self.head
            for stream, events, at, inserted in self._appended:
                current, positions = inserted()
                appended += [RecordedEvent(position, stream, current + 1 + i, at, event)
                             for i, (position, event) in enumerate(zip(positions, events, strict=True))]
                last = max(last, positions[-1])
        finally:
            self._appended = []
        # Before `head` moves, so a reader that sees the new head finds its events in memory.
        self._committed.extend(appended)
        self._move_head(last)
        return result, last

    def _move_head(self, position: int) -> None:
        """(writer thread or loop) `head` only ever moves forward: both move it, and a read-compare-write of one could
        otherwise land after the other's and move it back (consumers at the lost head would wait for the next
        event)."""
        with self._head_lock:
            self.head = max(self.head, position)

    async def _write(self, body: Callable[[], T], types: Iterable[str]) -> tuple[T, int]:
        try:
            result: tuple[T, int] = await self._on(self._writer, self._write_sync, body)
        except Exception as exc:
            if is_disk_full(exc):
                await self.space.hit("database", exc)
            raise
        self.space.fine("database")
        self._notify(types)
        return result

    async def append(self, stream: str, events: Sequence[Event], expected_version: int | None = None) -> int:
        """Append `events` to `stream` (at `expected_version`, when given: else StreamConflict); the last position."""
        _, last = await self._write(lambda: self._append_sync(stream, events, expected_version), {e.type for e in events})
        return last

    async def decide(self, stream: str, types: frozenset[str] | None,
                     decide: Callable[[list[RecordedEvent]], tuple[Sequence[Event], T]]) -> tuple[int, T]:
        """Read `stream` (its events of `types`; None: all), let `decide` say what to append and what to return, and
        append it unless events of `types` were appended after those read, else decide again: events `decide` does
        not read cannot change its decision (a busy request's image events do not hold up its cancellation). The last
        position (the head when nothing was appended) and what `decide` returned."""
        for _ in range(DECIDE_ATTEMPTS):
            # The version and the events from one snapshot of the database (memory may lag a commit).
            version, records = await self.query(self._stream_at_version_sync, stream, types)
            events, result = decide(records)
            if not events:
                return self.head, result
            try:
                _, last = await self._write(lambda: self._append_unmoved_sync(stream, events, version, types),
                                            {e.type for e in events})
                return last, result
            except StreamConflict:
                continue
        raise StreamConflict(f"stream {stream} kept moving while a command was decided on it")

    def _append_unmoved_sync(self, stream: str, events: Sequence[Event], version: int,
                             types: frozenset[str] | None) -> None:
        """Append `events` unless `stream` has events of `types` after `version` (StreamConflict) (writer)."""
        if types is None:
            self._append_sync(stream, events, expected_version=version)
            return
        self.backend.lock()  # nothing of `types` can land between this look and the append
        wanted = sorted(types)
        if execute(f"SELECT 1 FROM events WHERE stream = ? AND version > ? AND type IN ({placeholders(len(wanted))}) "
                   "LIMIT 1", (stream, version, *wanted)).fetchone():
            raise StreamConflict(f"stream {stream} has events of {', '.join(wanted)} after version {version}")
        self._append_sync(stream, events)

    async def commit(self, results: Sequence[tuple[str, Sequence[Event]]], tracking: Tracking | None = None,
                     apply: Callable[[], None] | None = None, verify: bool = False) -> bool:
        """Append each (stream, events) of `results`, run `apply` (a view's own table writes) and record `tracking`,
        all in one transaction. With `verify` (the last try's outcome is unknown: its connection was lost), a commit
        whose tracking record is already there is not made again. False when it was not made for that reason."""
        results = _runs(results)

        def body() -> bool:
            if verify and (self._tracked_sync(tracking) if tracking is not None and tracking.handled
                           else self._appended_already_sync(results)):
                return False
            for stream, events in results:
                self._append_sync(stream, events)
            if apply is not None:
                apply()
            if tracking is not None:
                self.backend.save_tracking(tracking)
            return True

        made, _ = await self._write(body, {e.type for _, events in results for e in events})
        return made

    # reading ---------------------------------------------------------------------------------
    async def read_after(self, position: int, types: frozenset[str] | None, limit: int,
                         addressee: str | None = None) -> list[RecordedEvent]:
        """Up to `limit` events of `types` (None: any) after `position`, in log order; from memory when it reaches.
        A reader for one `addressee` may get other events too, never fewer."""
        recent = self.read_recent(position, types, limit, addressee)
        if recent is None and (reading := self._reading()) is not None:
            await asyncio.wait([reading])  # memory is being brought up to the head: one query for all
            recent = self.read_recent(position, types, limit, addressee)
        if recent is not None:
            return recent
        return await self._on(self._readers, self.read_after_sync, position, types, limit)

    def read_after_sync(self, position: int, types: frozenset[str] | None, limit: int) -> list[RecordedEvent]:
        if types is None:
            rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                           (position, limit))
        else:
            wanted = sorted(types)  # one statement text per follower, so the statement cache keeps it
            rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? AND type IN "
                           f"({placeholders(len(wanted))}) ORDER BY position LIMIT ?", (position, *wanted, limit))
        return [_recorded(*row) for row in rows]

    async def read_stream(self, stream: str, types: frozenset[str] | None = None) -> list[RecordedEvent]:
        """The events of `stream` (of `types`; None: all), in order."""
        recent = self.read_stream_recent(stream)
        if recent is not None:
            return recent if types is None else [r for r in recent if r.type in types]
        return await self._on(self._readers, self.read_stream_sync, stream, types)

    def read_stream_sync(self, stream: str, types: frozenset[str] | None = None) -> list[RecordedEvent]:
        wanted = sorted(types) if types is not None else []
        only = f" AND type IN ({placeholders(len(wanted))})" if types is not None else ""
        rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ?{only} ORDER BY version",
                       (stream, *wanted))
        return [_recorded(*row) for row in rows]

    def _stream_at_version_sync(self, stream: str, types: frozenset[str] | None) -> tuple[int, list[RecordedEvent]]:
        return stream_version(stream), self.read_stream_sync(stream, types)

    def read_recent(self, position: int, types: frozenset[str] | None, limit: int,
                    addressee: str | None = None) -> list[RecordedEvent] | None:
        """What `read_after_sync` would return (for `addressee`), from memory; None when memory cannot tell (loop
        thread)."""
        self._drain()
        return self._recent.page(position, types, limit, self.head, addressee)

    def read_stream_recent(self, stream: str) -> list[RecordedEvent] | None:
        """What `read_stream_sync` would return, from memory; None unless memory holds the stream from its
        first event (loop thread)."""
        self._drain()
        return self._recent.stream(stream, self.head)

    # consumer bookkeeping ----------------------------------------------------------------------
    async def load_tracking(self, consumer: str) -> tuple[int, set[int]]:
        """A consumer's checkpoint and the positions above it that it has handled."""
        def load() -> tuple[int, set[int]]:
            row = execute("SELECT position FROM checkpoints WHERE consumer = ?", (consumer,)).fetchone()
            checkpoint = int(row[0]) if row else 0
            done = {int(p) for p, in execute("SELECT position FROM tracking WHERE consumer = ? AND position > ?",
                                             (consumer, checkpoint))}
            return checkpoint, done

        return await self._on(self._readers, load)

    @staticmethod
    def _tracked_sync(tracking: Tracking) -> bool:
        """Whether `tracking` was committed already (writer thread)."""
        row = execute("SELECT position FROM checkpoints WHERE consumer = ?", (tracking.consumer,)).fetchone()
        if row and int(row[0]) >= max(tracking.handled):
            return True
        last = max(tracking.handled)
        return execute("SELECT 1 FROM tracking WHERE consumer = ? AND position = ?",
                       (tracking.consumer, last)).fetchone() is not None

    @staticmethod
    def _appended_already_sync(results: Sequence[tuple[str, Sequence[Event]]]) -> bool:
        """Whether each stream already ends with the events about to be appended to it: a commit with no tracking
        record (interim attempts, which carry their attempt numbers, so never repeat by right) that landed (writer)."""
        for stream, events in results:
            if not events:
                continue
            rows = execute("SELECT type, data FROM events WHERE stream = ? ORDER BY version DESC LIMIT ?",
                           (stream, len(events))).fetchall()
            if [(e.type, e.to_json()) for e in reversed(events)] != [tuple(row) for row in rows]:
                return False
        return any(events for _, events in results)

    async def reset_views(self, tables: Sequence[type[peewee.Model]], consumers: Iterable[str]) -> None:
        """Drop and recreate the views' `tables` and forget `consumers`' progress, in one transaction (replay)."""
        def reset() -> None:
            self.db.drop_tables(list(tables))
            self.db.create_tables(list(tables))
            for consumer in consumers:
                execute("DELETE FROM tracking WHERE consumer = ?", (consumer,))
                execute("DELETE FROM checkpoints WHERE consumer = ?", (consumer,))

        await self._write(reset, ())

    async def purge_deleted(self, low_water: int) -> int:
        """Remove the events of deleted streams but their RequestDeleted, where all of them are at or below
        `low_water`, the lowest checkpoint of every consumer: no consumer reads them again. How many were removed."""
        def purge() -> int:
            streams = [stream for stream, in execute(
                "SELECT stream FROM events WHERE stream IN (SELECT stream FROM events WHERE type = 'RequestDeleted') "
                "GROUP BY stream HAVING COUNT(*) > 1 AND MAX(position) <= ?", (low_water,)).fetchall()]
            # Counted from RETURNING: a cursor's rowcount is not known yet in psycopg's pipeline mode.
            return sum(len(execute("DELETE FROM events WHERE stream = ? AND type != 'RequestDeleted' RETURNING 1",
                                   (stream,)).fetchall()) for stream in streams)

        purged, _ = await self._write(purge, ())
        return purged


def _runs(results: Sequence[tuple[str, Sequence[Event]]]) -> list[tuple[str, Sequence[Event]]]:
    """`results` with each run of results on one stream joined (a page of one request's images): one append each."""
    runs: list[tuple[str, list[Event]]] = []
    for stream, events in results:
        if runs and runs[-1][0] == stream:
            runs[-1][1].extend(events)
        elif events:
            runs.append((stream, list(events)))
    return list(runs)


@dataclass
class _Away:
    """The database found unreachable: since when, how many operations failed, and set once it answers again."""

    since: float = field(default_factory=time.monotonic)
    failures: int = 0
    back: asyncio.Event = field(default_factory=asyncio.Event)


EVENT_COLUMNS = "position, stream, version, recorded_at, type, data"
SAVE_CHECKPOINT = ("INSERT INTO checkpoints (consumer, position) VALUES (?, ?) "
                   "ON CONFLICT (consumer) DO UPDATE SET position = excluded.position")
# The newest row by the (stream, version) index, not MAX(): PostgreSQL, until it has analysed a new table, would scan
# every event of the stream for MAX, a cost growing with the square of a request's size.
STREAM_VERSION = "SELECT version FROM events WHERE stream = ? ORDER BY version DESC LIMIT 1"


def stream_version(stream: str) -> int:
    """The newest version of `stream`, 0 if it has no events (this thread's connection)."""
    row = execute(STREAM_VERSION, (stream,)).fetchone()
    return int(row[0]) if row else 0


def conflict(stream: str, current: int, expected: int) -> StreamConflict:
    return StreamConflict(f"stream {stream} is at version {current}, expected {expected}")


def _recorded(position: int, stream: str, version: int, recorded_at: str, type_: str, data: str) -> RecordedEvent:
    return RecordedEvent(position=position, stream=stream, version=version, recorded_at=recorded_at,
                         event=decode(type_, data))


def open_store(url: str, space: DiskSpace | None = None, sqlite_synchronous: str = "normal") -> EventLog:
    """The store for a peewee database URL: PostgreSQL for postgres(ql)://, else SQLite (with its durability)."""
    backend: Backend
    if is_postgresql(url):
        from daemon.eventlog.postgres import PostgresBackend
        backend = PostgresBackend(url)
    else:
        from daemon.eventlog.sqlite import SqliteBackend
        backend = SqliteBackend(url, sqlite_synchronous)
    return EventLog(backend, space)
