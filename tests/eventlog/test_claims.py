"""Claims on images against the real PostgreSQL: two daemons' claims (two node names) on one event log."""

from __future__ import annotations

import asyncio

import pytest

from daemon.eventlog.claims import Claims, Work, work_of
from daemon.eventlog.follower import LeaseLost
from daemon.eventlog.models import execute
from daemon.eventlog.store import EventLog, RecordedEvent
from daemon.events import Event, ImageFailed, ImageRequested, ImageRequeued, Product, RequestAccepted, RequestDeleted

LEASE = 30.0


async def opened(postgres_eventlog: EventLog, node: str) -> Claims:
    claims = Claims(postgres_eventlog, node, LEASE)
    await claims.open()
    return claims


async def requested(postgres_eventlog: EventLog, stream: str = "r1") -> RecordedEvent:
    """A request of one image; its ImageRequested."""
    product = Product(serial="1", product_name="p", slug="1", input_urls=("http://origin/a.jpg",))
    await postgres_eventlog.append(stream, [RequestAccepted(source="upload", source_name="a.csv", products=(product,)),
                                   ImageRequested(product=0, index=0, url="http://origin/a.jpg", stem=f"{stream}_1_0")])
    return [r for r in await postgres_eventlog.read_stream(stream) if isinstance(r.event, ImageRequested)][-1]


async def expire(postgres_eventlog: EventLog) -> None:
    """Every lease runs out now, as if its daemon had stopped renewing it a lease ago."""
    await postgres_eventlog.write_beside(lambda: execute("UPDATE claims SET lease_until = now() - interval '1 second'"))


async def settle(postgres_eventlog: EventLog, claims: Claims, work: Work, results: list[Event]) -> None:
    """Commit `results` with the claim settled in the same transaction, as the stages do."""
    await postgres_eventlog.commit([(work.stream, results)],
                                   apply=lambda: claims.guard_sync([(work.item, work, results)]))


def failed() -> list[Event]:
    return [ImageFailed(product=0, index=0, stage="download", error="HTTP 404")]


async def test_an_image_is_claimed_by_one_daemon_at_a_time(postgres_eventlog: EventLog) -> None:
    """The first claim wins; a second daemon is refused while the lease runs, the holder is not."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    assert not await b.claim(record)
    assert await a.claim(record)


async def test_an_expired_claim_passes_to_another_daemon_and_the_old_holder_cannot_settle_it(
        postgres_eventlog: EventLog) -> None:
    """Once the lease ran out another daemon takes the image; the old holder's outcome is refused, the new one's
    committed."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    await expire(postgres_eventlog)
    assert await b.claim(record)
    with pytest.raises(LeaseLost):
        await settle(postgres_eventlog, a, work_of(record), failed())
    await settle(postgres_eventlog, b, work_of(record), failed())
    assert [r.type for r in await postgres_eventlog.read_stream("r1")][-1] == "ImageFailed"
    assert sum(r.type == "ImageFailed" for r in await postgres_eventlog.read_stream("r1")) == 1


