"""Claims on images: which daemon downloads and compresses an image, when several share one PostgreSQL log.

Every daemon's download stage reads every ImageRequested and ImageRequeued (a work item, named by its position).
The first to claim an item does it; the others pass it by. A claim is a row keyed by the image with the item, its
owner and a lease the owner renews while it works (every lease/3 seconds, for all the items it holds, in one
statement). The image's terminal event (ImageCompressed, ImageFailed, ImageRequeued, or nothing for a cancelled
request) settles the claim in the same transaction, and is refused (LeaseLost) if the claim passed to another
daemon meanwhile. A daemon that stops, even by kill -9, stops renewing: once its leases run out, a sweeper on any
daemon appends ImageRequeued for each such image (settling the old claim in the same transaction), a new work
item that every daemon reads and one claims. Only the claim's owner has the downloaded body on its disk, so
ImageDownloaded names its node and item and only that daemon's compress stage takes it.

A claim is taken by an upsert (`INSERT ... ON CONFLICT DO UPDATE ... WHERE` the old claim is settled or expired)
rather than by `SELECT ... FOR UPDATE SKIP LOCKED` over a queue table as procrastinate and pgqueuer do: here the
queue is the event log, which every daemon reads in order anyway, so there is no queue head to lock and skip; the
heartbeat and the re-offering of stalled work follow procrastinate's workers (heartbeats, "retry stalled jobs").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from daemon.eventlog.follower import LeaseLost
from daemon.eventlog.models import execute, placeholders
from daemon.eventlog.store import DatabaseAway, EventLog, RecordedEvent, refused_unless
from daemon.events import Event, ImageDownloaded, ImageRequested, ImageRequeued, names

log = structlog.get_logger("claims")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS claims (stream VARCHAR(64) NOT NULL, product INTEGER NOT NULL, "
    "idx INTEGER NOT NULL, item BIGINT NOT NULL, owner VARCHAR(255) NOT NULL, "
    "lease_until TIMESTAMPTZ NOT NULL, settled BOOLEAN NOT NULL DEFAULT FALSE, PRIMARY KEY (stream, product, idx))",
    "CREATE INDEX IF NOT EXISTS claims_open ON claims (lease_until) WHERE NOT settled",
)
# Taken when the old claim is settled and older, or open but its owner's (a restart) or run out; never from a
# daemon that still renews it.
CLAIM = (
    "INSERT INTO claims (stream, product, idx, item, owner, lease_until) VALUES {values} "
    "ON CONFLICT (stream, product, idx) DO UPDATE SET item = excluded.item, owner = excluded.owner, "
    "lease_until = excluded.lease_until, settled = FALSE "
    "WHERE (claims.settled AND claims.item < excluded.item) OR (NOT claims.settled AND claims.item <= excluded.item "
    "AND (claims.owner = excluded.owner OR claims.lease_until < now())) RETURNING item"
)
SWEEP_BATCH = 200
LATENCY_SAMPLES = 2000
FORGET_EVERY = 3600.0  # seconds between looks for claims of purged requests


@dataclass(frozen=True)
class Work:
    """One image's work item: the image, and the position of the ImageRequested or ImageRequeued to do."""

    stream: str
    product: int
    index: int
    item: int


def work_of(record: RecordedEvent) -> Work:
    event = record.event
    assert isinstance(event, ImageRequested)
    return Work(record.stream, event.product, event.index, record.position)


