"""The database the log and the views share, and SQL text helpers for the statements that run for every event.

The log's own tables are created by its backend (daemon.eventlog.sqlite, daemon.eventlog.postgres).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import peewee
from playhouse.migrate import SchemaMigrator, migrate

# Bound to the real database by the store's backend; view tables share it.
database = peewee.DatabaseProxy()


def execute(sql: str, params: Sequence[Any] = ()) -> Any:
    """Run SQL text with `?` placeholders on this thread's connection; returns the DB-API cursor.

    For the statements that run for every event: peewee builds a query's SQL anew on each call, and
    on the hot path that building cost several times what SQLite took to run it.
    """
    if database.param != "?":
        sql = sql.replace("?", database.param)
    return database.execute_sql(sql, params)


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, down to the driver's own error: peewee wraps a
    driver's error once or more (keeping it as `orig`), and a pipeline's error may surface at a later statement."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        current = current.__cause__ or current.__context__ or (orig if isinstance(orig, BaseException) else None)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the database error in `exc`'s chain (PostgreSQL's drivers give one), if any."""
    return next((state for error in error_chain(exc) if isinstance(state := getattr(error, "sqlstate", None), str)),
                None)


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


ROWS_PER_INSERT = 2000  # x at most 8 columns: within SQLite's 32,766 parameters per statement


def insert_rows(head: str, rows: Sequence[Sequence[Any]], tail: str = "") -> Any:
    """`head VALUES (...), (...) tail` for `rows`, a statement per ROWS_PER_INSERT rows; the last cursor (None
    for no rows). For bulk writes on the hot path, where peewee's insert_many (which builds SQL per value) would
    cost more than the database itself (docs/performance.md)."""
    cursor: Any = None
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start:start + ROWS_PER_INSERT]
        values = ", ".join([f"({placeholders(len(chunk[0]))})"] * len(chunk))
        cursor = execute(f"{head} VALUES {values}{tail}", [v for row in chunk for v in row])
    return cursor


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


def add_missing_columns(tables: Sequence[type[peewee.Model]]) -> list[str]:
    """Add the columns a newer imgpipe gave a view table to the table an older one made; returns them as
    table.column. Such columns are nullable: the rows folded before them have nothing to say there."""
    migrator = SchemaMigrator.from_database(database.obj)
    added: list[str] = []
    for table in tables:
        name = table._meta.table_name
        cursor = database.execute_sql(f'SELECT * FROM "{name}" WHERE 1 = 0')
        existing = {column[0] for column in cursor.description}
        missing = [f for f in table._meta.sorted_fields if f.column_name not in existing]
        if missing:
            migrate(*(migrator.add_column(name, f.column_name, f) for f in missing))
            added += [f"{name}.{f.column_name}" for f in missing]
    return added