async def test_a_commit_settling_several_claims_is_refused_for_exactly_the_lost_ones_with_results(
        postgres_eventlog: EventLog) -> None:
    """Of three images settled in one commit, the one lost with an outcome is named and nothing lands; committed again
    without that outcome, the held one and the one lost without an outcome (a cancelled image) settle."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    held, lost, quiet = [await requested(postgres_eventlog, stream) for stream in ("r1", "r2", "r3")]
    for record in (held, lost, quiet):
        assert await a.claim(record)
    await expire(postgres_eventlog)
    await a.renew()
    await postgres_eventlog.write_beside(lambda: execute(
        "UPDATE claims SET lease_until = now() - interval '1 second' WHERE stream <> 'r1'"))
    assert await b.claim(lost) and await b.claim(quiet)
    outcomes: list[tuple[int, Work, list[Event]]] = [(held.position, work_of(held), failed()),
                                                     (lost.position, work_of(lost), failed()),
                                                     (quiet.position, work_of(quiet), [])]

    def guard() -> None:
        a.guard_sync(outcomes)

    with pytest.raises(LeaseLost) as refused:
        await postgres_eventlog.commit([("r1", failed()), ("r2", failed())], apply=guard)
    assert refused.value.positions == {lost.position}
    assert not [r for r in await postgres_eventlog.read_stream("r1") if r.type == "ImageFailed"]
    outcomes[1] = (lost.position, work_of(lost), [])
    await postgres_eventlog.commit([("r1", failed())], apply=guard)
    assert [r.type for r in await postgres_eventlog.read_stream("r1")][-1] == "ImageFailed"
    rows = await postgres_eventlog.query(lambda: execute("SELECT stream, owner, settled FROM claims ORDER BY stream")
                                         .fetchall())
    assert [tuple(row) for row in rows] == [("r1", "a", True), ("r2", "b", False), ("r3", "b", False)]


async def test_renewing_keeps_a_claim_from_expiring(postgres_eventlog: EventLog) -> None:
    """A renewal pushes the lease a whole lease ahead, so another daemon is still refused."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    await expire(postgres_eventlog)
    await a.renew()
    left = await postgres_eventlog.query(lambda: execute("SELECT EXTRACT(EPOCH FROM lease_until - now()) FROM claims")
                                .fetchone()[0])
    assert LEASE - 5 < float(left) <= LEASE
    assert not await b.claim(record)


async def test_a_settled_image_is_not_claimed_again(postgres_eventlog: EventLog) -> None:
    """A daemon reading the work item late finds it done, and leaves it."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    await settle(postgres_eventlog, a, work_of(record), failed())
    await expire(postgres_eventlog)
    assert not await b.claim(record)


async def test_a_sweep_requeues_an_expired_image_once_as_new_work(postgres_eventlog: EventLog) -> None:
    """An expired claim becomes one ImageRequeued naming the stopped daemon, however many daemons sweep; the
    new work item is claimable, and the stopped daemon's late outcome is refused."""
    a, b, c = [await opened(postgres_eventlog, node) for node in "abc"]
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    assert await b.sweep() == 0  # not expired yet
    await expire(postgres_eventlog)
    assert await b.sweep() == 1
    assert await c.sweep() == 0
    requeued = [r for r in await postgres_eventlog.read_stream("r1") if isinstance(r.event, ImageRequeued)]
    assert len(requeued) == 1
    assert isinstance(requeued[0].event, ImageRequeued) and "(a) stopped" in requeued[0].event.reason
    assert await c.claim(requeued[0])
    with pytest.raises(LeaseLost):
        await settle(postgres_eventlog, a, work_of(record), failed())
    await settle(postgres_eventlog, c, work_of(requeued[0]), failed())


async def test_claims_asked_together_go_in_one_statement_and_each_gets_its_answer(postgres_eventlog: EventLog) -> None:
    """Several images claimed at once by two daemons: each image is held by exactly one of them."""
    a, b = await opened(postgres_eventlog, "a"), await opened(postgres_eventlog, "b")
    records = [await requested(postgres_eventlog, f"r{i}") for i in range(6)]
    answers = await asyncio.gather(*(claims.claim(r) for r in records for claims in (a, b)))
    pairs = list(zip(answers[::2], answers[1::2], strict=True))
    assert all(first != second for first, second in pairs)


async def test_the_claims_of_a_deleted_request_go_once_its_events_are_purged(postgres_eventlog: EventLog) -> None:
    """A deleted request's settled claims stay while its work items are in the log, and go once they are purged."""
    a = await opened(postgres_eventlog, "a")
    record = await requested(postgres_eventlog)
    assert await a.claim(record)
    await settle(postgres_eventlog, a, work_of(record), failed())
    await postgres_eventlog.append("r1", [RequestDeleted()])

    async def claims() -> int:
        return int(await postgres_eventlog.query(lambda: execute("SELECT COUNT(*) FROM claims").fetchone()[0]))

    await a.forget_purged()
    assert await claims() == 1
    assert await postgres_eventlog.purge_deleted(postgres_eventlog.head) > 0
    await a.forget_purged()
    assert await claims() == 0
