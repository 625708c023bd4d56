"""Downloaded bodies between the download and the compress stage: where they live and how many may wait.

A body is `<incoming>/<request_id>/<product>-<index>`, written elsewhere (into a recycled file, or a new `.part`
file) and renamed there when complete. At most
`limit` bodies wait for the compress stage at once, so a 10,000-image batch holds a bounded amount of disk,
not the whole batch, and downloads keep pace with compression instead of racing ahead of it.

`limit_bytes` bounds the bytes of the waiting bodies plus the recycled files: a download starts only while the waiting
bodies total less, and recycled files are deleted first (oldest first) to stay within it. Downloads in progress are
not counted, so the folder may hold up to that many bodies more.

A compressed body is not deleted but kept as a recycled file, and the next download overwrites it: rewriting a file
whose pages are cached is cheaper than creating, filling and deleting a new one (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

RECYCLED_FOLDER = ".recycled"
# A bigger body is deleted, not kept: idle recycled files hold at most `limit` x 4 MB of disk.
RECYCLED_MAX_BYTES = 4 * 1024 * 1024
PART_SUFFIX = ".part"
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
IOV_MAX = os.sysconf("SC_IOV_MAX")


class Bodies:
    """The incoming folder. Bookkeeping runs on the event loop; methods marked (thread) touch the disk."""

    def __init__(self, incoming: Path, limit: int, limit_bytes: int | None = None) -> None:
        self.incoming, self.limit, self.limit_bytes = incoming, limit, limit_bytes
        self.recycled_folder = incoming / RECYCLED_FOLDER
        self._waiting: dict[Path, int] = {}  # path -> bytes
        self._waiting_bytes = 0  # changed on the loop; threads only read it
        # (path, bytes), oldest first; list.pop and list.append are atomic, so threads share it safely
        self._recycled: list[tuple[Path, int]] = []
        self._names = itertools.count()
        self._run = secrets.token_hex(4)  # recycled names of this run never collide with adopted ones
        self._listeners: list[Callable[[], None]] = []

    def path(self, request_id: str, product: int, index: int) -> Path:
        return self.incoming / request_id / f"{product}-{index}"

    @staticmethod
    def image_of(path: Path) -> tuple[int, int] | None:
        """The (product, index) a body's `path` is named after; None for a file that is not a body."""
        product, _, index = path.name.partition("-")
        return (int(product), int(index)) if product.isdigit() and index.isdigit() else None

    @property
    def vacancies(self) -> int:
        """How many more bodies may be downloaded before the compress stage takes some."""
        if self.limit_bytes is not None and self._waiting_bytes >= self.limit_bytes:
            return 0
        return self.limit - len(self._waiting)

    @property
    def waiting(self) -> int:
        """Downloaded bodies waiting for the compress stage."""
        return len(self._waiting)

    @property
    def waiting_bytes(self) -> int:
        return self._waiting_bytes

    def listen(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) whenever a body stops waiting, i.e. when room appears."""
        self._listeners.append(callback)

    def load(self) -> None:
        """(thread) At start: adopt the bodies and recycled files a previous run left, remove half-written bodies."""
        self.recycled_folder.mkdir(parents=True, exist_ok=True)
        for folder in self.request_folders():
            for path in folder.iterdir():
                if path.name.endswith(PART_SUFFIX):
                    path.unlink(missing_ok=True)
                else:
                    self._waiting[path] = path.stat().st_size
        self._waiting_bytes = sum(self._waiting.values())
        for recycled in sorted(self.recycled_folder.iterdir()):
            if len(self._recycled) < self.limit:
                self._recycled.append((recycled, recycled.stat().st_size))
            else:
                recycled.unlink(missing_ok=True)
        self.trim_recycled()

    def waiting_by_request(self) -> dict[str, list[Path]]:
        """The bodies waiting for the compress stage, by request id."""
        by_request: dict[str, list[Path]] = {}
        for path in list(self._waiting):
            by_request.setdefault(path.parent.name, []).append(path)
        return by_request

    def request_folders(self) -> list[Path]:
        """(thread) The folders of requests that have bodies on disk."""
        return [p for p in self.incoming.iterdir() if p.name != RECYCLED_FOLDER] if self.incoming.is_dir() else []

    # the download stage ----------------------------------------------------------------------
    def writer(self, path: Path) -> BodyWriter:
        return BodyWriter(self, path)

    def arrived(self, path: Path, size: int) -> None:
        """A body of `size` bytes is complete on disk and waits for the compress stage."""
        self._waiting_bytes += size - self._waiting.get(path, 0)
        self._waiting[path] = size

    def trim_recycled(self, extra: int = 0) -> None:
        """(thread) Delete the oldest recycled files while they, the waiting bodies and `extra` bytes more are over
        `limit_bytes`: recycled files go before any download has to wait."""
        if self.limit_bytes is None:
            return
        while self._recycled and self._waiting_bytes + extra + sum(size for _, size in self._recycled) > self.limit_bytes:
            try:
                recycled, _ = self._recycled.pop(0)
            except IndexError:  # another thread took the last one
                return
            recycled.unlink(missing_ok=True)

    def open_for_writing(self, partial: Path) -> tuple[Path, int]:
        """(thread) A file to write a new body into, and its descriptor: a recycled file when there is one, written
        where it lies (the writer truncates it to the new body's length), else `partial`, a new file."""
        while self._recycled:
            try:
                recycled, _ = self._recycled.pop()
                return recycled, os.open(recycled, os.O_WRONLY | os.O_CLOEXEC)
            except IndexError:  # another thread took the last one
                break
            except FileNotFoundError:  # removed behind our back: take the next
                continue
        try:
            return partial, os.open(partial, NEW_FILE, 0o644)
        except FileNotFoundError:  # the request's first body: its folder does not exist yet
            partial.parent.mkdir(parents=True, exist_ok=True)
            return partial, os.open(partial, NEW_FILE, 0o644)

    @staticmethod
    def put_in_place(written: Path, path: Path) -> None:
        """(thread) A complete body goes where the compress stage looks for it."""
        try:
            os.replace(written, path)
        except FileNotFoundError:  # written into a recycled file: the request's folder may not exist yet
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(written, path)

    # the compress stage and completion ---------------------------------------------------------
    def recycle(self, path: Path, size: int) -> None:
        """(thread) The compress stage is done with a body: it becomes a recycled file (or goes)."""
        try:
            # The body still counts as waiting here, so as a recycled file it keeps the total where it is.
            over_bytes = self.limit_bytes is not None and (
                self._waiting_bytes + sum(s for _, s in self._recycled) > self.limit_bytes)
            if size > RECYCLED_MAX_BYTES or len(self._recycled) >= self.limit or over_bytes:
                path.unlink()
                return
            recycled = self.recycled_folder / f"{self._run}-{next(self._names)}"
            os.replace(path, recycled)
        except FileNotFoundError:  # its request's folder went first
            return
        self._recycled.append((recycled, size))

    def released(self, path: Path) -> None:
        """The compress stage is done with a body: it stops waiting, which makes room for a download."""
        self._waiting_bytes -= self._waiting.pop(path, 0)
        self._notify()

    async def remove_request(self, request_id: str) -> None:
        """Remove what is left of a finished request's bodies."""
        folder = self.incoming / request_id
        self._waiting = {p: size for p, size in self._waiting.items() if p.parent != folder}
        self._waiting_bytes = sum(self._waiting.values())
        self._notify()
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    def empty(self) -> None:
        """(thread) At a clean stop: remove every body and recycled (see daemon.app.bodies_ctx)."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self._waiting, self._waiting_bytes, self._recycled = {}, 0, []

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()


class BodyWriter:
    """One body being downloaded: batches of chunks are written off the loop, then it is renamed into place.

    The download awaits `flush` and `complete`; the methods marked (thread) are what they run off the loop."""

    def __init__(self, bodies: Bodies, path: Path) -> None:
        self.bodies, self.path = bodies, path
        self.partial = path.with_name(path.name + PART_SUFFIX)
        self._file: Path | None = None  # a recycled file or `partial`, once opened
        self._fd: int | None = None
        self._written = 0

    async def flush(self, chunks: list[bytes]) -> None:
        await _to_thread_to_the_end(self.write_chunks, chunks)

    async def complete(self, chunks: list[bytes]) -> None:
        await _to_thread_to_the_end(self.finish, chunks)

    def write_chunks(self, chunks: list[bytes]) -> None:
        """(thread)"""
        if self._fd is None:
            self._file, self._fd = self.bodies.open_for_writing(self.partial)
        self._written += write_all(self._fd, chunks)

    def finish(self, chunks: list[bytes]) -> None:
        """(thread) Write the last chunks and rename the body into place."""
        self.write_chunks(chunks)
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._written)  # a recycled file may be longer than this body
        finally:
            os.close(self._fd)
            self._fd = None
        assert self._file is not None
        self.bodies.put_in_place(self._file, self.path)
        self.bodies.trim_recycled(extra=self._written)

    def discard(self) -> None:
        """The download failed or was cancelled: nothing of it stays (on the loop: a rare path)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)


