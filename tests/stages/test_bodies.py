"""The downloaded bodies' folder on a real disk: what a restart finds, and what a finished request leaves."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from daemon.stages.bodies import Bodies


async def test_a_restart_counts_waiting_bodies_and_clears_half_written_ones(tmp_path: Path) -> None:
    """At start, finished bodies count against the backlog, .part files go, and recycled files beyond it are deleted."""
    incoming = tmp_path / ".incoming"
    (incoming / "r1").mkdir(parents=True)
    (incoming / "r1" / "0-0").write_bytes(b"a whole body")
    (incoming / "r1" / "0-1.part").write_bytes(b"half a bo")
    (incoming / ".recycled").mkdir()
    for name in range(5):
        (incoming / ".recycled" / str(name)).write_bytes(b"spent")
    bodies = Bodies(incoming, limit=3)
    bodies.load()
    assert bodies.vacancies == 2
    assert sorted(p.name for p in (incoming / "r1").iterdir()) == ["0-0"]
    assert len(list(bodies.recycled_folder.iterdir())) == 3
    await bodies.remove_request("r1")
    assert bodies.vacancies == 3 and not (incoming / "r1").exists()


async def test_a_new_body_overwrites_a_spare_and_a_released_one_becomes_a_spare(tmp_path: Path) -> None:
    """Writing takes a recycled file and cuts it to the new body; releasing turns the body into a recycled file again."""
    (tmp_path / ".incoming" / ".recycled").mkdir(parents=True)
    (tmp_path / ".incoming" / ".recycled" / "old").write_bytes(b"x" * 1000)  # left by an earlier run
    bodies = Bodies(tmp_path / ".incoming", limit=2)
    bodies.load()
    target = bodies.path("r1", 0, 0)
    writer = bodies.writer(target)
    writer.write_chunks([b"new "])
    writer.finish([b"body"])
    bodies.arrived(target, len(b"new body"))
    assert target.read_bytes() == b"new body" and bodies.vacancies == 1
    assert list(bodies.recycled_folder.iterdir()) == []
    bodies.recycle(target, len(b"new body"))
    bodies.released(target)
    assert bodies.vacancies == 2 and not target.exists()
    assert [p.read_bytes() for p in bodies.recycled_folder.iterdir()] == [b"new body"]


async def test_a_download_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    """A body discarded mid-download, written into a recycled file or into a new file, leaves no file and no waiting body."""
    bodies = Bodies(tmp_path / ".incoming", limit=2)
    bodies.load()
    first = bodies.writer(bodies.path("r1", 0, 0))
    first.finish([b"first"])
    bodies.recycle(first.path, 5)  # now a recycled file
    into_recycled, into_new = bodies.writer(bodies.path("r1", 0, 1)), bodies.writer(bodies.path("r1", 0, 2))
    into_recycled.write_chunks([b"half"])
    into_new.write_chunks([b"half"])
    into_recycled.discard()
    into_new.discard()
    assert set((tmp_path / ".incoming").rglob("*")) == {bodies.recycled_folder, tmp_path / ".incoming" / "r1"}
    assert bodies.vacancies == 2


async def test_a_download_cancelled_mid_write_waits_for_the_write_before_it_is_discarded(tmp_path: Path) -> None:
    """Cancelling a download whose write is still running on a thread returns only once that write is over, so
    discarding the body afterwards closes its descriptor and removes its file instead of leaving both behind."""
    bodies = Bodies(tmp_path / ".incoming", limit=2)
    bodies.load()
    writer = bodies.writer(bodies.path("r1", 0, 0))
    writer.partial.parent.mkdir(parents=True)
    os.mkfifo(writer.partial)  # opening it for writing blocks until someone reads: a write held mid-way
    descriptors = len(os.listdir("/proc/self/fd"))
    flushing = asyncio.create_task(writer.flush([b"half a body"]))
    await asyncio.sleep(0)  # the write is handed to its thread, which waits in open()
    flushing.cancel()

    def read_it() -> bytes:
        with open(writer.partial, "rb") as fifo:
            return fifo.read(len(b"half a body"))

    reader = asyncio.create_task(asyncio.to_thread(read_it))
    with pytest.raises(asyncio.CancelledError):
        await flushing
    writer.discard()
    assert await reader == b"half a body"
    assert not writer.partial.exists()
    assert len(os.listdir("/proc/self/fd")) == descriptors


async def test_spares_go_first_and_downloads_stop_when_the_bytes_bound_is_reached(tmp_path: Path) -> None:
    """Over `limit_bytes`, the oldest recycled files are deleted before any download must wait, and once the waiting bodies
    alone reach it there is no room until one is released."""
    bodies = Bodies(tmp_path / "work", limit=10, limit_bytes=1000)
    bodies.load()
    first = [bodies.writer(bodies.path("r1", 0, index)) for index in range(3)]
    for writer in first:
        writer.finish([b"s" * 300])
    for writer in first:  # three recycled files of 300 bytes
        bodies.recycle(writer.path, 300)
    assert sorted(p.stat().st_size for p in bodies.recycled_folder.iterdir()) == [300, 300, 300]
    big = bodies.path("r1", 1, 0)
    writer = bodies.writer(big)
    writer.write_chunks([b"b" * 10])  # into a recycled file: two are left
    writer.finish([b"b" * 590])
    bodies.arrived(big, 600)
    assert [p.stat().st_size for p in bodies.recycled_folder.iterdir()] == [300]  # 600 + 300 <= 1000
    other = bodies.path("r1", 1, 1)
    writer = bodies.writer(other)
    writer.finish([b"o" * 400])  # 600 + 400 waiting: the last recycled goes
    bodies.arrived(other, 400)
    assert list(bodies.recycled_folder.iterdir()) == [] and bodies.vacancies == 0
    bodies.recycle(other, 400)  # within the bound as a recycled file: kept
    bodies.released(other)
    assert bodies.vacancies == 9 and [p.stat().st_size for p in bodies.recycled_folder.iterdir()] == [400]
