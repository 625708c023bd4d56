"""The newest events in memory: what it answers for, and when it must leave the answer to the database."""

from __future__ import annotations

from daemon.eventlog.recent import RecentEvents
from daemon.eventlog.store import RecordedEvent
from daemon.events import ImageDownloaded, ImageFailed, ImageRequested, names

FAILED = names(ImageFailed)
REQUESTED = names(ImageRequested)


def failed(position: int, stream: str = "r", version: int = 1) -> RecordedEvent:
    return RecordedEvent(position, stream, version, "2026-12-06T00:00:00.000Z",
                         ImageFailed(product=0, index=position, stage="download", error="e"))


def requested(position: int, stream: str = "r", version: int = 1) -> RecordedEvent:
    return RecordedEvent(position, stream, version, "2026-12-06T00:00:00.000Z",
                         ImageRequested(product=0, index=position, url="http://origin/a.jpg", stem="a"))


def test_our_append_beyond_unseen_positions_waits_until_they_are_read() -> None:
    """An append of ours that lands after another process's unread one is not given out until that one is read,
    then both are, in position order."""
    recent = RecentEvents(keep=100, end=10)
    recent.add_own([failed(11)])
    recent.add_own([failed(13, version=3)])  # 12 is another process's, not read yet
    assert recent.gap_end() == 12
    assert recent.page(10, None, 10, head=13) is None
    assert recent.add_read([failed(12, "x")], limit=1, target=12) == {"ImageFailed"}
    assert recent.gap_end() == 0
    assert [(r.position, r.stream) for r in recent.page(10, None, 10, head=13) or []] == [
        (11, "r"), (12, "x"), (13, "r")]


def test_positions_a_read_found_empty_are_passed_over() -> None:
    """Positions of rolled-back appends (the read found nothing there) leave no gap: pages and streams skip them."""
    recent = RecentEvents(keep=100, end=0)
    recent.add_read([failed(1), failed(4, version=2)], limit=4, target=4)
    assert recent.end == 4
    assert [r.position for r in recent.page(0, FAILED, 10, head=4) or []] == [1, 4]
    assert [r.position for r in recent.stream("r", head=4) or []] == [1, 4]


def test_an_unread_append_answers_only_for_the_types_it_does_not_hold() -> None:
    """Another process's append noted but not read is passed over by a page of other types; a page of its types,
    or of all, and any stream are left to the database."""
    recent = RecentEvents(keep=100, end=0)
    recent.add_own([requested(1)])
    assert recent.add_unread(2, 3, FAILED)
    recent.add_own([requested(4, version=2)])
    assert [r.position for r in recent.page(0, REQUESTED, 10, head=4) or []] == [1, 4]
    assert recent.page(0, FAILED, 10, head=4) is None
    assert recent.page(0, None, 10, head=4) is None
    assert recent.stream("r", head=4) is None


def test_an_unread_append_is_noted_only_right_after_what_memory_holds() -> None:
    """An append announced past positions memory has not seen is not noted: those must be read first."""
    recent = RecentEvents(keep=100, end=5)
    assert not recent.add_unread(7, 8, FAILED)
    assert recent.end == 5


def test_memory_that_does_not_reach_the_head_or_back_far_enough_does_not_answer() -> None:
    """A page from before the oldest position held, or while the log's head is past memory, is the database's."""
    recent = RecentEvents(keep=2, end=0)
    recent.add_own([failed(p) for p in range(1, 7)])
    assert recent.page(0, None, 10, head=6) is None  # only the newest are kept
    assert [r.position for r in recent.page(5, None, 10, head=6) or []] == [6]
    assert recent.page(5, None, 10, head=7) is None


def test_an_unread_append_addressed_to_another_daemon_is_passed_over_by_this_ones_reader() -> None:
    """Events addressed to daemon a, not read, do not stop a page for daemon b's reader of their type; a reader for
    a, or for every daemon, is left to the database."""
    recent = RecentEvents(keep=100, end=0)
    assert recent.add_unread(1, 2, frozenset({"ImageDownloaded@a"}))
    downloaded = names(ImageDownloaded)
    assert recent.page(0, downloaded, 10, head=2, addressee="b") == []
    assert recent.page(0, downloaded, 10, head=2, addressee="a") is None
    assert recent.page(0, downloaded, 10, head=2) is None
