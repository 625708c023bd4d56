"""The inbox: CSV files dropped into a folder are ingested exactly once.

A file is taken only once no process has it open for writing: on Linux a writer's close or a move into the
folder prompts a look, and a read lease (which the kernel refuses while a writer is left) proves it; where
leases are not available (network shares, other systems, another user's file) the file must instead keep its
size and mtime across `settle_seconds`. It is claimed by renaming it into `.claimed/<request_id>--<name>`
before anything is recorded, so after a crash the claim tells whether its request was already accepted.
Accepted files end in `archive/`, rejected ones in `rejected/` with a `.errors.txt` report beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import peewee
import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    EventsLostEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from daemon.config import LimitSettings
from daemon.eventlog.store import DatabaseAway, EventLog, StreamConflict
from daemon.events import RequestAccepted, names
from daemon.files import TEMP_FILES, remove_matching, write_atomic
from daemon.ingest.accept import accept, new_request_id
from daemon.ingest.csvfile import Batch, Problem, parse_csv
from daemon.outside_text import storable

log = structlog.get_logger("inbox")

CLAIMED, ARCHIVE, REJECTED = ".claimed", "archive", "rejected"
ACCEPTED = names(RequestAccepted)
# File names are at most 255 bytes. Ours add "<request_id>--" (34) to the inbox name, and the longest file made
# from it, a rejection report written atomically (".<name>.errors.txt.<16 hex>.tmp"), 33 more.
MAX_NAME_BYTES = 255 - 34 - 33
ELLIPSIS = "…"
INGEST_ATTEMPTS = 5
NETWORK_FILE_SYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "ceph", "glusterfs",
                                  "lustre", "afs", "gfs2", "ocfs2"})
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp", ".swx", ".download")


def fitted_name(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """`name`, shortened in its middle if its UTF-8 form is over `limit` bytes; the extension is kept."""
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    suffix = ELLIPSIS + dot + extension if stem else ELLIPSIS
    room = limit - len(suffix.encode("utf-8"))
    return (stem or name).encode("utf-8")[:room].decode("utf-8", "ignore") + suffix


def is_candidate(name: str) -> bool:
    """A CSV someone dropped, not a hidden, temporary or editor file."""
    lower = name.lower()
    if lower.startswith((".", "~", "#")) or lower.endswith(("~", "#")) or lower.endswith(TEMPORARY_SUFFIXES):
        return False
    return lower.endswith(".csv")


class Outcome(enum.Enum):
    TAKEN = "taken"
    BUSY = "busy"  # some process has it open for writing (or was opening it)
    GONE = "gone"
    SKIPPED = "skipped"  # not a regular file
    NO_LEASE = "no lease"  # refused for this file or file system: the window decides instead


def _lease(fd: int) -> None:
    """Take a read lease on `fd` (opened read-only); raises BlockingIOError while any writer has the file open.

    A writer opening the file breaks the lease, which signals its owner, by default with SIGIO, whose default
    action ends the process: the signal is set to SIGURG (ignored by default) and the owner cleared, so a break
    sends nothing at all. The writer's open waits until the lease is released (microseconds here).
    """
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    fcntl.fcntl(fd, fcntl.F_SETOWN, 0)  # taking the lease made this process the owner


def file_system_type(folder: Path) -> str:
    """The type of the file system holding `folder` as /proc/self/mountinfo names it ("" if not found)."""
    st = os.stat(folder)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = ""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields, _, rest = line.partition(" - ")
            if fields.split()[2:3] == [device]:
                found = rest.split()[0]  # the last mount of the device is the one in view
    return found


def lease_refusal(folder: Path) -> str | None:
    """Why read leases cannot prove files in `folder` unwritten (None: they can), tried on a hidden probe file."""
    if not hasattr(fcntl, "F_SETLEASE"):
        return "this system has no file leases"
    kind = file_system_type(folder)
    if kind in NETWORK_FILE_SYSTEMS or kind.startswith("fuse"):
        # Some grant leases (NFSv4 with a delegation), but a writer on another machine never breaks them.
        return f"a network or FUSE file system ({kind}): leases do not see writers on other machines"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".imgpipe-lease-probe-")
    except OSError as exc:
        return f"no probe file can be made in the inbox: {exc.strerror}"
    os.close(handle)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _lease(fd)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError as exc:
            return f"the file system refuses leases: {exc.strerror}"
        finally:
            os.close(fd)
    finally:
        os.unlink(probe)
    return None


def claim_unless_written(path: Path, claimed: Path) -> tuple[Outcome, str]:
    """Rename `path` to `claimed` while holding a read lease on it, so no process has it open for writing, and
    none can open it meanwhile. NO_LEASE comes with the reason."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Outcome.GONE, ""
    if not stat.S_ISREG(st.st_mode):  # never opened: opening a device or pipe can block or have effects
        return Outcome.SKIPPED, ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Outcome.GONE, ""
    except BlockingIOError:  # another process's write lease (e.g. Samba) has it
        return Outcome.BUSY, ""
    except OSError as exc:  # e.g. unreadable: the window decides, then the claim is rejected saying why
        return Outcome.NO_LEASE, exc.strerror or str(exc)
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            return Outcome.BUSY, ""  # replaced since the lstat: look again
        try:
            _lease(fd)
        except BlockingIOError:
            return Outcome.BUSY, ""
        except OSError as exc:  # EACCES (another user's file), EINVAL/ENOLCK (NFS, FUSE, overlay, leases off)
            return Outcome.NO_LEASE, exc.strerror or str(exc)
        try:
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                return Outcome.GONE, ""
            if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK or os.lstat(claimed).st_ino != st.st_ino:
                # A writer began opening it (its open waits for this lease), or another file took the name meanwhile:
                # put it back, so the writer goes on writing under the inbox name.
                os.rename(claimed, path)
                return Outcome.BUSY, ""
            return Outcome.TAKEN, ""
        finally:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def report_text(name: str, problems: list[Problem]) -> str:
    lines = [f"{name} was rejected: {len(problems)} problem(s). Nothing from it was accepted.", ""]
    lines += [str(p) for p in problems]
    lines += ["", "Fix the file and drop it into the inbox again."]
    return "\n".join(lines) + "\n"


