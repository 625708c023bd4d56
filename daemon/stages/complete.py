"""Complete stage: when every image of a request is terminal, RequestCompleted records the outcome.

A pure function of the log: per request it counts terminal image events in log order (the counts are
rebuilt from the log for a request first seen after a restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import peewee

from daemon.eventlog.follower import Follower
from daemon.eventlog.models import StoredEvent
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import (
    IMAGE_TERMINAL,
    Event,
    ImageFailed,
    RequestAccepted,
    RequestCompleted,
    decode,
)
from daemon.stages.bodies import Bodies

LAST_FEW = 4  # a request this close to done is not batched with others: a few more commits, no waiting


@dataclass
class _Tally:
    images: int
    done: int = 0
    failed: int = 0
    completed: bool = False


def final_status(images: int, failed: int) -> str:
    if failed == 0:
        return "completed"
    return "failed" if failed == images else "completed_with_errors"


class CompleteStage(Follower):
    name = "stage.complete"
    types = IMAGE_TERMINAL
    # Many at once so commits are batched; a per-request lock keeps each request's counts in log order.
    concurrency = 500
    ordered = True
    linger = 0.05  # batch image events, but not a request's last ones (see `urgent`)

    def __init__(self, eventlog: EventLog, bodies: Bodies) -> None:
        super().__init__(eventlog)
        self.bodies = bodies
        self._tallies: dict[str, _Tally] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def urgent(self) -> bool:
        # A request's completion, and with it the webhook and outbox, would otherwise wait for the linger
        # twice: before its last image event is read, and again before the RequestCompleted is committed.
        return any(t.images - t.done - t.failed <= LAST_FEW for t in self._tallies.values())

    def _tally_before(self, stream: str, position: int) -> _Tally:
        """The tally of `stream` from the log, up to (not including) `position` (writer thread)."""
        opening = StoredEvent.get((StoredEvent.stream == stream) & (StoredEvent.version == 1))
        accepted = decode(opening.type, opening.data)
        assert isinstance(accepted, RequestAccepted)
        query = (StoredEvent.select(StoredEvent.type, peewee.fn.COUNT(StoredEvent.position))
                 .where((StoredEvent.stream == stream) & (StoredEvent.position < position)
                        & StoredEvent.type.in_([*IMAGE_TERMINAL, "RequestCompleted"]))
                 .group_by(StoredEvent.type).tuples())
        counts = dict(cast(Iterable[tuple[str, int]], query))  # .tuples(): (type, count) rows
        failed = counts.get("ImageFailed", 0)
        return _Tally(accepted.image_count, done=sum(counts.get(t, 0) for t in IMAGE_TERMINAL) - failed,
                      failed=failed, completed=bool(counts.get("RequestCompleted")))

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        # Tasks reach the lock in the order they were started, which is log order.
        async with self._locks.setdefault(record.stream, asyncio.Lock()):
            return self._count(record, self._tallies.get(record.stream) or await self._first_tally(record))

    async def _first_tally(self, record: RecordedEvent) -> _Tally:
        tally = await self.eventlog.write(self._tally_before, record.stream, record.position)
        self._tallies[record.stream] = tally
        return tally

    def _count(self, record: RecordedEvent, tally: _Tally) -> Sequence[Event]:
        if isinstance(record.event, ImageFailed):
            tally.failed += 1
        else:
            tally.done += 1
        if tally.completed or tally.done + tally.failed < tally.images:
            return ()
        tally.completed = True
        return [RequestCompleted(status=final_status(tally.images, tally.failed), images=tally.images,
                                 done=tally.done, failed=tally.failed)]

    async def recover(self) -> None:
        """Remove the download folders of requests that completed just before a crash."""
        folders = [p.name for p in await asyncio.to_thread(self.bodies.request_folders)]

        def completed(request_ids: list[str]) -> list[str]:
            return [r for r in request_ids if StoredEvent.select().where(
                (StoredEvent.stream == r) & (StoredEvent.type == "RequestCompleted")).exists()]

        for request_id in await self.eventlog.read(completed, folders):
            await self.bodies.remove_request(request_id)

    async def committed(self, record: RecordedEvent, results: Sequence[Event]) -> None:
        if results:
            self._tallies.pop(record.stream, None)
            self._locks.pop(record.stream, None)
            await self.bodies.remove_request(record.stream)