async def _to_thread_to_the_end(fn: Callable[[list[bytes]], None], chunks: list[bytes]) -> None:
    """Run `fn` on a thread; if the caller is cancelled meanwhile, wait for the thread before passing the
    cancellation on. The caller then discards the body: closing its descriptor while the thread still wrote
    to it would let the write land in whatever file is opened next under the same number."""
    running = asyncio.ensure_future(asyncio.to_thread(fn, chunks))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():  # one write of at most about a megabyte: a short wait, even if cancelled again
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # retrieved: the cancellation is what the caller reports
        raise


def write_all(fd: int, chunks: list[bytes]) -> int:
    """(thread) Write `chunks` in order, in one system call when the kernel takes them all; returns the bytes
    written. One call, not one per chunk, also means one hand-over of the GIL, which the loop thread holds
    most of the time: each was a wait and a context switch."""
    pending = [memoryview(c) for c in chunks if c]
    total = 0
    while pending:
        written = os.writev(fd, pending[:IOV_MAX])
        if written == 0:
            raise OSError(f"the disk took none of {sum(map(len, pending))} bytes")
        total += written
        while written:  # a short write: drop what went out, keep the rest of a chunk cut in two
            if written >= len(pending[0]):
                written -= len(pending.pop(0))
            else:
                pending[0], written = pending[0][written:], 0
    return total
