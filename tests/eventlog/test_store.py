"""The append-only event store on a real SQLite file: positions, versions, conflicts, durability settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import peewee
import psycopg
import pytest
from structlog.testing import capture_logs

from daemon.config import Settings
from daemon.eventlog.follower import Follower
from daemon.eventlog.models import ROWS_PER_INSERT, BaseModel, execute, sqlstate
from daemon.eventlog.postgres import DIVISION_BY_ZERO
from daemon.eventlog.store import (
    SCHEMA_VERSION,
    EventLog,
    RecordedEvent,
    SchemaTooNew,
    StreamConflict,
    Tracking,
    open_store,
)
from daemon.events import (
    Event,
    ImageFailed,
    ImageRequested,
    Product,
    RequestAccepted,
    RequestCompleted,
)
from daemon.instance import is_postgresql


def failed(index: int) -> ImageFailed:
    return ImageFailed(product=0, index=index, stage="download", error=f"error {index}")


async def open_log(settings: Settings) -> EventLog:
    eventlog = open_store(settings.database_url)
    await eventlog.open()
    return eventlog


@pytest.fixture
async def eventlog(settings: Settings) -> AsyncIterator[EventLog]:
    log = await open_log(settings)
    try:
        yield log
    finally:
        await log.close()


async def read_all(eventlog: EventLog) -> list[RecordedEvent]:
    return await eventlog.query(eventlog.read_after_sync, 0, None, 10_000)


async def test_append_assigns_increasing_positions_and_per_stream_versions(eventlog: EventLog) -> None:
    """Positions grow across the whole log; versions count 1..n within each stream."""
    assert await eventlog.append("a", [failed(0), failed(1), failed(2)]) == 3
    assert await eventlog.append("b", [failed(0), failed(1)]) == 5
    assert await eventlog.append("a", [failed(3), failed(4)]) == 7
    records = await read_all(eventlog)
    assert [r.position for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [(r.stream, r.version) for r in records] == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("a", 4), ("a", 5)]
    assert [r.event for r in await eventlog.read_stream("a")] == [failed(i) for i in range(5)]
    assert eventlog.head == 7
    assert all(r.recorded_at.endswith("Z") for r in records)


async def test_events_round_trip_through_the_log(eventlog: EventLog) -> None:
    """Events read back equal the events appended, nested products and tuples included."""
    events: list[Event] = [
        RequestAccepted(source="upload", source_name="ü.csv", products=(
            Product(serial="1", product_name="Bücher, \"quoted\"", slug="1", input_urls=("https://a/1", "https://a/2")),
        ), webhook_url="https://hooks.example/x"),
        ImageRequested(product=0, index=1, url="https://a/2", stem="r_1_1"),
        RequestCompleted(status="failed", images=2, done=0, failed=2),
    ]
    await eventlog.append("r", events, expected_version=0)
    assert [r.event for r in await eventlog.read_stream("r")] == events


async def test_an_append_of_more_rows_than_one_statement_takes_keeps_log_order_and_stream_order(
        eventlog: EventLog) -> None:
    """An append split over several INSERT statements gives positions and versions rising together, as memory has them."""
    await eventlog.append("a", [failed(0)])
    events = [failed(i) for i in range(1, 2 * ROWS_PER_INSERT + 2)]
    last = await eventlog.append("a", events)
    from_memory = await eventlog.read_stream("a")
    stored = await eventlog.query(eventlog.read_stream_sync, "a")
    assert stored == from_memory and stored[-1].position == last
    assert [r.version for r in stored] == list(range(1, len(events) + 2))
    assert [r.event for r in stored[1:]] == events
    assert [r.position for r in stored] == sorted(r.position for r in stored)


async def test_expected_version_zero_on_an_existing_stream_conflicts_and_writes_nothing(eventlog: EventLog,
                                                                                        settings: Settings,
                                                                                        helpers: Any) -> None:
    """Opening a stream that exists raises StreamConflict and leaves the log as it was."""
    await eventlog.append("r", [failed(0)], expected_version=0)
    before = helpers.stored_events(settings)
    with pytest.raises(StreamConflict):
        await eventlog.append("r", [failed(1), failed(2)], expected_version=0)
    with pytest.raises(StreamConflict):
        await eventlog.append("r", [failed(1)], expected_version=5)
    assert helpers.stored_events(settings) == before
    await eventlog.append("r", [failed(1)], expected_version=1)
    assert [r.version for r in await eventlog.read_stream("r")] == [1, 2]


async def test_positions_are_never_reused_after_the_last_row_is_deleted(eventlog: EventLog, settings: Settings,
                                                                        helpers: Any) -> None:
    """Deleting the newest row does not let the next append take its position."""
    last = await eventlog.append("r", [failed(0), failed(1), failed(2)])
    helpers.execute(settings, "DELETE FROM events WHERE position = ?", last)
    assert await eventlog.append("s", [failed(0)]) > last
    assert [p for p, *_ in helpers.stored_events(settings)] == [1, 2, last + 1]


async def test_sqlite_runs_in_wal_mode(eventlog: EventLog, settings: Settings, helpers: Any) -> None:
    """The log's SQLite file is in WAL journal mode (readers never block the writer)."""
    if is_postgresql(settings.database_url):
        pytest.skip("a SQLite setting")
    await eventlog.append("r", [failed(0)])
    assert helpers.query(settings, "PRAGMA journal_mode") == [("wal",)]


