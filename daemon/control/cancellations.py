"""Which requests someone asked to stop, known to the stages at once.

The RequestCancelRequested event sits at the head of the log, while a stage busy with a large batch reads far
behind it: stages ask here instead, and a download in flight is dropped the moment its request is cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, RequestCancelRequested, RequestRetried, names

T = TypeVar("T")


class RequestCancelled(Exception):
    """The request of the work in hand was cancelled; the work was dropped."""


class Cancellations:
    def __init__(self, request_ids: Iterable[str] = ()) -> None:
        self._cancelled = set(request_ids)
        self._changed = asyncio.Event()  # set (and replaced) on every cancellation; cancellations are rare

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        self._changed.set()
        self._changed = asyncio.Event()

    def forget(self, request_id: str) -> None:
        """The request runs again (a retry after a cancellation that lost the race to its completion)."""
        self._cancelled.discard(request_id)

    def is_cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    async def unless_cancelled(self, request_id: str, work: Awaitable[T]) -> T:
        """`work`'s result; RequestCancelled, with `work` cancelled, if the request is cancelled first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._until_cancelled(request_id))
        try:
            await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled() and self.is_cancelled(request_id):
            raise RequestCancelled(request_id)
        return task.result()

    async def _until_cancelled(self, request_id: str) -> None:
        while request_id not in self._cancelled:
            await self._changed.wait()


class CancellationsFollower(Follower):
    """With other daemons on the database: cancellations and retries asked of any of them, told to this one's
    stages (the daemon that took the command told its own at once)."""

    name = "control.cancellations"
    types = names(RequestCancelRequested, RequestRetried)
    ordered = True  # a retry after a cancellation runs the request again

    def __init__(self, eventlog: EventLog, cancellations: Cancellations) -> None:
        super().__init__(eventlog)
        self.cancellations = cancellations

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        if isinstance(record.event, RequestCancelRequested):
            self.cancellations.cancel(record.stream)
        else:
            self.cancellations.forget(record.stream)
        return ()
