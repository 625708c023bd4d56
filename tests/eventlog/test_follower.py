"""Followers on a real SQLite log: checkpoints, tracking records under concurrency, Retry, restarts."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import peewee
import pytest
from structlog.testing import capture_logs

from daemon.config import Settings
from daemon.eventlog import store
from daemon.eventlog.follower import Follower, Passed, Retry
from daemon.eventlog.store import EventLog, RecordedEvent, open_store
from daemon.events import Event
from daemon.testing import eventually


@dataclass(frozen=True)
class SpinePinged(Event):
    """Input of the test consumers."""

    n: int


@dataclass(frozen=True)
class SpinePonged(Event):
    """What the test consumers append for each ping they handle."""

    n: int
    note: str = ""


class Recorder(Follower):
    """Handles pings: records each call, optionally sleeps or waits at a gate, answers with a pong."""

    name = "test.recorder"
    types = frozenset({"SpinePinged"})
    concurrency = 1

    def __init__(self, eventlog: EventLog, delays: dict[int, float] | None = None,
                 gates: dict[int, asyncio.Event] | None = None, concurrency: int = 1) -> None:
        super().__init__(eventlog)
        self.concurrency = concurrency
        self.delays, self.gates = delays or {}, gates or {}
        self.calls: list[tuple[int, int]] = []  # (n, attempt)
        self.running = 0
        self.most_at_once = 0

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        n = record.event.n  # type: ignore[attr-defined]
        self.calls.append((n, attempt))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if n in self.gates:
                await self.gates[n].wait()
            await asyncio.sleep(self.delays.get(n, 0))
        finally:
            self.running -= 1
        return (SpinePonged(n=n),)


async def open_log(settings: Settings) -> EventLog:
    eventlog = open_store(settings.database_url)
    await eventlog.open()
    return eventlog


async def ping(eventlog: EventLog, *numbers: int) -> list[int]:
    """One ping per number, each on its own stream; returns their positions."""
    return [await eventlog.append(f"s{n}", [SpinePinged(n=n)]) for n in numbers]


def pongs(helpers: Any, settings: Settings) -> Counter[int]:
    """How many pongs the log holds for each ping number."""
    return Counter(data["n"] for _, _, _, kind, data in helpers.stored_events(settings) if kind == "SpinePonged")


def tracking(helpers: Any, settings: Settings, consumer: str) -> tuple[int, list[int]]:
    """The consumer's stored (checkpoint, tracked positions above it)."""
    rows = helpers.query(settings, "SELECT position FROM checkpoints WHERE consumer = ?", consumer)
    tracked = helpers.query(settings, "SELECT position FROM tracking WHERE consumer = ? ORDER BY position", consumer)
    return (rows[0][0] if rows else 0), [p for (p,) in tracked]


async def test_follower_resumes_after_a_restart_exactly_from_its_checkpoint(settings: Settings,
                                                                            helpers: Any) -> None:
    """Events handled before a restart are not handled again; a new instance handles only newer ones."""
    eventlog = await open_log(settings)
    await ping(eventlog, 1, 2, 3)
    first = Recorder(eventlog)
    assert await first.run_until_idle() == 3
    assert first.calls == [(1, 1), (2, 1), (3, 1)]
    assert first.checkpoint == eventlog.head
    await eventlog.close()

    eventlog = await open_log(settings)  # the restart: a new log object and a new follower on the same file
    try:
        second = Recorder(eventlog)
        assert await second.run_until_idle() == 0
        assert second.calls == []
        newer = await ping(eventlog, 4, 5)
        assert await second.run_until_idle() == 2
        assert second.calls == [(4, 1), (5, 1)]
        checkpoint, tracked = tracking(helpers, settings, Recorder.name)
        assert (checkpoint >= newer[-1], tracked) == (True, [])
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


