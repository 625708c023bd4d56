"""The SQLite backend: one file, WAL, appends in IMMEDIATE transactions, positions from AUTOINCREMENT rowids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import peewee
from playhouse.db_url import connect

from daemon.eventlog.models import execute, insert_rows
from daemon.eventlog.store import Backend, Inserted, conflict, stream_version

SCHEMA = (
    # AUTOINCREMENT: positions are never reused (also after the newest rows are deleted), so a checkpoint can never
    # skip a later event.
    'CREATE TABLE IF NOT EXISTS "events" ("position" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, '
    '"stream" VARCHAR(64) NOT NULL, "version" INTEGER NOT NULL, "type" VARCHAR(64) NOT NULL, "data" TEXT NOT NULL, '
    '"recorded_at" VARCHAR(40) NOT NULL)',
    'CREATE INDEX IF NOT EXISTS "events_type" ON "events" ("type")',
    'CREATE UNIQUE INDEX IF NOT EXISTS "events_stream_version" ON "events" ("stream", "version")',
    'CREATE TABLE IF NOT EXISTS "checkpoints" ("consumer" VARCHAR(64) NOT NULL PRIMARY KEY, '
    '"position" INTEGER NOT NULL)',
    'CREATE TABLE IF NOT EXISTS "tracking" ("consumer" VARCHAR(64) NOT NULL, "position" INTEGER NOT NULL, '
    'PRIMARY KEY ("consumer", "position"))',
)


SYNCHRONOUS = ("normal", "full")


class SqliteBackend(Backend):
    def __init__(self, url: str, synchronous: str = "normal") -> None:
        # WAL + NORMAL: a commit survives a killed process (the kill -9 case); an OS crash or power cut can lose the
        # last commits, never corrupt the file. FULL also survives those, at an fsync per commit.
        self.synchronous = synchronous
        super().__init__(url)

    def connect(self) -> peewee.Database:
        db: peewee.Database = connect(self.url, pragmas={
            "journal_mode": "wal",
            "synchronous": self.synchronous,
            "busy_timeout": 10_000,
            "foreign_keys": 1,
        })
        return db

    def create_schema(self) -> None:
        existed = execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is not None
        for statement in SCHEMA:
            execute(statement)
        self.stamp_version(existed)

    @contextmanager
    def appending(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at BEGIN: appends are serialised, and positions commit in order.
        with self.db.atomic("IMMEDIATE"):
            yield

    def insert_events(self, stream: str, expected_version: int | None,
                      rows: Sequence[tuple[str, str, str]]) -> Inserted:
        current = stream_version(stream)
        if expected_version is not None and current != expected_version:
            raise conflict(stream, current, expected_version)
        cursor = insert_rows("INSERT INTO events (stream, version, type, data, recorded_at)",
                             [(stream, current + i, *row) for i, row in enumerate(rows, start=1)])
        # Inside an IMMEDIATE transaction the rows got consecutive rowids ending at the last one.
        last = int(cursor.lastrowid)
        positions = list(range(last - len(rows) + 1, last + 1))
        return lambda: (current, positions)
