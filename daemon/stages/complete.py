"""Complete stage: when every image of a request is terminal, RequestCompleted records the outcome.

A pure function of the log: per request it folds terminal image events, retries and cancellations in log order
(the tally is rebuilt from the log for a request first seen after a restart, or again after a retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import (
    IMAGE_TERMINAL,
    Event,
    ImageCompressed,
    ImageFailed,
    RequestAccepted,
    RequestCancelRequested,
    RequestCompleted,
    RequestRetried,
    names,
)
from daemon.stages.bodies import Bodies

# A request this close to done is not batched with others: a few more commits, no waiting. Its last images arrive
# a compress commit at a time (up to 8 each, from each daemon): a smaller margin let the linger start just before
# the last commits and hold the completion back by up to the whole batch_window.
LAST_FEW = 32
COUNTED = IMAGE_TERMINAL | names(RequestCancelRequested, RequestRetried)
TALLIED = COUNTED | names(RequestAccepted, RequestCompleted)


@dataclass
class RequestTally:
    images: int
    done: int = 0
    failed: int = 0
    completed: bool = False

    def count(self, event: Event) -> RequestCompleted | None:
        """Fold one event in; the completion it brings about, if any."""
        if isinstance(event, ImageCompressed):
            self.done += 1
        elif isinstance(event, ImageFailed):
            self.failed += 1
        elif isinstance(event, RequestRetried):  # its failed images are open again
            self.failed -= len(event.images)
            self.completed = False
            return None
        elif isinstance(event, RequestCompleted):
            self.completed = True
            return None
        if self.completed:
            return None  # an image that finished after a cancellation: counted, the request stays as it ended
        if isinstance(event, RequestCancelRequested):
            status = "cancelled"
        elif self.done + self.failed >= self.images:
            status = final_status(self.images, self.failed)
        else:
            return None
        self.completed = True
        return RequestCompleted(status=status, images=self.images, done=self.done, failed=self.failed)


def tally_of(records: Iterable[RecordedEvent]) -> RequestTally:
    """A request's tally folded from its events (the first must be its RequestAccepted)."""
    tally: RequestTally | None = None
    for record in records:
        if isinstance(record.event, RequestAccepted):
            tally = RequestTally(record.event.image_count)
        elif tally is not None:
            tally.count(record.event)
    assert tally is not None, "a request's stream opens with RequestAccepted"
    return tally


def final_status(images: int, failed: int) -> str:
    if failed == 0:
        return "completed"
    return "failed" if failed == images else "completed_with_errors"


def finished(records: Iterable[RecordedEvent]) -> bool:
    """Whether the request's last word is a completion (not a retry that opened it again)."""
    last = None
    for record in records:
        if isinstance(record.event, RequestCompleted | RequestRetried):
            last = record.event
    return isinstance(last, RequestCompleted)


class CompleteStage(Follower):
    name = "stage.complete"
    types = COUNTED
    # Many at once so commits are batched; a per-request lock keeps each request's counts in log order.
    concurrency = 500
    ordered = True
    # Batch image events (each commit is a hop to the writer thread and a transaction), but not a request's last
    # ones (see `in_a_hurry`): nothing else waits for this stage.
    batch_window = 0.2

    def __init__(self, eventlog: EventLog, bodies: Bodies) -> None:
        super().__init__(eventlog)
        self.bodies = bodies
        self._tallies: dict[str, RequestTally] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def reset(self) -> None:
        super().reset()
        self._tallies.clear()  # another daemon completed requests meanwhile: tallies come from the log again
        self._locks.clear()

    def in_a_hurry(self) -> bool:
        # A request's completion, and with it the webhook and outbox, would otherwise wait for the batch_window
        # twice: before its last image event is read, and again before the RequestCompleted is committed.
        return any(t.images - t.done - t.failed <= LAST_FEW for t in self._tallies.values())

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        # Tasks reach the lock in the order they were started, which is log order.
        async with self._locks.setdefault(record.stream, asyncio.Lock()):
            tally = self._tallies.get(record.stream) or await self._first_tally(record)
            completion = tally.count(record.event)
            if tally.completed and completion is None:
                self._tallies.pop(record.stream, None)  # an image that finished after a cancellation
                self._locks.pop(record.stream, None)
            return [completion] if completion else ()

    async def _first_tally(self, record: RecordedEvent) -> RequestTally:
        """The tally from the log, up to (not including) `record`."""
        records = await self.eventlog.read_stream(record.stream, TALLIED)
        tally = self._tallies[record.stream] = tally_of(r for r in records if r.position < record.position)
        return tally

    async def recover(self) -> None:
        """Remove the download folders of requests that completed just before a crash."""
        for folder in await asyncio.to_thread(self.bodies.request_folders):
            if finished(await self.eventlog.read_stream(folder.name, names(RequestCompleted, RequestRetried))):
                await self.bodies.remove_request(folder.name)

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        if results:
            self._tallies.pop(record.stream, None)
            self._locks.pop(record.stream, None)
            await self.bodies.remove_request(record.stream)
