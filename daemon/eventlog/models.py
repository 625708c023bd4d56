"""Tables of the event log: events, and each consumer's checkpoint and tracking records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import peewee
from playhouse.sqlite_ext import AutoIncrementField

# Bound to the real database by eventlog.store.open_database; view tables share it.
database = peewee.DatabaseProxy()


def execute(sql: str, params: Sequence[Any] = ()) -> Any:
    """Run SQL text with `?` placeholders on this thread's connection; returns the DB-API cursor.

    For the statements that run for every event: peewee builds a query's SQL anew on each call, and
    on the hot path that building cost several times what SQLite took to run it.
    """
    if database.param != "?":
        sql = sql.replace("?", database.param)
    return database.execute_sql(sql, params)


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class StoredEvent(BaseModel):
    # AUTOINCREMENT: positions are never reused, so a checkpoint can never skip a later event.
    position = AutoIncrementField()
    stream = peewee.CharField(max_length=64)
    version = peewee.IntegerField()
    type = peewee.CharField(max_length=64, index=True)
    data = peewee.TextField()
    recorded_at = peewee.CharField(max_length=40)

    class Meta:
        table_name = "events"
        indexes = ((("stream", "version"), True),)


class Checkpoint(BaseModel):
    """A consumer's low-water mark: every event at or below it is fully handled."""

    consumer = peewee.CharField(primary_key=True, max_length=64)
    position = peewee.IntegerField()

    class Meta:
        table_name = "checkpoints"


class Tracking(BaseModel):
    """Events above the checkpoint that a concurrent consumer has already handled."""

    consumer = peewee.CharField(max_length=64)
    position = peewee.IntegerField()

    class Meta:
        table_name = "tracking"
        primary_key = peewee.CompositeKey("consumer", "position")


LOG_TABLES: tuple[type[BaseModel], ...] = (StoredEvent, Checkpoint, Tracking)
