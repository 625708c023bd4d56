"""Another process's appends on a shared PostgreSQL log: read once into memory, waking only their consumers."""

from __future__ import annotations

import asyncio

import pytest

from daemon.eventlog import postgres
from daemon.eventlog.postgres import PostgresBackend
from daemon.eventlog.store import EventLog, open_store
from daemon.events import ImageDownloaded, ImageRequested, RequestAccepted, names
from daemon.instance import connect_postgresql


async def test_another_stores_events_are_read_once_into_memory_and_wake_only_their_consumers(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """A second store's append wakes this store's consumers of its types (not the others), and their next page
    comes from memory, our own appends interleaved in position order."""
    other = open_store(postgres_url)
    await other.open()
    try:
        requested = postgres_eventlog.subscribe(names(ImageRequested))
        downloaded = postgres_eventlog.subscribe(names(ImageDownloaded))
        start = postgres_eventlog.head
        await postgres_eventlog.append("mine", [RequestAccepted(source="upload", source_name="a.csv", products=())])
        await other.append("theirs", [ImageRequested(product=0, index=0, url="http://origin/a.jpg", stem="a")])
        await other.append("theirs", [ImageRequested(product=0, index=1, url="http://origin/b.jpg", stem="b")])
        async with asyncio.timeout(10):
            while postgres_eventlog.head < other.head:
                await requested.wait()
                requested.clear()
        assert not downloaded.is_set()
        page = postgres_eventlog.read_recent(start, None, 10)
        assert page is not None
        assert [r.stream for r in page] == ["mine", "theirs", "theirs"]
        assert [r.position for r in page] == list(range(start + 1, start + 4))
    finally:
        await other.close()


async def test_another_stores_event_behind_our_own_newer_append_is_still_read(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """When our own append lands right after another store's, the watcher's look at the log's newest position finds
    ours: the other store's event before it is still read and wakes its consumers."""
    other = open_store(postgres_url)
    await other.open()
    postgres_eventlog.backend.unwatch()  # the look is made by hand below, once both appends are in
    try:
        requested = postgres_eventlog.subscribe(names(ImageRequested))
        start = postgres_eventlog.head
        theirs = await other.append("theirs", [ImageRequested(product=0, index=0, url="http://origin/a.jpg",
                                                              stem="a")])
        mine = await postgres_eventlog.append("mine", [RequestAccepted(source="upload", source_name="a.csv",
                                                                       products=())])
        assert mine == theirs + 1 == postgres_eventlog.head
        requested.clear()
        postgres_eventlog._other_process_appended(postgres_eventlog.head)  # what the watcher's look reports
        async with asyncio.timeout(10):
            await requested.wait()
        page = postgres_eventlog.read_recent(start, None, 10)
        assert page is not None and [r.stream for r in page] == ["theirs", "mine"]
    finally:
        await other.close()


async def test_an_append_announced_without_a_position_is_still_read(
        postgres_eventlog: EventLog, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY that names only its sender (an older imgpipe's) makes the watcher look the head up, so the append
    it announces is read as soon as it is heard, not at the watcher's next look of its own."""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3.0)  # its next look of its own: 3 s after the first
    other = open_store(postgres_url)
    await other.open()
    try:
        requested = postgres_eventlog.subscribe(names(ImageRequested))
        backend = other.backend
        assert isinstance(backend, PostgresBackend)
        channel = backend._keys()[1]

        def append_as_an_older_store() -> None:
            with other.db.atomic():
                other.backend.insert_events("theirs", None, [(
                    "ImageRequested", '{"product": 0, "index": 0, "url": "http://origin/a.jpg", "stem": "a"}',
                    "2026-12-06T00:00:00.000Z")])

        postgres_eventlog.backend.unwatch()
        await asyncio.to_thread(append_as_an_older_store)  # no NOTIFY at all: unseen until the look below
        requested.clear()
        postgres_eventlog.backend.watch(postgres_eventlog._other_process_appended, lambda reason: None)
        async with asyncio.timeout(10):
            await requested.wait()  # the watcher's first look
        requested.clear()
        await asyncio.to_thread(append_as_an_older_store)
        with connect_postgresql(postgres_url) as notifier:
            notifier.execute("SELECT pg_notify(%s, 'an-older-store')", (channel,))
        async with asyncio.timeout(1.5):
            await requested.wait()
    finally:
        await other.close()


async def test_another_stores_append_of_types_nobody_here_reads_is_noted_not_read(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """An append announced with types no consumer here reads moves the head without a read: memory leaves those
    positions to the database, and still answers for the types read here."""
    other = open_store(postgres_url)
    await other.open()
    postgres_eventlog.backend.unwatch()  # the announcements are made by hand below, as the watcher passes them on
    try:
        requested = postgres_eventlog.subscribe(names(ImageRequested))
        start = postgres_eventlog.head
        downloaded_at = await other.append("theirs", [ImageDownloaded(product=0, index=0, stem="a", bytes=1,
                                                                      attempts=1)])
        postgres_eventlog._other_process_appended(downloaded_at, downloaded_at, names(ImageDownloaded))
        async with asyncio.timeout(10):
            while postgres_eventlog.head < downloaded_at:
                await asyncio.sleep(0.01)
        assert not requested.is_set()
        requested_at = await other.append("theirs", [ImageRequested(product=0, index=0, url="http://origin/a.jpg",
                                                                    stem="a")])
        postgres_eventlog._other_process_appended(requested_at, requested_at, names(ImageRequested))
        async with asyncio.timeout(10):
            await requested.wait()
        page = postgres_eventlog.read_recent(start, names(ImageRequested), 10)
        assert page is not None and [r.position for r in page] == [requested_at]
        assert postgres_eventlog.read_recent(start, names(ImageDownloaded), 10) is None
        assert [r.position for r in await postgres_eventlog.read_after(start, names(ImageDownloaded), 10)] == [
            downloaded_at]
    finally:
        await other.close()


async def test_an_append_announces_its_last_position_its_size_and_its_types(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """The NOTIFY of an append names its sender, its last position, how many events it appended and their types
    (with the daemon an event is addressed to): enough for another store to pass them over without reading them."""
    backend = postgres_eventlog.backend
    assert isinstance(backend, PostgresBackend)
    with connect_postgresql(postgres_url) as listener:
        listener.execute(f"LISTEN {backend._keys()[1]}")
        last = await postgres_eventlog.append("s", [
            ImageRequested(product=0, index=0, url="http://origin/a.jpg", stem="a"),
            ImageDownloaded(product=0, index=0, stem="a", bytes=1, attempts=1, node="b"),
            ImageRequested(product=0, index=1, url="http://origin/b.jpg", stem="b")])
        notices = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert notices == [f"{backend.sender} {last} 3 ImageDownloaded@b,ImageRequested"]


async def test_another_stores_events_addressed_to_another_daemon_are_not_read_for_this_ones_reader(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """A store whose only reader of ImageDownloaded takes daemon b's does not read an append of daemon a's: it notes
    the positions and still answers b's reader from memory."""
    other = open_store(postgres_url)
    await other.open()
    try:
        postgres_eventlog.subscribe(names(ImageDownloaded), addressee="b")
        start = postgres_eventlog.head
        theirs = await other.append("theirs", [ImageDownloaded(product=0, index=0, stem="a", bytes=1, attempts=1,
                                                               node="a")])
        async with asyncio.timeout(10):
            while postgres_eventlog.head < theirs:
                await asyncio.sleep(0.01)
        assert postgres_eventlog.read_recent(start, names(ImageDownloaded), 10, addressee="b") == []
        assert postgres_eventlog.read_recent(start, names(ImageDownloaded), 10) is None
    finally:
        await other.close()
