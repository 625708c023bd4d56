"""A full disk pauses the work that writes there, and the work resumes by itself once there is room again.

Running out of space (ENOSPC, EDQUOT, SQLite's "database or disk is full") is the daemon's problem, not the
image's or the request's: nothing is failed for it and no attempt is spent. Each place the daemon writes to
(the images folder, the working folder, the outbox, the database, the inbox) is full or not; the first failure
there starts an episode, logged once as `disk_full` with the path and the free bytes, and the first write
there that succeeds again ends it (`disk_space_back`). While any place is full, /healthz says "degraded".

An object store that is down or refuses writes (daemon.storage.StoreUnavailable) is one more such place, "store":
the same pause, logged as `image_store_unavailable` and `image_store_back`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import peewee
import structlog

from daemon.eventlog.models import error_chain, sqlstate
from daemon.storage import StoreUnavailable

if TYPE_CHECKING:
    from daemon.config import Settings

log = structlog.get_logger("diskspace")
T = TypeVar("T")

# What /healthz names (it needs no token, so never a path).
PLACES = {"images": "compressed images", "work": "working files", "outbox": "outbox", "database": "database",
          "inbox": "inbox", "store": "image store"}
STORE = "store"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = "database or disk is full"
POSTGRES_FULL = frozenset({"53100"})  # disk_full: the server's disk (the daemon only waits; the server's admin acts)
POLL_SECONDS = 0.25  # how often a paused place's free bytes are looked at
RETRY_SECONDS = 3.0  # paused work tries again at least this often, even if the free bytes did not grow


def is_disk_full(exc: BaseException) -> bool:
    """True for an error that says the disk (or the user's quota) is full."""
    return full_error(exc) is not None


def full_error(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the disk is full: `exc` itself, or what it was raised from or while
    handling (peewee's failed rollback after SQLite's "database or disk is full", a library's wrapper)."""
    for error in error_chain(exc):
        if isinstance(error, OSError) and error.errno in FULL_ERRNOS or isinstance(error, StoreUnavailable):
            return error
        if isinstance(error, peewee.OperationalError | sqlite3.OperationalError) and SQLITE_FULL in str(error):
            return error
        if sqlstate(error) in POSTGRES_FULL:  # psycopg's error, under peewee's
            return error
    return None


def place_of(exc: BaseException, place: str) -> str:
    """The place a disk-full error is about: a full database wherever it was written from, the store, else `place`."""
    if isinstance(full_error(exc), StoreUnavailable):
        return STORE
    return "database" if isinstance(exc, peewee.DatabaseError | sqlite3.DatabaseError) else place


def settings_places(settings: Settings) -> dict[str, Path | None]:
    """Where each place is, for statvfs and the log; a database that is not a SQLite file has no such path."""
    places: dict[str, Path | None] = {name: settings.path(name) for name in ("images", "work", "outbox", "inbox")}
    prefix = "sqlite:///"
    url = settings.database_url
    places["database"] = Path(url[len(prefix):]) if url.startswith(prefix) and url != prefix + ":memory:" else None
    return places


def free_bytes(path: Path | None) -> int | None:
    """(thread) Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    if path is None:
        return None
    for candidate in (path, *path.parents):  # the folder may be the one that could not be made
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


@dataclass
class _Episode:
    """A place found full, until a write there succeeds again."""

    free: int | None  # free bytes when a write last failed there
    failures: int = 1  # writes that failed there for lack of space
    since: float = field(default_factory=time.monotonic)
    more_room: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class DiskSpace:
    """Which places are full; one per daemon. Runs on the event loop; statvfs runs on threads."""

    def __init__(self, paths: Mapping[str, Path | None] | None = None) -> None:
        self.paths = dict(paths or {})
        self._full: dict[str, _Episode] = {}

    def reasons(self) -> list[str]:
        """Why the daemon is degraded, for /healthz; empty when it is not."""
        return ["image store unavailable" if place == STORE else f"disk full: {PLACES.get(place, place)}"
                for place in sorted(self._full)]

    def failed_writes(self, place: str) -> int:
        """Writes at `place` that failed for lack of space in its current episode; 0 when it is not full."""
        episode = self._full.get(place)
        return episode.failures if episode else 0

    async def hit(self, place: str, exc: BaseException) -> None:
        """A write at `place` failed for lack of space: start an episode (logged once) or note the free bytes."""
        free = await asyncio.to_thread(free_bytes, self.paths.get(place))
        episode = self._full.get(place)
        if episode is not None:
            episode.free = free
            episode.failures += 1
            return
        episode = self._full[place] = _Episode(free)
        episode.watcher = asyncio.create_task(self._watch(place, episode), name=f"diskspace:{place}")
        path = self.paths.get(place)
        error = full_error(exc) or exc
        if place == STORE:
            log.warning("image_store_unavailable", error=str(error))
            return
        log.warning("disk_full", place=place, path=str(path) if path else None, free_bytes=free,
                    error=f"{type(error).__name__}: {error}")

    def fine(self, place: str) -> None:
        """A write at `place` succeeded: if it was full, the episode ends and everything paused there goes on."""
        episode = self._full.pop(place, None)
        if episode is None:
            return
        if episode.watcher is not None:
            episode.watcher.cancel()
        episode.more_room.set()
        path = self.paths.get(place)
        if place == STORE:
            log.info("image_store_back", paused_s=round(time.monotonic() - episode.since, 3),
                     failed_writes=episode.failures)
            return
        log.info("disk_space_back", place=place, path=str(path) if path else None,
                 paused_s=round(time.monotonic() - episode.since, 3), failed_writes=episode.failures)

    async def pause(self, place: str) -> None:
        """Wait until `place` may have room: more free bytes, the episode over, or RETRY_SECONDS gone by."""
        episode = self._full.get(place)
        if episode is None:
            return
        await episode.more_room.wait()

    async def retry_while_full(self, place: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` (it writes at `place`) until it succeeds, pausing after each failure for lack of space;
        any other error is raised as it is."""
        hit = {place}
        while True:
            try:
                result = await operation()
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                where = place_of(exc, place)
                hit.add(where)
                await self.hit(where, exc)
                await self.pause(where)
                continue
            for where in hit:
                self.fine(where)
            return result

    async def close(self) -> None:
        watchers = [e.watcher for e in self._full.values() if e.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(self, place: str, episode: _Episode) -> None:
        """Wake the work paused at `place` when its free bytes grow, and every RETRY_SECONDS in any case."""
        woken = time.monotonic()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            free = await asyncio.to_thread(free_bytes, self.paths.get(place))
            grew = free is not None and episode.free is not None and free > episode.free
            if grew or time.monotonic() - woken >= RETRY_SECONDS:
                # Everyone waiting now tries again; whoever pauses after this waits for the next wake-up.
                waiting, episode.more_room = episode.more_room, asyncio.Event()
                waiting.set()
                episode.free, woken = free, time.monotonic()
