"""Retention: finished requests older than `requests_days` are deleted, as DELETE /requests/<id> deletes them, and
archived or rejected inbox files older than `inbox_days` are removed (both off by default); and on every sweep the
events of deleted requests leave the log, once every consumer has passed them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from daemon.config import RetentionSettings
from daemon.control import commands
from daemon.control.commands import Refused
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog
from daemon.ingest.inbox import ARCHIVE, REJECTED
from daemon.views.export import FINISHED
from daemon.views.status import StatusRequest

log = structlog.get_logger("retention")

SWEEP_EVERY = 3600.0  # seconds; retention is counted in days
DAY = 86_400.0


@dataclass(frozen=True)
class Swept:
    requests: int
    files: int
    events: int


def finished_before(cutoff: str) -> list[str]:
    """(reader thread) Requests that finished before `cutoff` (an ISO timestamp like the log's)."""
    query = StatusRequest.select(StatusRequest.request_id).where(
        StatusRequest.status.in_(FINISHED) & (StatusRequest.completed_at < cutoff))
    return [r.request_id for r in query]


def remove_older(folders: list[Path], before: float) -> int:
    """(thread) Remove the files in `folders` last modified before `before`; how many."""
    removed = 0
    for folder in folders:
        for path in folder.iterdir() if folder.is_dir() else ():
            try:
                if path.is_file() and path.stat().st_mtime < before:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


class Retention:
    def __init__(self, eventlog: EventLog, settings: RetentionSettings, inbox: Path,
                 consumers: Sequence[Follower]) -> None:
        self.eventlog, self.settings, self.inbox, self.consumers = eventlog, settings, inbox, consumers

    async def run(self) -> None:
        while True:
            try:
                await self.sweep(time.time())
            except Exception:  # the next sweep tries again
                log.exception("retention_failed")
            await asyncio.sleep(SWEEP_EVERY)

    async def sweep(self, now: float) -> Swept:
        requests = files = 0
        if days := self.settings.requests_days:
            cutoff = datetime.fromtimestamp(now - days * DAY, UTC).isoformat(timespec="milliseconds")
            for request_id in await self.eventlog.query(finished_before, cutoff.replace("+00:00", "Z")):
                try:
                    await commands.delete(self.eventlog, request_id)
                except Refused:  # retried or deleted meanwhile
                    continue
                requests += 1
        if days := self.settings.inbox_days:
            files = await asyncio.to_thread(remove_older, [self.inbox / ARCHIVE, self.inbox / REJECTED],
                                            now - days * DAY)
        # Checkpoints as the running consumers hold them: the stored ones move only when a consumer commits.
        low_water = min((consumer.checkpoint for consumer in self.consumers), default=0)
        events = await self.eventlog.purge_deleted(low_water)
        if requests or files or events:
            log.info("retention_swept", requests_deleted=requests, inbox_files_removed=files, events_removed=events)
        return Swept(requests, files, events)