async def test_head_is_restored_when_the_log_is_reopened(settings: Settings) -> None:
    """A reopened log knows the newest position, and appends after it."""
    first = await open_log(settings)
    await first.append("r", [failed(0), failed(1)])
    await first.close()
    second = await open_log(settings)
    try:
        assert second.head == 2
        assert await second.append("r", [failed(2)], expected_version=2) == 3
    finally:
        await second.close()


async def pages(eventlog: EventLog, position: int) -> list[tuple[object, object]]:
    """(memory, database) pages after `position` for every kind of follower query."""
    pairs: list[tuple[object, object]] = []
    for types in (None, frozenset({"ImageFailed"}), frozenset({"RequestCompleted", "ImageRequested"})):
        for limit in (1, 2, 100):
            pairs.append((eventlog.read_recent(position, types, limit),
                          await eventlog.query(eventlog.read_after_sync, position, types, limit)))
    return pairs


async def test_recent_events_are_read_from_memory_as_the_database_has_them(eventlog: EventLog) -> None:
    """A follower close behind the head gets from memory exactly the page the database would give it."""
    await eventlog.append("a", [failed(0), failed(1)])
    await eventlog.append("b", [ImageRequested(product=0, index=0, url="https://a/1", stem="b_1_0"),
                                RequestCompleted(status="completed", images=1, done=1, failed=0)])
    await eventlog.append("a", [failed(2)])
    for position in range(0, 6):
        for memory, database in await pages(eventlog, position):
            assert memory == database
    for stream in ("a", "b"):
        assert eventlog.read_stream_recent(stream) == await eventlog.query(eventlog.read_stream_sync, stream)


async def test_a_commit_of_several_results_keeps_their_order_in_the_log_and_in_memory(eventlog: EventLog) -> None:
    """Results on one stream next to each other, and apart, land in the order given, as memory has them too."""
    assert await eventlog.commit([("a", [failed(0)]), ("a", [failed(1), failed(2)]), ("b", [failed(3)]), ("a", []),
                                  ("a", [failed(4)])], Tracking("test.consumer", 0, (7, 8, 9)))
    assert [(r.stream, r.version, r.event) for r in await eventlog.query(eventlog.read_after_sync, 0, None, 10)] == [
        ("a", 1, failed(0)), ("a", 2, failed(1)), ("a", 3, failed(2)), ("b", 1, failed(3)), ("a", 4, failed(4))]
    for memory, database in await pages(eventlog, 0):
        assert memory == database
    assert await eventlog.load_tracking("test.consumer") == (0, {7, 8, 9})
    assert await eventlog.commit([], Tracking("test.consumer", 8, (10,)))
    assert await eventlog.load_tracking("test.consumer") == (8, {9, 10})