class Claims:
    """This daemon's claims: taking them (batched), renewing them, settling them, and re-offering expired ones."""

    def __init__(self, eventlog: EventLog, node: str, lease_seconds: float) -> None:
        self.eventlog, self.node, self.lease = eventlog, node, lease_seconds
        self.held: dict[int, Work] = {}  # item -> work this daemon holds (loop thread; read by the writer)
        self._asked: list[tuple[Work, asyncio.Future[bool]]] = []
        self._flush: asyncio.Task[None] | None = None
        # Milliseconds from an item's append to its claim here, the newest LATENCY_SAMPLES (logged at the stop).
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    async def open(self) -> None:
        """Create the table, and hold again the open claims this node had before a restart: its stages redo
        every item above their checkpoints, which is where these are."""
        def create() -> list[Work]:
            for statement in SCHEMA:
                execute(statement)
            rows = execute("SELECT stream, product, idx, item FROM claims WHERE owner = ? AND NOT settled",
                           (self.node,)).fetchall()
            return [Work(str(s), int(p), int(i), int(item)) for s, p, i, item in rows]

        for work in await self.eventlog.write_beside(create):
            self.held[work.item] = work

    # taking ----------------------------------------------------------------------------------------
    async def claim(self, record: RecordedEvent) -> bool:
        """Whether this daemon now holds `record`'s work item (batched with the claims asked meanwhile)."""
        work = work_of(record)
        if work.item in self.held:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked.append((work, future))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._claim_asked(), name="claims")
        taken = await future
        if taken:
            self.held[work.item] = work
            self.latencies.append(round(1000 * (time.time() - _epoch(record.recorded_at)), 1))
        return taken

    async def _claim_asked(self) -> None:
        await asyncio.sleep(0)  # the claims asked in this turn of the loop go in one statement
        while self._asked:
            batch: dict[tuple[str, int, int], tuple[Work, asyncio.Future[bool]]] = {}
            rest: list[tuple[Work, asyncio.Future[bool]]] = []
            for asked in self._asked:  # one row per image in a statement: an upsert cannot touch a row twice
                key = (asked[0].stream, asked[0].product, asked[0].index)
                if key in batch:
                    rest.append(asked)
                else:
                    batch[key] = asked
            self._asked = rest
            works = [work for work, _ in batch.values()]
            try:
                taken = await self.eventlog.write_beside(self._claim_sync, works)
            except Exception as exc:  # DatabaseAway and the like: the asking stages pause and try again
                for _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for work, future in batch.values():
                if not future.done():
                    future.set_result(work.item in taken)

    def _claim_sync(self, works: Sequence[Work]) -> set[int]:
        """(reader thread, in a transaction) The items of `works` this node took."""
        values = ", ".join(["(?, ?, ?, ?, ?, now() + ? * interval '1 second')"] * len(works))
        params = [v for w in works for v in (w.stream, w.product, w.index, w.item, self.node, self.lease)]
        return {int(item) for item, in execute(CLAIM.format(values=values), params).fetchall()}

    def hold(self, work: Work) -> None:
        """Renew `work`'s claim from now on (a compress stage taking over a body after a restart)."""
        self.held[work.item] = work

    def holds(self, item: int) -> bool:
        return item in self.held

    # settling ------------------------------------------------------------------------------------------
    def guard_sync(self, settling: Sequence[tuple[int, Work, Sequence[Event]]]) -> None:
        """(writer thread, in the commit's transaction) Settle this node's claims of (position, work, results); the
        commit fails with LeaseLost for the positions whose results may not be committed, as their claim is another
        daemon's now. One statement with no answer to wait for: it goes out with the rest of the commit."""
        works = [work for _, work, _ in settling]
        keys = ", ".join(["(?, ?::integer, ?::integer, ?::bigint)"] * len(works))
        params = [self.node, *(v for w in works for v in (w.stream, w.product, w.index, w.item))]
        settle = (f"UPDATE claims SET settled = TRUE WHERE owner = ? AND NOT settled AND (stream, product, idx, item) "
                  f"IN (VALUES {keys})")
        kept = [work.item for _, work, results in settling if results]  # lost without results is no loss
        if not kept:
            execute(settle, params)
            return
        # Every item with results must be among those settled (a data-modifying WITH runs to its end).
        rows = ", ".join(["(?::bigint)"] * len(kept))
        check = refused_unless(f"NOT EXISTS (SELECT 1 FROM (VALUES {rows}) AS kept (item) "
                               "WHERE kept.item NOT IN (SELECT item FROM settled))")
        self.eventlog.backend.check(f"WITH settled AS ({settle} RETURNING item) {check}", [*params, *kept],
                                    lambda: self._lost_sync(settling))

    def _lost_sync(self, settling: Sequence[tuple[int, Work, Sequence[Event]]]) -> LeaseLost | None:
        """(writer thread, after the refused commit) LeaseLost for the positions with results whose claim is no
        longer this node's; None if none is (then the commit failed for another reason, and is tried again)."""
        items = [work.item for _, work, _ in settling]
        held = {int(item) for item, in execute(
            f"SELECT item FROM claims WHERE owner = ? AND NOT settled AND item IN ({placeholders(len(items))})",
            (self.node, *items)).fetchall()}
        refused = {position for position, work, results in settling if results and work.item not in held}
        return LeaseLost(refused) if refused else None

    def settled(self, items: Sequence[int]) -> None:
        """After the commit: these claims are no longer renewed."""
        for item in items:
            self.held.pop(item, None)

    # keeping and re-offering -----------------------------------------------------------------------
    async def run(self) -> None:
        """Renew this daemon's leases every lease/3 seconds and re-offer expired claims, until cancelled; now and
        then forget the claims of requests whose events were purged."""
        forgotten_at = time.monotonic()
        while True:
            try:
                await self.renew()
                await self.sweep()
                if time.monotonic() - forgotten_at > FORGET_EVERY:
                    forgotten_at = time.monotonic()
                    await self.forget_purged()
            except DatabaseAway:
                await self.eventlog.reachable()
                continue
            except Exception:  # the next round tries again, well within the lease
                log.exception("claims_failed")
            await asyncio.sleep(self.lease / 3 * random.uniform(0.8, 1.0))

    async def release(self) -> None:
        """A clean stop: this daemon's leases end now, so other daemons take its images over at once (its working
        files are emptied on the way out; its stages no longer run)."""
        if self.held:
            await self.eventlog.write_beside(
                lambda: execute("UPDATE claims SET lease_until = now() WHERE owner = ? AND NOT settled", (self.node,)))
            self.held.clear()

    async def forget_purged(self) -> None:
        """Remove the claims of deleted requests whose events are gone (purged by retention): no daemon can read
        their work items any more. Not before: a daemon reading late would find no claim and do a deleted image
        again."""
        await self.eventlog.write_beside(lambda: execute(
            "DELETE FROM claims WHERE settled AND stream IN (SELECT stream FROM events WHERE type = 'RequestDeleted' "
            "AND NOT EXISTS (SELECT 1 FROM events other WHERE other.stream = events.stream "
            "AND other.type <> 'RequestDeleted'))"))

    async def renew(self) -> None:
        items = list(self.held)
        if not items:
            return
        renewed = await self.eventlog.write_beside(self._renew_sync, items)
        if renewed < len(items):
            log.debug("claims_renewed", held=len(items), renewed=renewed)

    def _renew_sync(self, items: list[int]) -> int:
        cursor = execute(f"UPDATE claims SET lease_until = now() + ? * interval '1 second' WHERE owner = ? "
                         f"AND NOT settled AND item IN ({placeholders(len(items))})", (self.lease, self.node, *items))
        return int(cursor.rowcount)

    async def sweep(self) -> int:
        """Append ImageRequeued for each image whose claim ran out (its daemon stopped); how many."""
        expired = await self.eventlog.query(_expired_sync)
        requeued = 0
        for work, owner in expired:
            records = await self.eventlog.read_stream(work.stream, names(ImageRequested, ImageRequeued))
            item = next((r.event for r in records if r.position == work.item), None)
            events: list[Event] = []
            if isinstance(item, ImageRequested):
                events = [ImageRequeued(product=work.product, index=work.index, url=item.url, stem=item.stem,
                                        round=item.round, reason=f"the daemon working on it ({owner}) stopped: "
                                                                 "downloading it again")]

            def take_over(work: Work = work) -> None:
                row = execute("UPDATE claims SET settled = TRUE WHERE stream = ? AND product = ? AND idx = ? "
                              "AND item = ? AND NOT settled AND lease_until < now() RETURNING item",
                              (work.stream, work.product, work.index, work.item)).fetchone()
                if row is None:  # renewed, settled or swept by another daemon meanwhile
                    raise LeaseLost({work.item})

            try:
                await self.eventlog.commit([(work.stream, events)], apply=take_over)
            except LeaseLost:
                continue
            requeued += 1
            log.warning("image_requeued", request_id=work.stream, product=work.product, index=work.index,
                        reason="claim expired", owner=owner)
        return requeued


def _expired_sync() -> list[tuple[Work, str]]:
    rows = execute("SELECT stream, product, idx, item, owner FROM claims WHERE NOT settled AND lease_until < now() "
                   "ORDER BY item LIMIT ?", (SWEEP_BATCH,)).fetchall()
    return [(Work(str(s), int(p), int(i), int(item)), str(owner)) for s, p, i, item, owner in rows]


def downloaded_work(record: RecordedEvent) -> Work:
    """The work item an ImageDownloaded was claimed for."""
    event = record.event
    assert isinstance(event, ImageDownloaded)
    return Work(record.stream, event.product, event.index, event.item)


def _epoch(recorded_at: str) -> float:
    return datetime.fromisoformat(recorded_at.replace("Z", "+00:00")).timestamp()