async def test_concurrent_follower_commits_out_of_order_and_redoes_nothing_after_restart(settings: Settings,
                                                                                          helpers: Any) -> None:
    """With concurrency, later events that finish first are tracked; after a crash only unfinished ones are redone."""
    eventlog = await open_log(settings)
    positions = await ping(eventlog, 1, 2, 3, 4, 5, 6)
    gate = asyncio.Event()  # ping 1 never finishes before the "crash"
    first = Recorder(eventlog, delays={n: (7 - n) * 0.01 for n in range(2, 7)}, gates={1: gate}, concurrency=4)
    task = asyncio.create_task(first.run())

    def tracked_rest() -> bool:
        checkpoint, tracked = tracking(helpers, settings, Recorder.name)
        return checkpoint == 0 and tracked == positions[1:]

    await helpers.eventually(tracked_rest, "pings 2..6 to be committed as tracking records above checkpoint 0")
    assert first.most_at_once > 1
    assert sorted(n for n, _ in first.calls) == [1, 2, 3, 4, 5, 6]
    assert pongs(helpers, settings) == {2: 1, 3: 1, 4: 1, 5: 1, 6: 1}
    task.cancel()  # the crash: ping 1 is still in flight
    await asyncio.gather(task, return_exceptions=True)
    await eventlog.close()

    eventlog = await open_log(settings)
    try:
        second = Recorder(eventlog, concurrency=4)
        assert await second.run_until_idle() == 1
        assert second.calls == [(1, 1)]
        checkpoint, tracked = tracking(helpers, settings, Recorder.name)
        assert (checkpoint >= positions[-1], tracked) == (True, [])
        third = Recorder(eventlog, concurrency=4)
        assert await third.run_until_idle() == 0
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}


async def test_concurrent_follower_with_varied_delays_redoes_nothing_after_restart(settings: Settings,
                                                                                   helpers: Any) -> None:
    """A concurrent follower whose handlers finish in a shuffled order handles each event exactly once."""
    eventlog = await open_log(settings)
    numbers = list(range(1, 21))
    await ping(eventlog, *numbers)
    first = Recorder(eventlog, delays={n: (n * 7 % 5) * 0.01 for n in numbers}, concurrency=8)
    assert await first.run_until_idle() == 20
    assert first.most_at_once > 1
    await eventlog.close()
    eventlog = await open_log(settings)
    try:
        again = Recorder(eventlog, concurrency=8)
        assert await again.run_until_idle() == 0
        assert again.calls == []
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {n: 1 for n in numbers}


class Retrier(Follower):
    """First attempt: Retry with an interim event; second attempt waits at a gate, then finishes."""

    name = "test.retrier"
    types = frozenset({"SpinePinged"})

    def __init__(self, eventlog: EventLog, gate: asyncio.Event) -> None:
        super().__init__(eventlog)
        self.gate = gate
        self.attempts: list[int] = []

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        self.attempts.append(attempt)
        n = record.event.n  # type: ignore[attr-defined]
        if attempt == 1:
            raise Retry(defer=0.01, events=(SpinePonged(n=n, note="retrying"),))
        await self.gate.wait()
        return (SpinePonged(n=n, note="done"),)


async def test_retry_commits_its_events_at_once_and_handles_again(settings: Settings, helpers: Any) -> None:
    """Retry(defer, events) commits the events before the next attempt, which then finishes the event."""
    eventlog = await open_log(settings)
    try:
        (position,) = await ping(eventlog, 1)
        gate = asyncio.Event()
        follower = Retrier(eventlog, gate)
        task = asyncio.create_task(follower.run_until_idle())

        def notes() -> list[str]:
            return [d["note"] for _, _, _, kind, d in helpers.stored_events(settings) if kind == "SpinePonged"]

        await helpers.eventually(lambda: follower.attempts == [1, 2], "the second attempt")
        assert notes() == ["retrying"]  # committed while the second attempt is still running
        assert follower.checkpoint < position
        gate.set()
        assert await task == 1
        assert notes() == ["retrying", "done"]
        assert follower.checkpoint == eventlog.head
        assert [(v, kind) for _, _, v, kind, _ in helpers.stored_events(settings, "s1")] == [
            (1, "SpinePinged"), (2, "SpinePonged"), (3, "SpinePonged")]
    finally:
        await eventlog.close()


async def test_wait_for_returns_once_the_position_is_committed(settings: Settings) -> None:
    """wait_for(position) is True once the follower has committed that far, False on timeout."""
    eventlog = await open_log(settings)
    try:
        gate = asyncio.Event()
        (position,) = await ping(eventlog, 1)
        follower = Recorder(eventlog, gates={1: gate})
        task = asyncio.create_task(follower.run())
        assert await follower.wait_for(position, timeout=0.2) is False
        gate.set()
        assert await follower.wait_for(position, timeout=10) is True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


