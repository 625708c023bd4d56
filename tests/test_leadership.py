"""daemon.cluster against the real PostgreSQL: the leader lock's fence (a commit of the leader's consumers lands
only while the daemon making it holds the lock), and where a new daemon's consumers start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from daemon.cluster import LEADER_KEY, Leadership, NotLeader, adopt_checkpoint, per_node
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, Tracking
from daemon.events import RequestDeleted
from daemon.instance import connect_postgresql
from daemon.testing import eventually


async def fenced_commit(postgres_eventlog: EventLog, leadership: Leadership, stream: str) -> None:
    await postgres_eventlog.commit([(stream, [RequestDeleted()])], apply=leadership.fence)


def leader_lock_holders(url: str) -> int:
    """How many sessions hold this database and schema's leader lock."""
    with connect_postgresql(url) as admin:
        return int(admin.execute(f"SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                 f"((classid::bigint << 32) | objid::bigint) = {LEADER_KEY}").fetchone()[0])


async def test_a_deposed_leaders_commit_is_refused_and_the_new_leaders_lands(
        postgres_eventlog: EventLog, postgres_url: str) -> None:
    """While a holds the lock its fenced commits land; once its lock connection ends they are refused, and b,
    which took the lock, commits."""
    a, b = Leadership(postgres_url, "a", [], postgres_eventlog), Leadership(postgres_url, "b", [], postgres_eventlog)
    a_connection: Any = await asyncio.to_thread(connect_postgresql, postgres_url)
    b_connection: Any = await asyncio.to_thread(connect_postgresql, postgres_url)
    try:
        assert await asyncio.to_thread(a.try_lock, a_connection)
        assert not await asyncio.to_thread(b.try_lock, b_connection)
        await fenced_commit(postgres_eventlog, a, "r1")
        with pytest.raises(NotLeader):
            await fenced_commit(postgres_eventlog, b, "r2")

        await asyncio.to_thread(a_connection.close)  # the server drops a's lock with its session

        async def released() -> bool:
            return await asyncio.to_thread(leader_lock_holders, postgres_url) == 0

        await eventually(released, "a's lock to be released")
        with pytest.raises(NotLeader):
            await fenced_commit(postgres_eventlog, a, "r3")
        assert await asyncio.to_thread(b.try_lock, b_connection)
        await fenced_commit(postgres_eventlog, b, "r4")
    finally:
        await asyncio.to_thread(b_connection.close)
    assert [s for s in ("r1", "r2", "r3", "r4") if await postgres_eventlog.read_stream(s)] == ["r1", "r4"]


class Downloads(Follower):
    name = "stage.download"
    types = frozenset({"ImageRequested"})


async def test_a_new_daemons_consumer_starts_where_the_furthest_of_its_kind_is(postgres_eventlog: EventLog) -> None:
    """A consumer seen for the first time takes the furthest checkpoint of its kind; one with a checkpoint keeps it."""
    await postgres_eventlog.commit([], Tracking("stage.download@a", 40, ()))
    await postgres_eventlog.commit([], Tracking("stage.download@b", 70, ()))
    await postgres_eventlog.commit([], Tracking("stage.compress@c", 90, ()))
    await postgres_eventlog.commit([], Tracking("stage.download@d", 10, ()))
    for node in ("c", "d"):
        await adopt_checkpoint(postgres_eventlog, per_node(Downloads(postgres_eventlog), node))
    assert (await postgres_eventlog.load_tracking("stage.download@c"))[0] == 70
    assert (await postgres_eventlog.load_tracking("stage.download@d"))[0] == 10
