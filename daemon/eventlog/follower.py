"""Consumers of the event log: read after a checkpoint, handle, commit results and checkpoint together.

A follower handles up to `concurrency` events at once. Whatever it appends (and, for views, whatever
it writes to its own tables) is committed in the same transaction as its tracking record, so after a
crash it redoes exactly the events whose results were not committed, and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from daemon.diskspace import is_disk_full
from daemon.eventlog.models import execute, placeholders
from daemon.eventlog.store import DatabaseAway, EventLog, RecordedEvent, Tracking
from daemon.events import Event

log = structlog.get_logger("follower")
FAILURES_FORGOTTEN_AFTER = 60.0  # seconds without a failure after which the pause starts short again
LAG_WARNING = 5.0  # seconds a writer waits for a follower before the wait is logged as lag
ELSEWHERE_POLL = 0.05  # seconds between looks at the stored tracking of a consumer running in another daemon
FENCED_PAUSE = 0.5  # seconds a fenced consumer waits before it tries its commit again (if it is not stopped first)


class LeaseLost(Exception):
    """Raised by `guard` in the commit's transaction: the work of these positions passed to another daemon, so
    their results must not be committed (the commit is made again without them)."""

    def __init__(self, positions: set[int]) -> None:
        super().__init__(f"claims lost for positions {sorted(positions)}")
        self.positions = positions


class Fenced(Exception):
    """Raised by a follower's `fence` in the commit's transaction: this daemon may not commit for the consumer now
    (another daemon may be running it); nothing was written, and whoever runs the consumer here stops it soon."""


class Passed(Exception):
    """Raised by `handle`: the event is another daemon's work. Nothing was done and nothing needs recording: it
    gets no tracking record of its own (the next commit's checkpoint moves past it), and were it read again after
    a restart, it would be passed again."""


@dataclass(frozen=True)
class Retry(Exception):
    """Raised by `handle`: commit `events` now (without finishing), then handle again after `defer` s."""

    defer: float
    events: tuple[Event, ...] = ()


@dataclass(eq=False)  # compared by identity: field-wise equality made each commit quadratic
class _Outcome:
    record: RecordedEvent
    results: Sequence[Event]
    final: bool = True
    committed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _State:
    in_flight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    done: list[_Outcome] = field(default_factory=list)
    handled: int = 0
    failed_commits: int = 0
    unsure: list[_Outcome] = field(default_factory=list)  # the last failed commit's batch: it may have landed
    deferred: set[int] = field(default_factory=set)  # in flight but only waiting for a Retry's defer


class Follower:
    """Base for stages (side effects, concurrent) and views (pure folds, ordered)."""

    name: str  # the consumer's tracking name; a per-daemon consumer adds its node (daemon.cluster)
    types: ClassVar[frozenset[str]]
    concurrency: int = 1
    ordered: ClassVar[bool] = False  # views: commit strictly in log order
    page_size: ClassVar[int] = 500
    # Seconds to wait after a wake-up for more events to arrive, so a follower that takes every event
    # (views) reads and commits them in batches rather than one transaction per event. Skipped while
    # someone waits in `wait_for`, while `in_a_hurry()`, and in burst mode.
    batch_window: ClassVar[float] = 0.0
    batch_size: ClassVar[int] = 0  # the window also ends once this many events are finished (0: only by time)

    def __init__(self, eventlog: EventLog) -> None:
        self.eventlog = eventlog
        self.space = eventlog.space
        self._wake = asyncio.Event()  # set by appends of `types` while the follower runs (and subscribes)
        self._subscribed = False
        self._state = _State()
        self._cursor = 0
        self._checkpoint = 0
        self._skip: set[int] = set()
        self._tracked: set[int] = set()  # positions with a tracking row (all above the stored checkpoint)
        self._loaded = False
        self.head_at_start = 0
        self._progress = asyncio.Condition()
        self._waiters = 0
        self._bursts = False  # driven by run_until_idle (tests, replay), not by run
        self._window_cut = asyncio.Event()  # ends a batch window early
        # True while this consumer runs in another daemon on the same database (daemon.cluster): `caught_up`
        # then waits on its stored tracking instead of this idle copy.
        self.elsewhere = False
        # Run in every commit's transaction, raising Fenced to refuse it (daemon.cluster: the leader's consumers).
        self.fence: Callable[[], None] | None = None
        # The daemon whose events of `types` this follower takes, when it takes only one's (Event.addressee): another
        # daemon's appends of events addressed elsewhere are then not read for it. None: every event of `types`.
        self.addressee: str | None = None

    # what subclasses write ---------------------------------------------------------------------
    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        """Do the work for one event; return events to append to its stream. May raise Retry."""
        return ()

    def update_tables(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        """Synchronous writes to the follower's own tables for `finished` (events and their results, in log order),
        inside the commit transaction (views)."""

    async def admit(self, records: list[RecordedEvent]) -> list[RecordedEvent]:
        """Of a page just read, the events to handle here; the others are another daemon's work, passed by as with
        `Passed` but before a task is made for them."""
        return records

    def guard(self, finished: Sequence[tuple[RecordedEvent, Sequence[Event]]]) -> None:
        """In the commit's transaction, before the tables (writer thread): raise LeaseLost for results that must
        not be committed."""

    @property
    def guarded(self) -> bool:
        return type(self).guard is not Follower.guard or self.fence is not None

    @property
    def has_tables(self) -> bool:
        """Whether this follower has tables of its own to write in its commits."""
        return type(self).update_tables is not Follower.update_tables

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        """After the commit: clean-up that must not happen before the results are durable."""

    async def recover(self) -> None:
        """Once at start: finish clean-up that a crash interrupted after a commit."""

    def in_a_hurry(self) -> bool:
        """True while batching by `batch_window` would hold up something someone waits for (checked on each wake-up)."""
        return False

    def end_window(self) -> None:
        """End the batch window now, if one is open: what `in_a_hurry` watches has changed (loop)."""
        self._window_cut.set()

    def startable(self, busy: int, deferred: int = 0) -> int:
        """How many more events to start now, with `busy` in flight and `deferred` more waiting to try again
        (which by default hold no slot: a dead webhook listener must not block the others)."""
        return self.concurrency - busy

    # running ---------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> int:
        return self._checkpoint

    @property
    def done_above_checkpoint(self) -> int:
        """Events finished after the checkpoint: one before them is still in flight (a webhook waiting to retry)."""
        return len(self._tracked)

    def wake(self) -> None:
        """Look at the log again now: something other than an append may have made room."""
        self._wake.set()

    async def run(self) -> None:
        """Follow the log forever (until cancelled). A failure outside `handle` and the commit (a read, start-up
        recovery, an event that does not decode) is logged and the loop resumes after a growing pause: a
        follower that quietly ended would leave every request behind it waiting for ever. An unreachable database
        is no failure of ours: the store logs it once, and the loop waits for the database."""
        failures, last_failure = 0, 0.0
        try:
            while True:
                try:
                    await self._loop(until_idle=False)
                except DatabaseAway:
                    await self.eventlog.reachable()
                except Exception:
                    now = time.monotonic()
                    failures = 1 if now - last_failure > FAILURES_FORGOTTEN_AFTER else failures + 1
                    last_failure = now
                    delay = min(30.0, 0.1 * 2 ** min(failures, 9))
                    log.exception("consumer_failed", consumer=self.name, failures=failures, retry_in=delay)
                    await asyncio.sleep(delay)
        finally:
            await self._cancel_in_flight()

    async def run_until_idle(self) -> int:
        """Burst mode: handle everything there is, wait for in-flight work, return how many events."""
        self._bursts = True
        before = self._state.handled
        await self._loop(until_idle=True)
        return self._state.handled - before

    async def wait_for(self, position: int, timeout: float = 10.0) -> bool:
        """Wait until everything up to `position` is committed (read-your-writes for views).

        A follower driven in burst mode is not waited for: nothing would move it meanwhile.
        """
        if self._bursts:
            return self._checkpoint >= position
        self._waiters += 1
        self._window_cut.set()
        # The position may hold an event of a type this follower does not take, whose append did not wake it:
        # looking at the log once moves the cursor (and with nothing in flight, the checkpoint) past it.
        self._wake.set()
        try:
            async with self._progress:
                try:
                    await asyncio.wait_for(self._progress.wait_for(lambda: self._checkpoint >= position), timeout)
                except TimeoutError:
                    return False
            return True
        finally:
            self._waiters -= 1

    async def caught_up(self, position: int) -> None:
        """Wait, however long it takes, until everything up to `position` is committed: a write endpoint answers
        only once its effect shows. Each LAG_WARNING seconds of waiting is logged as lag."""
        waited = 0.0
        while not await self._reached(position, LAG_WARNING):
            if self._bursts:
                return  # driven by a test in bursts: nothing moves it while we wait
            waited += LAG_WARNING
            log.warning("consumer_lagging", consumer=self.name, position=position, checkpoint=self._checkpoint,
                        waited_s=waited)

    async def _reached(self, position: int, timeout: float) -> bool:
        """Whether everything up to `position` is committed within `timeout`, here or by the daemon running this
        consumer (which may change hands meanwhile)."""
        if self._bursts:
            return await self.wait_for(position)
        deadline = time.monotonic() + timeout
        while True:
            if not self.elsewhere:
                if await self.wait_for(position, timeout=min(ELSEWHERE_POLL * 10, timeout)):
                    return True
            elif await self.eventlog.query(_passed_sync, self.name, self.types, position):
                return True
            else:
                await asyncio.sleep(ELSEWHERE_POLL)
            if time.monotonic() >= deadline:
                return False

    def reset(self) -> None:
        """Forget the in-memory progress, so `run` starts again from the stored tracking (a consumer that runs
        again after it ran in another daemon)."""
        self._unsubscribe()
        self._state = _State()
        self._wake = asyncio.Event()
        self._loaded = False
        self._cursor = self._checkpoint = 0
        self._skip, self._tracked = set(), set()

    async def _load(self) -> None:
        if not self._subscribed:  # from the first run on: a follower that does not run here wants no events read
            self.eventlog.subscribe(self.types, self._wake, self.addressee)
            self._subscribed = True
        if self._loaded:
            return
        self._checkpoint, self._skip = await self.eventlog.load_tracking(self.name)
        self._tracked = set(self._skip)
        self.head_at_start = self.eventlog.head  # events up to here may have been half handled before a restart
        self._cursor = self._checkpoint
        await self.recover()
        self._loaded = True

    async def _loop(self, until_idle: bool) -> None:
        await self._load()
        state = self._state
        while True:
            self._wake.clear()
            await self._commit()
            free = self.startable(len(state.in_flight) - len(state.deferred), len(state.deferred))
            page: list[RecordedEvent] = []
            # Woken but nothing new in the log since the last read: no query.
            if free > 0 and self.eventlog.head > self._cursor:
                head = self.eventlog.head
                limit = min(free, self.page_size)
                page = await self.eventlog.read_after(self._cursor, self.types, limit, self.addressee)
                fresh = [record for record in page if record.position not in self._skip]
                self._skip.difference_update(record.position for record in page)
                admitted = await self.admit(fresh) if fresh else fresh
                for record in admitted:
                    self._start(record)
                state.handled += len(fresh) - len(admitted)
                # Everything up to `head` was committed before the read, so a short page saw all of it.
                last = page[-1].position if page else self._cursor
                self._cursor = max(head, last) if len(page) < limit else last
                if not state.in_flight and not state.done and self._cursor > self._checkpoint:
                    # Nothing of ours up to the cursor is pending; the mark moves without a write.
                    await self._advance(self._cursor)
            if page:
                continue
            if until_idle and not state.in_flight and not state.done:
                return
            await self._wake.wait()
            if self.batch_window and not until_idle:
                await self._gather_batch()

    async def _gather_batch(self) -> None:
        if self._waiters or self.in_a_hurry() or self._batch_full():
            return
        self._window_cut.clear()
        try:
            async with asyncio.timeout(self.batch_window):
                await self._window_cut.wait()
        except TimeoutError:
            pass

    def _start(self, record: RecordedEvent) -> None:
        if record.position in self._state.in_flight:
            return
        task = asyncio.create_task(self._work(record), name=f"{self.name}:{record.position}")
        self._state.in_flight[record.position] = task

    async def _work(self, record: RecordedEvent) -> None:
        attempt = 1
        while True:
            try:
                results = await self.handle(record, attempt)
            except Retry as retry:
                if retry.events:
                    interim = _Outcome(record, retry.events, final=False)
                    self._finish(interim)
                    await interim.committed.wait()  # the next attempt must see these in the log
                # A waiting retry gives its slot back (a dead webhook listener must not block the others);
                # it stays in flight, so the checkpoint does not pass it.
                self._state.deferred.add(record.position)
                self._wake.set()
                try:
                    await asyncio.sleep(retry.defer)
                finally:
                    self._state.deferred.discard(record.position)
                attempt += 1
                continue
            except Passed:
                await self._pass(record.position)
                return
            except asyncio.CancelledError:
                raise
            except DatabaseAway:  # not the event's fault: no attempt spent, logged once by the store
                await self.eventlog.reachable()
                continue
            except Exception:
                # A bug, not bad input (stages turn bad input into failure events): log, back off, redo.
                log.exception("consumer_error", consumer=self.name, position=record.position, attempt=attempt)
                await asyncio.sleep(min(60.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
                attempt += 1
                continue
            self._finish(_Outcome(record, results))
            return

    async def _pass(self, position: int) -> None:
        # No commit: the in-memory mark moves up to whatever of ours is still in flight (finished or not).
        state = self._state
        del state.in_flight[position]
        state.handled += 1
        self._wake.set()
        await self._advance(min(state.in_flight, default=self._cursor + 1) - 1)

    def _finish(self, done: _Outcome) -> None:
        self._state.done.append(done)
        self._wake.set()
        if self._batch_full():
            self._window_cut.set()

    def _batch_full(self) -> bool:
        return 0 < self.batch_size <= len(self._state.done)

    async def _commit(self) -> None:
        state = self._state
        if not state.done:
            return
        if state.unsure:
            # Tried again alone: a batch with more in it would have a tracking record of its own that says nothing
            # of whether this one landed, and would commit it twice if it had.
            ready = state.unsure
        else:
            ready = sorted(state.done, key=lambda d: d.record.position)
            if self.ordered:
                finishing = {d.record.position for d in ready if d.final}
                first_waiting = min((p for p in state.in_flight if p not in finishing), default=None)
                if first_waiting is not None:
                    ready = [d for d in ready if d.record.position < first_waiting]
            if not ready:
                return
        if len(ready) == len(state.done):
            state.done = []
        else:
            taken = {id(d) for d in ready}
            state.done = [d for d in state.done if id(d) not in taken]
        finished = [d.record.position for d in ready if d.final]
        finished_set = set(finished)
        checkpoint = min((p for p in state.in_flight if p not in finished_set), default=self._cursor + 1) - 1
        prune = any(p <= checkpoint for p in self._tracked)

        results = [(done.record.stream, done.results) for done in ready]
        tracking = Tracking(self.name, checkpoint, tuple(finished), prune)

        def apply() -> None:
            finished_now = [(done.record, done.results) for done in ready if done.final]
            if self.fence is not None:
                self.fence()
            self.guard(finished_now)
            self.update_tables(finished_now)

        try:
            # After a failed try its outcome may be unknown (a lost connection): the store checks the tracking record.
            await self.eventlog.commit(results, tracking, apply if self.has_tables or self.guarded else None,
                                       verify=state.failed_commits > 0)
        except LeaseLost as lost:  # nothing was written: commit again without the results of the lost work
            for done in ready:
                if done.record.position in lost.positions:
                    log.warning("claim_lost", consumer=self.name, request_id=done.record.stream,
                                position=done.record.position, dropped=[e.type for e in done.results])
                    done.results = ()
            state.done = ready + state.done
            self._wake.set()
            return
        except Fenced as exc:  # not a failure: the daemon lost the right to run this consumer, and stops it
            state.done = ready + state.done
            log.info("consumer_fenced", consumer=self.name, reason=str(exc))
            await asyncio.sleep(FENCED_PAUSE)
            self._wake.set()
            return
        except Exception as exc:
            # Nothing of it was written: keep the results and try the commit again later.
            state.done = ready + state.done
            if is_disk_full(exc):  # not a failure of ours: wait for room, logged once by the DiskSpace
                await self.space.pause("database")
                self._wake.set()
                return
            state.failed_commits += 1
            state.unsure = ready
            if isinstance(exc, DatabaseAway):  # logged once by the store; the next try checks the tracking record
                await self.eventlog.reachable()
                self._wake.set()
                return
            log.exception("consumer_commit_failed", consumer=self.name, events=len(ready),
                          failures=state.failed_commits)
            await asyncio.sleep(min(30.0, 0.1 * 2 ** min(state.failed_commits, 8)))
            self._wake.set()
            return
        state.failed_commits = 0
        if state.unsure:
            state.unsure = []
            if state.done:  # what finished meanwhile woke the loop once already: commit it now
                self._wake.set()
        self._tracked = {p for p in (*self._tracked, *finished) if p > checkpoint}
        for position in finished:
            state.in_flight.pop(position, None)
        for done in ready:
            done.committed.set()
            if done.final:
                try:
                    await self.committed(done.record, done.results)
                except Exception:  # committed: it must not be redone, and the loop must go on
                    log.exception("consumer_cleanup_failed", consumer=self.name, position=done.record.position)
        state.handled += len(finished)
        await self._advance(checkpoint)

    async def _advance(self, checkpoint: int) -> None:
        self._checkpoint = max(self._checkpoint, checkpoint)
        async with self._progress:
            self._progress.notify_all()

    async def _cancel_in_flight(self) -> None:
        tasks = list(self._state.in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._state.in_flight.clear()
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        if self._subscribed:
            self.eventlog.unsubscribe(self._wake)
            self._subscribed = False


def _passed_sync(consumer: str, types: frozenset[str], position: int) -> bool:
    """(reader thread) Whether `consumer`'s stored tracking covers every event of `types` up to `position`."""
    wanted = sorted(types)
    row = execute(
        "SELECT NOT EXISTS (SELECT 1 FROM events e WHERE e.position <= ? AND e.position > "
        "COALESCE((SELECT c.position FROM checkpoints c WHERE c.consumer = ?), 0) "
        f"AND e.type IN ({placeholders(len(wanted))}) "
        "AND NOT EXISTS (SELECT 1 FROM tracking t WHERE t.consumer = ? AND t.position = e.position))",
        (position, consumer, *wanted, consumer)).fetchone()
    return bool(row[0])


async def run_until_idle(followers: Sequence[Follower]) -> int:
    """Run every follower in burst mode until a whole round handles nothing (tests, replay)."""
    total = 0
    while True:
        handled = 0
        for follower in followers:
            handled += await follower.run_until_idle()
        total += handled
        if handled == 0:
            return total
