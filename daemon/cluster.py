"""Several daemons on one PostgreSQL database: which consumers run where.

- Per daemon (each with its own tracking, named `<consumer>@<node>`): the download and compress stages (which
  claim each image, daemon.eventlog.claims), the outbox writer (for the requests this daemon took in: a machine's
  inbox and outbox stay a pair) and the delete stage (each daemon removes its own files).
- Once per database, on the leader: the status view, the complete stage and webhook delivery, which must see
  every event in order and act once. The leader is whoever holds a session advisory lock on a connection of its
  own; the server drops the lock when that connection ends (the daemon stopped, was killed, or lost the server),
  and another daemon, trying every CHECK_SECONDS, takes it and runs them from their stored tracking.

On SQLite there is one daemon per database, and it runs everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog

from daemon.config import Settings
from daemon.eventlog.follower import Fenced, Follower
from daemon.eventlog.models import execute
from daemon.eventlog.store import EventLog, refused_unless
from daemon.instance import DatabaseUnreachable, connect_postgresql, is_postgresql, without_password

log = structlog.get_logger("cluster")

LEADER_KEY = "hashtextextended('imgpipe-leader/' || current_database() || '/' || current_schema(), 0)"
# Taken shared by every commit of the leader's consumers, and exclusive for a moment by a new leader before it
# starts them: so no commit of a deposed leader can land after the new one has read its tracking.
FENCE_KEY = "hashtextextended('imgpipe-leader-fence/' || current_database() || '/' || current_schema(), 0)"
CHECK_SECONDS = 1.0
# Refuses the commit unless this daemon's lock connection (pid, key) still holds the leader lock, checked only once
# the fence lock is taken (the check reads the lock's result; before it, a new leader could take both unseen).
FENCE = refused_unless(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE fence.taken AND locktype = 'advisory' AND granted "
    "AND mode = 'ExclusiveLock' AND objsubid = 1 AND pid = ? AND ((classid::bigint << 32) | objid::bigint) = ?) "
    f"FROM (SELECT pg_advisory_xact_lock_shared({FENCE_KEY}) IS NOT NULL AS taken OFFSET 0) AS fence")


def node_of(settings: Settings) -> str | None:
    """This daemon's node name when other daemons may share its database (PostgreSQL); None on SQLite."""
    return settings.node if is_postgresql(settings.database_url) else None


def per_node(follower: Follower, node: str) -> Follower:
    """`follower` tracked under a name of this daemon's own."""
    follower.name = f"{follower.name}@{node}"
    return follower


async def adopt_checkpoint(eventlog: EventLog, follower: Follower) -> None:
    """A daemon's consumer seen for the first time starts where the furthest of its kind is (another daemon's,
    or the one consumer of a database that had a single daemon): below it every image was claimed by someone, or
    re-offered once its claim runs out, so a new daemon need not read the whole log again."""
    base = follower.name.partition("@")[0]

    def adopt() -> None:
        if execute("SELECT 1 FROM checkpoints WHERE consumer = ?", (follower.name,)).fetchone():
            return
        row = execute("SELECT MAX(position) FROM checkpoints WHERE consumer = ? OR consumer LIKE ?",
                      (base, base + "@%")).fetchone()
        if row and row[0] is not None:
            execute("INSERT INTO checkpoints (consumer, position) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (follower.name, int(row[0])))
            log.info("consumer_adopted_checkpoint", consumer=follower.name, position=int(row[0]))

    await eventlog.write_beside(adopt)


class NotLeader(Fenced):
    """A commit of the leader's consumers by a daemon that no longer holds the leader lock: refused."""


class Leadership:
    """Runs `followers` while this daemon holds the leader lock, and only then; their commits are fenced (`fence`)."""

    def __init__(self, database_url: str, node: str, followers: Sequence[Follower],
                 eventlog: EventLog | None = None) -> None:
        self.database_url, self.node, self.followers = database_url, node, followers
        self.eventlog = eventlog or followers[0].eventlog  # the followers' (they share one)
        self.leading = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ran = False
        self._holder: tuple[int, int] | None = None  # (the lock connection's server pid, the lock's key)
        for follower in followers:
            follower.elsewhere = True
            follower.fence = self.fence

    def fence(self) -> None:
        """(writer thread, in the commit's transaction) The commit fails with NotLeader unless the lock is still this
        daemon's. The shared fence lock makes a new leader wait for this transaction before it reads the tracking.
        One statement with no answer to wait for: it goes out with the rest of the commit."""
        self.eventlog.backend.check(FENCE, self._holder or (0, 0),
                                    lambda: NotLeader(f"{self.node} no longer holds the leader lock"))

    async def run(self) -> None:
        """Try for the lock, then watch its connection, every CHECK_SECONDS until cancelled."""
        connection: Any = None
        try:
            while True:
                try:
                    if connection is None:
                        connection = await asyncio.to_thread(self._connect)
                    if self.leading:
                        await asyncio.to_thread(connection.execute, "SELECT 1")
                    elif await asyncio.to_thread(self.try_lock, connection):
                        self._elected()
                except Exception as exc:  # DatabaseUnreachable, psycopg.OperationalError: the lock is gone with it
                    if connection is not None:
                        await asyncio.to_thread(_close, connection)
                        connection = None
                    if self.leading:
                        log.warning("leadership_lost", node=self.node, reason=_reason(exc))
                        await self._deposed()
                await asyncio.sleep(CHECK_SECONDS)
        finally:
            await self._deposed()
            if connection is not None:
                await asyncio.to_thread(_close, connection)

    def _connect(self) -> Any:
        return connect_postgresql(self.database_url, application_name=f"imgpipe leader {self.node}"[:63],
                                  keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)

    def try_lock(self, connection: Any) -> bool:
        """(thread) Take the leader lock if it is free; then wait for the commits of a deposed leader in flight."""
        taken, pid, key = connection.execute(
            f"SELECT pg_try_advisory_lock({LEADER_KEY}), pg_backend_pid(), {LEADER_KEY}").fetchone()
        if taken:
            connection.execute(f"SELECT pg_advisory_lock({FENCE_KEY}), pg_advisory_unlock({FENCE_KEY})")
            self._holder = (int(pid), int(key))
        return bool(taken)

    def _elected(self) -> None:
        self.leading = True
        log.info("leadership_taken", node=self.node, database=without_password(self.database_url))
        for follower in self.followers:
            if self._ran:
                follower.reset()  # another daemon moved its tracking on meanwhile
            follower.elsewhere = False
            self._tasks.append(asyncio.create_task(follower.run(), name=f"follower:{follower.name}"))
        self._ran = True

    async def _deposed(self) -> None:
        """Stop at once: another daemon may take the lock from now on."""
        self.leading = False
        for follower in self.followers:
            follower.elsewhere = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def _close(connection: Any) -> None:
    with contextlib.suppress(Exception):
        connection.close()


def _reason(exc: Exception) -> str:
    if isinstance(exc, DatabaseUnreachable):
        return str(exc.details["reason"])
    return str(exc).strip().partition("\n")[0] or type(exc).__name__