async def test_memory_does_not_answer_for_events_it_never_saw(settings: Settings, helpers: Any) -> None:
    """Events from before a restart, or written past the store, and streams begun before either, are read from
    the database."""
    first = await open_log(settings)
    await first.append("a", [failed(0), failed(1)])
    await first.close()
    eventlog = await open_log(settings)
    try:
        assert eventlog.read_recent(0, None, 10) is None  # nothing in memory yet
        await eventlog.append("a", [failed(2)])
        assert eventlog.read_recent(1, None, 10) is None
        assert [r.position for r in eventlog.read_recent(2, None, 10) or []] == [3]
        assert eventlog.read_stream_recent("a") is None  # its first events are only in the database
        await eventlog.append("c", [failed(0)])
        assert [r.event for r in eventlog.read_stream_recent("c") or []] == [failed(0)]
        # A row this store did not append (another process's) leaves a gap before our next append: memory answers
        # nothing past it until the gap is read (once, for every consumer), then as the database does.
        helpers.execute(settings, "INSERT INTO events (stream, version, type, data, recorded_at) "
                                  "VALUES ('x', 1, 'ImageFailed', ?, '2026-01-01T00:00:00.000Z')", failed(9).to_json())
        await eventlog.append("a", [failed(3)])
        assert eventlog.read_recent(4, None, 10) is None
        assert [r.stream for r in await eventlog.read_after(4, None, 10)] == ["x", "a"]
        for position in (4, 5):
            for memory, database in await pages(eventlog, position):
                assert memory == database
    finally:
        await eventlog.close()


