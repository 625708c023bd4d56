"""The append-only event store. The only code that reads or writes the events table.

All writes go through one thread (the writer), so positions are committed in order and a reader
that has seen position N has seen every event before it.

The most recent events are also kept in memory, as committed: a consumer close behind the head (the usual
case) reads its next page from there, without a trip to the writer thread, SQL or JSON decoding.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import peewee
from playhouse.db_url import connect

from daemon.diskspace import DiskSpace, is_disk_full
from daemon.eventlog.models import (
    LOG_TABLES,
    Checkpoint,
    StoredEvent,
    Tracking,
    database,
    execute,
    insert_rows,
    placeholders,
)
from daemon.events import Event, decode

T = TypeVar("T")
READERS = 2
RECENT_EVENTS = 10_000  # at least this many of the newest events are kept in memory


class StreamConflict(Exception):
    """The stream was not at the expected version (for a new stream: it exists already)."""


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


def open_database(url: str) -> peewee.Database:
    """Connect by peewee database URL; SQLite gets WAL and the durability we document."""
    db: peewee.Database
    if url.startswith("sqlite"):
        # WAL + synchronous=NORMAL: a commit survives a killed process (the kill -9 case);
        # only an OS crash or power cut can lose the last commits. FULL would fsync every commit.
        db = connect(url, pragmas={
            "journal_mode": "wal",
            "synchronous": "normal",
            "busy_timeout": 10_000,
            "foreign_keys": 1,
        })
    else:
        db = connect(url)
    database.initialize(db)
    return db


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    """Append and read events; wakes subscribed consumers after every append."""

    def __init__(self, db: peewee.Database, space: DiskSpace | None = None) -> None:
        self.db = db
        self.space = space or DiskSpace()  # the daemon's, which its consumers share (daemon.diskspace)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="eventlog-writer")
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="eventlog-reader")
        self._subscribers: list[tuple[asyncio.Event, frozenset[str] | None]] = []
        self.head = 0
        self._appended_head = 0
        # Positions are known at append time only where SQLite assigns them (the last rowid).
        self._keeps_recent = isinstance(db, peewee.SqliteDatabase)
        self._appended: list[RecordedEvent] = []  # in the open transaction (writer thread)
        self._committed: deque[RecordedEvent] = deque()  # handed from the writer thread to the loop
        self._recent: list[RecordedEvent] = []  # consecutive positions, newest last (loop thread)

    # lifecycle -------------------------------------------------------------------------------
    async def open(self, extra_tables: Iterable[type[peewee.Model]] = ()) -> None:
        def create() -> int:
            self.db.create_tables([*LOG_TABLES, *extra_tables], safe=True)
            return StoredEvent.select(peewee.fn.MAX(StoredEvent.position)).scalar() or 0

        self.head = await self.write(create)

    async def close(self) -> None:
        """Close every thread's connection (peewee keeps one per thread), then the threads."""
        loop = asyncio.get_running_loop()
        for pool, workers in ((self._writer, 1), (self._readers, READERS)):
            # The barrier holds each task until all have started, so each runs on a thread of its own.
            barrier = threading.Barrier(workers)

            def close_thread_connection(barrier: threading.Barrier = barrier) -> None:
                self.db.close()
                barrier.wait(timeout=10)

            await asyncio.gather(*(loop.run_in_executor(pool, close_thread_connection) for _ in range(workers)))
            pool.shutdown(wait=True)

    # threads ---------------------------------------------------------------------------------
    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the writer thread (every write, and reads that must see the newest)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only `fn` on a reader thread, off the event loop and beside the writer."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction (writer thread); `head` moves only once it has committed."""
        atomic = self.db.atomic("IMMEDIATE") if isinstance(self.db, peewee.SqliteDatabase) else self.db.atomic()
        self._appended_head = self.head
        self._appended = []
        with atomic:
            yield
        # Before `head` moves, so a reader that sees the new head finds its events in memory.
        self._committed.extend(self._appended)
        self._appended = []
        self.head = max(self.head, self._appended_head)

    # subscribers -------------------------------------------------------------------------------
    def subscribe(self, types: frozenset[str] | None = None) -> asyncio.Event:
        """An event set whenever events of `types` (None: any) are appended."""
        wake = asyncio.Event()
        self._subscribers.append((wake, types))
        return wake

    def unsubscribe(self, wake: asyncio.Event) -> None:
        self._subscribers = [(w, t) for w, t in self._subscribers if w is not wake]

    def notify(self, types: Iterable[str] | None = None) -> None:
        """Wake the subscribers interested in `types` (None: everyone)."""
        appended = None if types is None else set(types)
        for wake, wanted in self._subscribers:
            if wanted is None or appended is None or not wanted.isdisjoint(appended):
                wake.set()

    # events ----------------------------------------------------------------------------------
    def append_sync(self, stream: str, events: Sequence[Event], expected_version: int | None = None) -> int:
        """Append to `stream` inside the caller's `transaction()`; returns the last position (writer thread)."""
        if not events:
            return self.head
        current = execute("SELECT MAX(version) FROM events WHERE stream = ?", (stream,)).fetchone()[0] or 0
        if expected_version is not None and current != expected_version:
            raise StreamConflict(f"stream {stream} is at version {current}, expected {expected_version}")
        at = now_iso()
        rows = [(stream, current + i, e.type, e.to_json(), at) for i, e in enumerate(events, start=1)]
        cursor = insert_rows("INSERT INTO events (stream, version, type, data, recorded_at)", rows)
        # SQLite's last rowid is the last position; other databases are asked.
        last = int(cursor.lastrowid if self._keeps_recent else execute("SELECT MAX(position) FROM events").fetchone()[0])
        self._appended_head = max(self._appended_head, last)
        if self._keeps_recent:
            # One writer in an IMMEDIATE transaction: the rows got consecutive positions ending at `last`.
            first = last - len(events) + 1
            self._appended.extend(RecordedEvent(first + i, stream, current + 1 + i, at, event)
                                  for i, event in enumerate(events))
        return last

    async def append(self, stream: str, events: Sequence[Event], expected_version: int | None = None) -> int:
        def run() -> int:
            with self.transaction():
                return self.append_sync(stream, events, expected_version)

        try:
            position = await self.write(run)
        except Exception as exc:
            if is_disk_full(exc):
                await self.space.hit("database", exc)
            raise
        self.space.fine("database")
        self.notify(e.type for e in events)
        return position

    def read_after_sync(self, position: int, types: frozenset[str] | None, limit: int) -> list[RecordedEvent]:
        if types is None:
            rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                           (position, limit))
        else:
            wanted = sorted(types)  # one statement text per follower, so SQLite's statement cache keeps it
            rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? AND type IN "
                           f"({placeholders(len(wanted))}) ORDER BY position LIMIT ?", (position, *wanted, limit))
        return [_recorded(*row) for row in rows]

    def _recent_to_head(self) -> list[RecordedEvent] | None:
        """The events in memory, oldest first, once they reach the head; None if they do not (loop thread)."""
        recent = self._recent
        committed = self._committed
        while committed:
            record = committed.popleft()
            if recent and record.position != recent[-1].position + 1:
                recent.clear()  # a gap (positions not known here): start again from this one
            recent.append(record)
        if len(recent) > 2 * RECENT_EVENTS:
            del recent[:-RECENT_EVENTS]
        return recent if recent and recent[-1].position >= self.head else None

    def read_recent(self, position: int, types: frozenset[str] | None, limit: int) -> list[RecordedEvent] | None:
        """What `read_after_sync` would return, from memory; None when memory does not reach back that far
        (loop thread)."""
        recent = self._recent_to_head()
        if recent is None or recent[0].position > position + 1:
            return None
        page: list[RecordedEvent] = []
        for i in range(max(0, position + 1 - recent[0].position), len(recent)):
            record = recent[i]
            if types is None or record.event.type in types:
                page.append(record)
                if len(page) == limit:
                    break
        return page

    def read_stream_recent(self, stream: str) -> list[RecordedEvent] | None:
        """What `read_stream_sync` would return, from memory; None unless memory holds the stream from its
        first event (loop thread)."""
        recent = self._recent_to_head()
        if recent is None:
            return None
        records = [r for r in recent if r.stream == stream]
        return records if records and records[0].version == 1 else None

    def read_stream_sync(self, stream: str, types: frozenset[str] | None = None) -> list[RecordedEvent]:
        wanted = sorted(types) if types is not None else []
        only = f" AND type IN ({placeholders(len(wanted))})" if types is not None else ""
        rows = execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ?{only} ORDER BY version",
                       (stream, *wanted))
        return [_recorded(*row) for row in rows]

    async def read_stream(self, stream: str) -> list[RecordedEvent]:
        recent = self.read_stream_recent(stream)
        return recent if recent is not None else await self.read(self.read_stream_sync, stream)

    # consumer bookkeeping ----------------------------------------------------------------------
    def load_tracking_sync(self, consumer: str) -> tuple[int, set[int]]:
        row = Checkpoint.get_or_none(Checkpoint.consumer == consumer)
        checkpoint = row.position if row else 0
        done = {t.position for t in Tracking.select().where(
            (Tracking.consumer == consumer) & (Tracking.position > checkpoint))}
        return checkpoint, done

    def save_tracking_sync(self, consumer: str, checkpoint: int, handled: Iterable[int], prune: bool = True) -> None:
        """Record handled positions and the new low-water mark, in the caller's transaction.

        `prune=False` says no tracking row at or below the mark exists, so there is nothing to delete.
        """
        insert_rows("INSERT INTO tracking (consumer, position)", [(consumer, p) for p in handled if p > checkpoint],
                    " ON CONFLICT DO NOTHING")
        if prune:
            execute("DELETE FROM tracking WHERE consumer = ? AND position <= ?", (consumer, checkpoint))
        execute("INSERT INTO checkpoints (consumer, position) VALUES (?, ?) "
                "ON CONFLICT (consumer) DO UPDATE SET position = excluded.position", (consumer, checkpoint))

    def purge_deleted_sync(self, low_water: int) -> int:
        """Remove the events of deleted streams but their RequestDeleted, where all of them are at or below
        `low_water`, the lowest checkpoint of every consumer: no consumer reads them again. How many were removed
        (writer thread)."""
        streams = [stream for stream, in execute(
            "SELECT stream FROM events WHERE stream IN (SELECT stream FROM events WHERE type = 'RequestDeleted') "
            "GROUP BY stream HAVING COUNT(*) > 1 AND MAX(position) <= ?", (low_water,)).fetchall()]
        removed = 0
        with self.transaction():
            for stream in streams:
                removed += execute("DELETE FROM events WHERE stream = ? AND type != 'RequestDeleted'",
                                   (stream,)).rowcount
        return removed

    def reset_consumer_sync(self, consumer: str) -> None:
        Tracking.delete().where(Tracking.consumer == consumer).execute()
        Checkpoint.delete().where(Checkpoint.consumer == consumer).execute()


EVENT_COLUMNS = "position, stream, version, recorded_at, type, data"


def _recorded(position: int, stream: str, version: int, recorded_at: str, type_: str, data: str) -> RecordedEvent:
    return RecordedEvent(position=position, stream=stream, version=version, recorded_at=recorded_at,
                         event=decode(type_, data))

