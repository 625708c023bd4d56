"""Delete stage: RequestDeleted -> the request's files are removed (images, outbox CSV, archived inbox CSV, bodies).

Idempotent: a file already gone is fine, so after a crash the deletion is simply done again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import structlog

from daemon.control.cancellations import Cancellations
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, ImageCompressed, RequestAccepted, RequestDeleted, names
from daemon.ingest.inbox import ARCHIVE
from daemon.stages.bodies import Bodies
from daemon.storage import ImageStore
from daemon.views.export import outbox_name

log = structlog.get_logger("delete")


class DeleteStage(Follower):
    name = "stage.delete"
    types = names(RequestDeleted)
    concurrency = 4

    def __init__(self, eventlog: EventLog, bodies: Bodies, cancellations: Cancellations, images: ImageStore, outbox: Path,
                 inbox: Path) -> None:
        super().__init__(eventlog)
        self.bodies, self.cancellations = bodies, cancellations
        self.images, self.outbox, self.inbox = images, outbox, inbox

    async def handle(self, record: RecordedEvent, attempt: int) -> Sequence[Event]:
        records = await self.eventlog.read_stream(record.stream)
        accepted = records[0].event
        if not isinstance(accepted, RequestAccepted):
            # Purged after every consumer had passed it, while this daemon was away: nothing left to remove here.
            await self.bodies.remove_request(record.stream)
            return ()
        names = [r.event.name for r in records if isinstance(r.event, ImageCompressed)]
        if self.images.place == "store":  # a store that is down pauses the deletion, as it pauses compression
            await self.space.retry_while_full("store", lambda: self.images.remove(names))
        else:
            await self.images.remove(names)
        files = [self.outbox / outbox_name(record.stream, accepted)]
        if accepted.source == "inbox":
            files.append(self.inbox / ARCHIVE / f"{record.stream}--{accepted.source_name}")
        await asyncio.to_thread(_remove, files)
        await self.bodies.remove_request(record.stream)
        self.cancellations.cancel(record.stream)  # its images not yet started must never start
        log.info("request_deleted", request_id=record.stream, files=len(files) + len(names))
        return ()


def _remove(files: list[Path]) -> None:
    """(thread)"""
    for path in files:
        path.unlink(missing_ok=True)