async def test_wait_for_a_position_the_follower_does_not_take_returns_once_it_has_looked(settings: Settings) -> None:
    """wait_for(position) of an event whose type the follower does not take returns True as soon as the follower
    has read past it, rather than waiting for an event it does take to wake it."""
    eventlog = await open_log(settings)
    follower = Recorder(eventlog)
    task = asyncio.create_task(follower.run())
    try:
        (first,) = await ping(eventlog, 1)
        assert await follower.wait_for(first, timeout=10) is True
        position = await eventlog.append("other", [SpinePonged(n=1)])  # not a type the Recorder takes
        assert await follower.wait_for(position, timeout=5) is True
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventlog.close()


class FlakyWrite(Recorder):
    """Its table write fails once (say, 'database is locked'), then works."""

    name = "test.flaky-write"
    failures: ClassVar[int] = 0

    def update_tables(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        if FlakyWrite.failures == 0:
            FlakyWrite.failures += 1
            raise RuntimeError("database is locked")


async def test_follower_survives_a_failed_commit(settings: Settings) -> None:
    """A commit that fails once is retried: run() keeps going and the event is committed."""
    FlakyWrite.failures = 0
    eventlog = await open_log(settings)
    try:
        follower = FlakyWrite(eventlog)
        task = asyncio.create_task(follower.run())
        (position,) = await ping(eventlog, 1)
        committed = asyncio.ensure_future(follower.wait_for(position, timeout=10))
        done, _ = await asyncio.wait([task, committed], return_when=asyncio.FIRST_COMPLETED)
        for running in (task, committed):
            running.cancel()
        await asyncio.gather(task, committed, return_exceptions=True)
        assert task not in done, f"run() ended: {task.exception()!r}"
        assert FlakyWrite.failures == 1
        assert follower.checkpoint >= position
    finally:
        await eventlog.close()


async def test_an_event_appended_while_the_follower_reads_is_handled_once(settings: Settings, helpers: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An event whose append commits between the follower noting the head and reading its page from the database
    is handled once."""
    monkeypatch.setattr(store, "RECENT_EVENTS", 1)  # memory keeps only the newest: the follower must ask the database
    eventlog = await open_log(settings)
    try:
        await ping(eventlog, 1)
        follower = Recorder(eventlog, concurrency=8)  # room for more than one event: pages come back short
        assert await follower.run_until_idle() == 1
        await ping(eventlog, 2, 3, 4)  # committed and unread, so the follower has a reason to read
        assert eventlog.read_recent(follower.checkpoint, Recorder.types, 8) is None  # and memory cannot answer
        started, release = threading.Event(), threading.Event()

        def hold_the_writer() -> None:
            started.set()
            release.wait(timeout=30)

        holding = asyncio.ensure_future(eventlog.commit([], apply=hold_the_writer))
        await helpers.eventually(started.is_set, "the writer thread to be held")
        queue = eventlog._writer._work_queue  # the writer's FIFO of pending jobs
        appending = asyncio.ensure_future(eventlog.append("s5", [SpinePinged(n=5)]))
        await helpers.eventually(lambda: queue.qsize() == 1, "the append to queue behind the held writer")
        following = asyncio.ensure_future(follower.run_until_idle())  # notes head, then queues its read
        await helpers.eventually(lambda: queue.qsize() == 2, "the follower's read to queue behind the append")
        release.set()
        await asyncio.gather(holding, appending)
        await following
        await follower.run_until_idle()
        assert follower.calls == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
        assert pongs(helpers, settings) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    finally:
        await eventlog.close()


class Deferring(Recorder):
    """Answers ping 1 with a long Retry on its first attempt; handles every other ping at once."""

    name = "test.deferring"

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        if record.event.n == 1 and attempt == 1:  # type: ignore[attr-defined]
            self.calls.append((1, attempt))
            raise Retry(defer=0.5)
        return await super().handle(record, attempt)


async def test_a_waiting_retry_does_not_hold_a_slot(settings: Settings, helpers: Any) -> None:
    """With one slot, a later event is handled while an earlier one waits out its Retry, and the checkpoint waits."""
    eventlog = await open_log(settings)
    try:
        follower = Deferring(eventlog, concurrency=1)
        task = asyncio.create_task(follower.run())
        first, second = await ping(eventlog, 1, 2)
        await helpers.eventually(lambda: (2, 1) in follower.calls, "ping 2 to be handled during ping 1's wait")
        assert follower.calls[:2] == [(1, 1), (2, 1)]
        assert follower.checkpoint < first  # ping 1 is not done, so nothing at or after it is checkpointed
        assert await follower.wait_for(second, timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert follower.calls == [(1, 1), (2, 1), (1, 2)]
        assert pongs(helpers, settings) == {1: 1, 2: 1}
    finally:
        await eventlog.close()


class Batcher(Recorder):
    """A lingering view-like follower that notes which positions each commit carried."""

    name = "test.batcher"
    ordered = True

    def __init__(self, eventlog: EventLog, batch_window: float) -> None:
        super().__init__(eventlog, concurrency=100)
        self.batch_window = batch_window  # type: ignore[misc]
        self.writing: list[int] = []
        self.commits: list[list[int]] = []

    def update_tables(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        self.writing += [record.position for record, _ in finished]

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        if self.writing:
            self.commits.append(self.writing)
            self.writing = []


async def test_a_lingering_follower_commits_a_burst_of_events_together(settings: Settings) -> None:
    """Events appended one by one within the batch_window are read and committed in one transaction."""
    eventlog = await open_log(settings)
    try:
        follower = Batcher(eventlog, batch_window=1.0)
        task = asyncio.create_task(follower.run())
        (first,) = await ping(eventlog, 1)
        assert await follower.wait_for(first)  # now idle, waiting for a wake-up
        positions = await ping(eventlog, 2, 3, 4, 5, 6)

        async def caught_up() -> bool:
            return follower.checkpoint >= positions[-1]

        await eventually(caught_up, "the follower to commit the burst")
        assert follower.commits == [[first], positions]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


async def test_wait_for_cuts_a_linger_short(settings: Settings) -> None:
    """Someone waiting for a position does not wait out the batch_window (an upload's read-your-writes)."""
    eventlog = await open_log(settings)
    try:
        follower = Batcher(eventlog, batch_window=60.0)
        task = asyncio.create_task(follower.run())
        (first,) = await ping(eventlog, 1)
        assert await follower.wait_for(first, timeout=10) is True  # now idle, waiting for a wake-up
        (second,) = await ping(eventlog, 2)  # wakes it: it would batch_window for a minute
        assert await follower.wait_for(second, timeout=10) is True
        assert follower.commits == [[first], [second]]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


async def test_end_window_cuts_a_linger_short(settings: Settings) -> None:
    """A follower that ends its own batch_window (its workers about to run dry) commits at once."""
    eventlog = await open_log(settings)
    try:
        follower = Batcher(eventlog, batch_window=60.0)
        task = asyncio.create_task(follower.run())
        (first,) = await ping(eventlog, 1)
        assert await follower.wait_for(first, timeout=10)  # now idle, waiting for a wake-up
        (second,) = await ping(eventlog, 2)  # wakes it: it would linger for a minute

        async def committed() -> bool:
            follower.end_window()  # again until it lands: a window opened after the call would not see it
            return follower.commits == [[first], [second]]

        await eventually(committed, "the commit of ping 2 without waiting out the window", timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


class Gathering(Batcher):
    """A Batcher that also ends its linger at two finished events; it lingers only once told to."""

    batch_size = 2

    def __init__(self, eventlog: EventLog, gates: dict[int, asyncio.Event]) -> None:
        super().__init__(eventlog, batch_window=60.0)
        self.gates = gates
        self.hurry = True

    def in_a_hurry(self) -> bool:
        return self.hurry


async def test_a_linger_ends_once_batch_size_events_are_finished(settings: Settings, helpers: Any) -> None:
    """A follower with a batch_size commits as soon as that many events are finished, not after its window."""
    eventlog = await open_log(settings)
    try:
        gates = {1: asyncio.Event(), 2: asyncio.Event()}
        follower = Gathering(eventlog, gates)
        task = asyncio.create_task(follower.run())
        positions = await ping(eventlog, 1, 2)
        await helpers.eventually(lambda: len(follower.calls) == 2, "both pings to be in hand")
        follower.hurry = False  # every wake-up from now on would linger for a minute
        gates[1].set()
        await helpers.eventually(lambda: len(follower._state.done) == 1, "ping 1 to finish")
        gates[2].set()
        await helpers.eventually(lambda: follower.commits == [positions], "both pings committed together", timeout=10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


class Passer(Recorder):
    """Passes the odd pings by (another daemon's work), answers the even ones."""

    name = "test.passer"

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        if record.event.n % 2:  # type: ignore[attr-defined]
            self.calls.append((record.event.n, attempt))  # type: ignore[attr-defined]
            raise Passed
        return await super().handle(record, attempt)


async def test_a_passed_event_gets_no_tracking_record_and_is_passed_again_after_a_restart(settings: Settings,
                                                                                          helpers: Any) -> None:
    """Passed events are not committed: the checkpoint moves past them in memory, and in the database with the next
    commit; those after the last commit are read again after a restart, and passed again."""
    eventlog = await open_log(settings)
    positions = await ping(eventlog, 1, 2, 3)
    follower = Passer(eventlog)
    assert await follower.run_until_idle() == 3
    assert follower.checkpoint == eventlog.head  # past ping 3 and the pong of ping 2
    assert tracking(helpers, settings, Passer.name) == (positions[1], [])  # the commit of ping 2, nothing of 3
    await eventlog.close()

    eventlog = await open_log(settings)
    try:
        again = Passer(eventlog)
        assert await again.run_until_idle() == 1
        assert again.calls == [(3, 1)]
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {2: 1}


class Admitting(Recorder):
    """Admits only the even pings (the odd ones are another daemon's work), noting each page it was offered."""

    name = "test.admitting"

    def __init__(self, eventlog: EventLog) -> None:
        super().__init__(eventlog, concurrency=10)
        self.offered: list[list[int]] = []

    async def admit(self, records: list[RecordedEvent]) -> list[RecordedEvent]:
        self.offered.append([r.event.n for r in records])  # type: ignore[attr-defined]
        return [r for r in records if r.event.n % 2 == 0]  # type: ignore[attr-defined]


async def test_events_not_admitted_are_never_handled_and_the_checkpoint_moves_past_them(settings: Settings,
                                                                                        helpers: Any) -> None:
    """A page's events that `admit` leaves out get no handling and no tracking record, as if Passed, and the
    checkpoint moves past them."""
    eventlog = await open_log(settings)
    try:
        positions = await ping(eventlog, 1, 2, 3)
        follower = Admitting(eventlog)
        assert await follower.run_until_idle() == 3
        assert follower.offered == [[1, 2, 3]]
        assert follower.calls == [(2, 1)]
        assert follower.checkpoint == eventlog.head
        assert tracking(helpers, settings, Admitting.name) == (positions[2], [])  # ping 2's commit, past ping 3
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {2: 1}


class Untidy(Recorder):
    """A follower whose clean-up after the commit fails for ping 1 on the writer thread, for ping 2 on the loop."""

    name = "test.untidy"

    def __init__(self, eventlog: EventLog) -> None:
        super().__init__(eventlog)
        self.announced: list[int] = []

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        if record.event.n == 2:  # type: ignore[attr-defined]
            raise ConnectionResetError("the listener hung up")
        self.announced.append(record.event.n)  # type: ignore[attr-defined]



async def test_a_failed_clean_up_after_the_commit_is_logged_and_not_committed_again(settings: Settings,
                                                                                     helpers: Any) -> None:
    """`committed` raising does not undo or repeat the commit it follows, nor stop the follower: one pong each, the
    failure logged."""
    eventlog = await open_log(settings)
    try:
        await ping(eventlog, 1, 2)
        follower = Untidy(eventlog)
        with capture_logs() as logs:
            assert await follower.run_until_idle() == 2
        assert follower.announced == [1] and follower.checkpoint == eventlog.head
    finally:
        await eventlog.close()
    assert pongs(helpers, settings) == {1: 1, 2: 1}
    assert [(e["event"], e["consumer"], e["position"]) for e in logs if e["log_level"] == "error"] == [
        ("consumer_cleanup_failed", "test.untidy", 2)]


async def test_a_follower_that_fails_outside_handle_logs_it_and_carries_on(settings: Settings, helpers: Any) -> None:
    """An event that does not decode fails the follower's read: it is logged, and once the row is repaired the
    same follower task handles it and everything after it."""
    eventlog = await open_log(settings)
    try:
        follower = Recorder(eventlog)
        with capture_logs() as logs:
            task = asyncio.create_task(follower.run())
            # Written behind the log's back: a bad row.
            helpers.execute(settings, "INSERT INTO events (stream, version, type, data, recorded_at) "
                                      "VALUES ('bad', 1, 'SpinePinged', '{not json', '2026-01-01T00:00:00Z')")
            (position,) = await ping(eventlog, 2)
            await eventually(lambda: asyncio.sleep(0, [e for e in logs if e["event"] == "consumer_failed"]),
                             "the failure's log line")
            assert not task.done()
            helpers.execute(settings, "UPDATE events SET data = '{\"n\": 1}' WHERE stream = 'bad'")
            assert await follower.wait_for(position, timeout=10)
        assert not task.done()
        assert [n for n, _ in follower.calls] == [1, 2]
        failed = next(e for e in logs if e["event"] == "consumer_failed")
        assert (failed["consumer"], failed["failures"], failed["log_level"]) == ("test.recorder", 1, "error")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await eventlog.close()


def first_commit_lands_then_reports_a_lost_connection(eventlog: EventLog,
                                                     monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make the follower's first commit land, then raise as a lost connection would; the list fills when it did."""
    landed: list[bool] = []
    commit = eventlog.commit

    async def lands_then_reports_a_lost_connection(*args: Any, **kwargs: Any) -> bool:
        result = await commit(*args, **kwargs)
        if not landed:
            landed.append(True)
            raise peewee.OperationalError("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(eventlog, "commit", lands_then_reports_a_lost_connection)
    return landed


async def test_a_commit_that_landed_though_it_reported_a_failure_is_not_made_again(
        settings: Settings, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit whose connection dropped after it landed is tried again alone, found in the tracking record and not
    repeated, also when another event finished meanwhile: one pong per ping."""
    eventlog = await open_log(settings)
    gates = {1: asyncio.Event(), 2: asyncio.Event()}
    follower = Recorder(eventlog, gates=gates, concurrency=8)
    landed = first_commit_lands_then_reports_a_lost_connection(eventlog, monkeypatch)
    task = asyncio.create_task(follower.run())
    try:
        _, second = await ping(eventlog, 1, 2)
        await helpers.eventually(lambda: follower.running == 2, "both pings in flight")
        gates[1].set()
        await helpers.eventually(lambda: landed, "ping 1's commit to land and report a failure")
        gates[2].set()  # ping 2 finishes while ping 1's commit waits to be tried again
        assert await follower.wait_for(second, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventlog.close()
    assert pongs(helpers, settings) == {1: 1, 2: 1}


class Interim(Recorder):
    """Answers ping 1 first with an interim pong (an attempt, as a Retry records it), then with the final one."""

    name = "test.interim"

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        if attempt == 1:
            raise Retry(defer=0.01, events=(SpinePonged(n=record.event.n, note="attempt 1"),))  # type: ignore[attr-defined]
        return (SpinePonged(n=record.event.n, note="final"),)  # type: ignore[attr-defined]


async def test_an_interim_commit_that_landed_though_it_reported_a_failure_is_not_made_again(
        settings: Settings, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interim events (an attempt) whose commit landed but reported a lost connection are found in the log and not
    appended twice."""
    eventlog = await open_log(settings)
    follower = Interim(eventlog)
    landed = first_commit_lands_then_reports_a_lost_connection(eventlog, monkeypatch)
    task = asyncio.create_task(follower.run())
    try:
        (position,) = await ping(eventlog, 1)
        assert await follower.wait_for(position, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventlog.close()
    notes = [data["note"] for _, _, _, kind, data in helpers.stored_events(settings) if kind == "SpinePonged"]
    assert landed == [True]  # the interim commit did land and report a failure
    assert notes == ["attempt 1", "final"]