class _BrokenWrite(Follower):
    """Appends a result, then its own table write fails: the commit transaction rolls back."""

    name = "test.broken-write"
    types = frozenset({"ImageFailed"})

    def __init__(self, eventlog: EventLog) -> None:
        super().__init__(eventlog)
        self.writes: list[int] = []

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        return (RequestCompleted(status="failed", images=1, done=0, failed=1),)

    def update_tables(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        self.writes += [record.position for record, _ in finished]
        raise RuntimeError("the follower's table write failed")


class _Watcher(Follower):
    name = "test.watcher"
    types = frozenset({"ImageFailed"})

    def __init__(self, eventlog: EventLog) -> None:
        super().__init__(eventlog)
        self.seen: list[int] = []

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        self.seen.append(record.event.index)  # type: ignore[attr-defined]
        return ()


async def test_a_rolled_back_append_does_not_make_followers_skip_later_events(eventlog: EventLog, settings: Settings,
                                                                              helpers: Any) -> None:
    """After a commit that rolled back, the head stays put and every follower still sees every later event."""
    await eventlog.append("r", [failed(0)])
    broken = _BrokenWrite(eventlog)
    task = asyncio.create_task(broken.run())
    await helpers.eventually(lambda: broken.writes, "the broken follower's commit to roll back")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [kind for *_, kind, _ in helpers.stored_events(settings)] == ["ImageFailed"]
    assert eventlog.head == 1
    assert [r.event for r in eventlog.read_recent(0, None, 10) or []] == [failed(0)]
    watcher = _Watcher(eventlog)
    await watcher.run_until_idle()
    await eventlog.append("r", [failed(1)])
    await watcher.run_until_idle()
    assert watcher.seen == [0, 1]


async def test_decide_appends_at_the_version_it_read_and_decides_again_when_the_stream_moved(
        eventlog: EventLog) -> None:
    """A decision made on a stream that another append moved meanwhile is made again on the new events."""
    await eventlog.append("r", [failed(0)])
    seen: list[int] = []

    def decide(records: list[RecordedEvent]) -> tuple[list[Event], int]:
        seen.append(len(records))
        return [failed(len(records))], len(records)

    original = eventlog.query

    async def read_then_someone_appends(fn: Any, *args: Any) -> Any:
        result = await original(fn, *args)
        if len(seen) == 0:
            await eventlog.append("r", [failed(1)])  # lands between the read and the decided append
        return result

    eventlog.query = read_then_someone_appends  # type: ignore[method-assign]
    position, decided_on = await eventlog.decide("r", None, decide)
    assert seen == [1, 2] and decided_on == 2
    stored = await eventlog.read_stream("r")
    assert [r.event for r in stored] == [failed(0), failed(1), failed(2)] and position == stored[-1].position


async def test_decide_is_not_made_again_for_events_of_types_it_does_not_read(eventlog: EventLog) -> None:
    """An event of a type the decision does not read, landing between its read and its append, changes nothing."""
    await eventlog.append("r", [RequestCompleted(status="failed", images=1, done=0, failed=1)])
    seen: list[int] = []
    original = eventlog.query

    async def read_then_an_image_event_lands(fn: Any, *args: Any) -> Any:
        result = await original(fn, *args)
        await eventlog.append("r", [failed(len(seen))])
        return result

    def decide(records: list[RecordedEvent]) -> tuple[list[Event], None]:
        seen.append(len(records))
        return [RequestCompleted(status="completed", images=1, done=1, failed=0)], None

    eventlog.query = read_then_an_image_event_lands  # type: ignore[method-assign]
    await eventlog.decide("r", frozenset({"RequestCompleted"}), decide)
    assert seen == [1]
    assert [r.type for r in await eventlog.read_stream("r")] == [
        "RequestCompleted", "ImageFailed", "RequestCompleted"]


async def test_a_commit_whose_tracking_record_is_there_is_not_made_again(eventlog: EventLog) -> None:
    """A commit retried after an unknown outcome finds its tracking record and appends nothing twice."""
    tracking = Tracking("test.consumer", 0, (1,))
    assert await eventlog.commit([("r", [failed(0)])], tracking)
    assert not await eventlog.commit([("r", [failed(0)])], tracking, verify=True)
    assert [r.event for r in await eventlog.read_stream("r")] == [failed(0)]
    assert await eventlog.load_tracking("test.consumer") == (0, {1})


async def test_a_database_written_by_a_newer_imgpipe_is_refused(settings: Settings, helpers: Any) -> None:
    """A schema version above this imgpipe's stops the store from opening, saying which versions."""
    first = await open_log(settings)
    await first.close()
    helpers.execute(settings, "UPDATE schema_version SET version = ?", SCHEMA_VERSION + 1)
    eventlog = open_store(settings.database_url)
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, written by a newer imgpipe"):
        await eventlog.open()
    await eventlog.close()


async def test_sqlite_durability_is_a_setting(settings: Settings, helpers: Any) -> None:
    """paths.sqlite_synchronous = "full" makes every SQLite commit wait for the disk; "normal" is the default."""
    if is_postgresql(settings.database_url):
        pytest.skip("a SQLite setting")
    for mode, expected in (("normal", 1), ("full", 2)):
        eventlog = open_store(settings.database_url, sqlite_synchronous=mode)
        await eventlog.open()
        try:
            assert await eventlog.query(lambda: execute("PRAGMA synchronous").fetchone()[0]) == expected
        finally:
            await eventlog.close()


class ShelfBefore(BaseModel):
    name = peewee.CharField(primary_key=True)

    class Meta:
        table_name = "view_test_shelf"


class ShelfAfter(BaseModel):
    """The same view table as a newer imgpipe declares it: one nullable column more."""

    name = peewee.CharField(primary_key=True)
    score = peewee.FloatField(null=True)

    class Meta:
        table_name = "view_test_shelf"


async def test_a_view_table_gets_the_columns_a_newer_release_added(settings: Settings) -> None:
    """Opened with a view model that has a new nullable column, an existing table gains it and keeps its rows."""
    def shelve(model: type[BaseModel], **row: object) -> None:
        model.insert(**row).execute()

    old = open_store(settings.database_url)
    await old.open([ShelfBefore])
    try:
        await old.commit([], None, lambda: shelve(ShelfBefore, name="kept"))
    finally:
        await old.close()
    with capture_logs() as logs:
        new = open_store(settings.database_url)
        await new.open([ShelfAfter])
    try:
        rows = await new.query(lambda: list(ShelfAfter.select().tuples()))
        await new.commit([], None, lambda: shelve(ShelfAfter, name="new", score=0.5))
        assert await new.query(lambda: sorted(ShelfAfter.select().tuples())) == [("kept", None), ("new", 0.5)]
    finally:
        await new.close()
    assert rows == [("kept", None)]
    assert [e["columns"] for e in logs if e["event"] == "view_columns_added"] == [["view_test_shelf.score"]]


def test_a_refused_check_is_recognised_however_often_peewee_wrapped_it(postgres_url: str) -> None:
    """A check's division by zero reads as a refusal whether psycopg raised it or peewee wrapped it once or twice
    (as it is when the pipeline raises it at a later statement), and nothing else does."""
    with psycopg.connect(postgres_url) as connection:
        with pytest.raises(psycopg.Error) as raised:
            connection.execute("SELECT 1 / 0")
    once = peewee.DataError(raised.value, *raised.value.args)
    try:
        try:
            raise once
        except peewee.DataError as inner:
            raise peewee.DataError(inner, *inner.args) from inner
    except peewee.DataError as outer:
        twice = outer
    assert [sqlstate(e) for e in (raised.value, once, twice)] == [DIVISION_BY_ZERO] * 3
    assert sqlstate(peewee.DataError("division by zero")) is None