# Events after which a file may be complete: a writer closed it, it was moved in, or it got a name (a hard link has
# no close). Opens and reads (also the daemon's own) change nothing and are not passed on.
PROMPTS = frozenset({EVENT_TYPE_CLOSED, EVENT_TYPE_MOVED, EVENT_TYPE_CREATED})
READS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: only hands paths to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seen: Callable[[Path, bool], None]) -> None:
        self._loop, self._seen = loop, seen

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):  # the kernel's queue overflowed: look at every file again
            for entry in os.scandir(event.src_path):
                self._loop.call_soon_threadsafe(self._seen, Path(os.fsdecode(entry.path)), True)
            return
        if event.is_directory or event.event_type in READS:
            return
        path = getattr(event, "dest_path", "") or event.src_path
        path = os.fsdecode(path)
        self._loop.call_soon_threadsafe(self._seen, Path(path), event.event_type in PROMPTS)


class Inbox:
    def __init__(self, folder: Path, eventlog: EventLog, limits: LimitSettings, settle_seconds: float,
                 node: str = "") -> None:
        self.folder, self.node = folder, node  # node: this daemon's, when several share the database
        self._eventlog, self._limits, self._settle = eventlog, limits, settle_seconds
        self._pending: dict[Path, asyncio.Task[None]] = {}  # seen, not yet claimed
        self._prompts: dict[Path, asyncio.Event] = {}  # set when a pending file may have been closed
        self._leases = False  # whether read leases prove files unwritten here (else: the window)
        self._claimed: set[asyncio.Task[None]] = set()  # claimed, being ingested
        self._observer: Observer | None = None  # type: ignore[valid-type]

    async def start(self) -> None:
        for sub in (CLAIMED, ARCHIVE, REJECTED):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(remove_matching, self.folder / REJECTED, TEMP_FILES)  # reports a crash cut short
        for claimed in sorted((self.folder / CLAIMED).iterdir()):
            await self._ingest_claimed(claimed)
        refusal = await asyncio.to_thread(lease_refusal, self.folder)
        self._leases = refusal is None
        if refusal is None:
            log.info("inbox_check", check="lease", folder=str(self.folder), window_seconds=self._settle,
                     note="taken once no process has it open for writing; the window only for files not leasable")
        else:
            log.info("inbox_check", check="window", folder=str(self.folder), window_seconds=self._settle,
                     reason=refusal)
        observer = Observer()
        observer.schedule(_Handler(asyncio.get_running_loop(), self._seen), str(self.folder), recursive=False)
        await asyncio.to_thread(observer.start)
        self._observer = observer
        # Files that arrived while the daemon was down (the observer only reports new changes).
        for path in sorted(self.folder.iterdir()):
            self._seen(path)

    async def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)
            self._observer = None
        tasks = [*self._pending.values(), *self._claimed]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until every file seen so far is ingested or rejected (tests)."""
        while self._pending or self._claimed:
            await asyncio.gather(*self._pending.values(), *self._claimed, return_exceptions=True)

    def _seen(self, path: Path, prompt: bool = True) -> None:
        if path.parent != self.folder or not is_candidate(path.name):
            return
        if path in self._pending:
            if prompt:
                self._prompts[path].set()
            return
        prompted = self._prompts[path] = asyncio.Event()
        task = asyncio.create_task(self._take(path, prompted), name=f"inbox:{path.name}")
        self._pending[path] = task
        task.add_done_callback(lambda done: self._forget(path, done))

    def _forget(self, path: Path, task: asyncio.Task[None]) -> None:
        if self._pending.get(path) is task:
            del self._pending[path]
            del self._prompts[path]

    async def _take(self, path: Path, prompted: asyncio.Event) -> None:
        try:
            claimed = await self._claim(path, prompted)
            if claimed is None:
                return
            # The name is free again: a new file dropped under it now is a new batch.
            self._prompts.pop(path, None)
            task = self._pending.pop(path, None)
            if task is not None:
                self._claimed.add(task)
                task.add_done_callback(self._claimed.discard)
            await self._retrying(claimed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("inbox_error", file=path.name)

    async def _retrying(self, claimed: Path) -> None:
        """Ingest a claimed file, again after a pause if it failed (e.g. the database was locked)."""
        attempt = 0
        while True:
            try:
                # A full disk (the database, or the inbox's own folders) pauses it without spending attempts.
                await self._eventlog.space.retry_while_full("inbox", lambda: self._ingest_claimed(claimed))
                return
            except DatabaseAway:  # not the file's fault: wait for the server, spending no attempt
                await self._eventlog.reachable()
            except (OSError, peewee.DatabaseError):
                attempt += 1
                if attempt == INGEST_ATTEMPTS:
                    raise  # logged by the caller; the claim is retried at the next start
                log.warning("inbox_retrying", file=claimed.name, attempt=attempt, exc_info=True)
                await asyncio.sleep(min(30.0, 2.0 ** attempt))

    async def _claim(self, path: Path, prompted: asyncio.Event) -> Path | None:
        """Rename `path` into .claimed/ once no process writes it any more; None if it went away or is no file."""
        windowed = not self._leases
        while True:
            claimed = self.folder / CLAIMED / f"{new_request_id()}--{fitted_name(storable(path.name))}"
            if windowed:
                if not await self._settled(path):
                    return None
                try:
                    await asyncio.to_thread(os.rename, path, claimed)
                except FileNotFoundError:
                    return None  # taken away (or claimed) meanwhile
                return claimed
            prompted.clear()
            outcome, reason = await asyncio.to_thread(claim_unless_written, path, claimed)
            if outcome is Outcome.TAKEN:
                return claimed
            if outcome is Outcome.GONE:
                return None
            if outcome is Outcome.SKIPPED:
                log.info("inbox_skipped", file=path.name, reason="not a regular file (symlinks are not followed)")
                return None
            if outcome is Outcome.NO_LEASE:
                log.info("inbox_lease_refused", file=path.name, reason=reason, check="window",
                         window_seconds=self._settle)
                windowed = True
                continue
            # A writer still has it open: its close prompts the next look. Events can be lost (a full queue), so
            # look again now and then anyway.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(prompted.wait(), self._settle)

    async def _settled(self, path: Path) -> bool:
        """Wait until size and mtime stop changing; False if the file went away."""
        last: tuple[int, int] | None = None
        while True:
            try:
                st = path.lstat()
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(st.st_mode):
                log.info("inbox_skipped", file=path.name, reason="not a regular file (symlinks are not followed)")
                return False
            now = (st.st_size, st.st_mtime_ns)
            if now == last:
                return True
            last = now
            await asyncio.sleep(self._settle)

    async def _ingest_claimed(self, claimed: Path) -> None:
        request_id, _, name = claimed.name.partition("--")
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self._ingest(claimed, request_id, name)

    async def _parse(self, claimed: Path) -> Batch | list[Problem]:
        """The claimed file's batch, or what is wrong with the file; other errors (e.g. EMFILE) are raised."""
        limit = self._limits.max_upload_bytes
        try:
            st = await asyncio.to_thread(claimed.lstat)
            # Only files are claimed, but a claim left from before a restart may have been replaced by hand.
            if not stat.S_ISREG(st.st_mode):
                return [Problem(1, "", "not a regular file (a folder, link, pipe or device)")]
            if st.st_size > limit:  # the same limit as an upload; never read
                return [Problem(1, "", f"the CSV is larger than the limit of {limit} bytes")]
            data = await asyncio.to_thread(claimed.read_bytes)
        except PermissionError as exc:
            return [Problem(1, "", f"the file cannot be read: {exc.strerror}")]
        return await asyncio.to_thread(parse_csv, data, self._limits)

    async def _ingest(self, claimed: Path, request_id: str, name: str) -> None:
        # A claim left by a crash whose request was recorded: whatever the file says now (stricter limits since,
        # or a file changed by hand), it was accepted, and it is archived like any accepted file.
        if await self._eventlog.read_stream(request_id, ACCEPTED):
            log.info("inbox_claim_recovered", source_name=name, note="accepted before a restart")
            os.replace(claimed, self.folder / ARCHIVE / claimed.name)
            return
        parsed = await self._parse(claimed)
        if isinstance(parsed, list):
            target = self.folder / REJECTED / claimed.name
            await asyncio.to_thread(write_atomic, target.with_name(target.name + ".errors.txt"),
                                    report_text(name, parsed).encode("utf-8"))
            os.replace(claimed, target)
            log.info("csv_rejected", source="inbox", source_name=name, problems=len(parsed),
                     first_problem=str(parsed[0]), moved_to=str(target))
            return
        try:
            await accept(self._eventlog, parsed, "inbox", name, request_id=request_id, node=self.node)
        except StreamConflict:
            log.info("inbox_claim_recovered", source_name=name, note="accepted before a restart")
        os.replace(claimed, self.folder / ARCHIVE / claimed.name)
