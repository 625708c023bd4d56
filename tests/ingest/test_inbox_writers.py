"""The inbox and the programs writing into it: real writer subprocesses, real watchdog observers, real leases."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_inbox import accepted_requests, wait_archived

from daemon.config import Settings, replace
from daemon.ingest.inbox import ARCHIVE, file_system_type, lease_refusal

Serve = Callable[[Settings], AbstractAsyncContextManager[Any]]
CAP_LEASE = 28

# Opens argv[1] in mode argv[2] ("wb" or "ab"), writes argv[3], flushes, says "half" on stdout, waits argv[4] seconds
# or (if "stdin") for a line on stdin, writes argv[5], says "written", waits for a line on stdin if argv[6] is "hold",
# then closes the file and says "closed".
WRITER = """
import sys, time
path, mode, first, pause, rest, hold = sys.argv[1:]
with open(path, mode) as out:
    out.write(first.encode()); out.flush(); print("half", flush=True)
    if pause == "stdin":
        sys.stdin.readline()
    else:
        time.sleep(float(pause))
    out.write(rest.encode()); out.flush(); print("written", flush=True)
    if hold == "hold":
        sys.stdin.readline()
print("closed", flush=True)
"""


def four_rows(helpers: Any) -> tuple[bytes, bytes]:
    """A CSV of 4 rows, cut after its second row."""
    data = helpers.csv_bytes(helpers.batch_rows(4))
    cut = [m.end() for m in re.finditer(b"\n", data)][2]  # after the header and 2 rows
    return data[:cut], data[cut:]


class Writer:
    """A writer subprocess driven through its stdin and stdout."""

    def __init__(self, path: Path, first: bytes, pause: str, rest: bytes, hold: bool = False,
                 mode: str = "wb") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), mode, first.decode(), pause, rest.decode(), "hold" if hold else "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def said(self, word: str) -> None:
        assert self.process.stdout is not None
        line = await asyncio.to_thread(self.process.stdout.readline)
        assert line == word + "\n", line

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    async def closed(self) -> None:
        await self.said("closed")
        assert await asyncio.to_thread(self.process.wait, 10) == 0

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def leases(tmp_path: Path) -> None:
    """Skip where the kernel or file system gives no read leases (then only the window applies)."""
    refusal = lease_refusal(tmp_path)
    if refusal is not None:
        pytest.skip(refusal)


def test_the_file_system_type_is_the_one_findmnt_names(tmp_path: Path) -> None:
    """The inbox tells a network share from a local disk by the type the mount table gives the folder's device."""
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        pytest.skip("no findmnt")
    for folder in (tmp_path, Path("/proc"), Path("/dev")):
        expected = subprocess.run([findmnt, "-n", "-o", "FSTYPE", "--target", str(folder)], capture_output=True,
                                  text=True, check=True).stdout.strip()
        assert file_system_type(folder) == expected, folder


async def assert_taken_whole(helpers: Any, settings: Settings, served: Any, data: bytes) -> None:
    """catalog.csv was taken once, with its 4 rows."""
    archive = await wait_archived(helpers, settings, "catalog.csv")
    await served.inbox.idle()
    ((_, accepted),) = accepted_requests(helpers, settings)
    assert [p["serial"] for p in accepted["products"]] == ["1", "2", "3", "4"]
    assert archive.read_bytes() == data
    assert [p.name for p in (settings.path("inbox") / ARCHIVE).iterdir()] == [archive.name]


async def test_a_writer_pausing_mid_file_longer_than_the_window_loses_no_rows(
        serve_app: Serve, settings: Settings, helpers: Any, leases: None) -> None:
    """A writer that pauses for 8 windows after 2 complete rows, then writes 2 more, gives one request of 4 rows."""
    first, rest = four_rows(helpers)
    async with serve_app(settings) as served:
        with Writer(served.folder / "catalog.csv", first, str(8 * helpers.settle_seconds), rest) as writer:
            await writer.said("half")
            await writer.said("written")
            await writer.closed()
        await assert_taken_whole(helpers, settings, served, first + rest)


async def test_a_writer_keeping_the_file_open_without_writing_is_waited_for(
        serve_app: Serve, settings: Settings, helpers: Any, leases: None) -> None:
    """A file fully written but still open stays in the inbox however long, and is taken with every row once closed."""
    first, rest = four_rows(helpers)
    async with serve_app(settings) as served:
        target = served.folder / "catalog.csv"
        with Writer(target, first, "stdin", rest, hold=True) as writer:
            await writer.said("half")
            writer.go_on()
            await writer.said("written")
            await asyncio.sleep(6 * helpers.settle_seconds)  # several windows, and several looks by the daemon
            assert target.exists() and list((served.folder / ARCHIVE).iterdir()) == []
            writer.go_on()
            await writer.closed()
        await assert_taken_whole(helpers, settings, served, first + rest)


async def test_a_closed_file_is_taken_at_once_not_after_the_window(
        serve_app: Serve, settings: Settings, helpers: Any, leases: None) -> None:
    """With a 60 s window, a file whose writer closed it is still taken within seconds, and start-up says why."""
    slow = replace(settings, inbox={"settle_seconds": 60.0})
    with capture_logs() as logs:
        async with serve_app(slow) as served:
            (served.folder / "catalog.csv").write_bytes(helpers.sample_csv.read_bytes())
            await wait_archived(helpers, slow, "catalog.csv")
            await served.inbox.idle()
    assert [(e["check"], e["window_seconds"]) for e in logs if e["event"] == "inbox_check"] == [("lease", 60.0)]


def breaking_leases(inode: int) -> list[str]:
    """Lines of /proc/locks telling that a lease on `inode` is being broken (a writer's open waits for it)."""
    return [line for line in Path("/proc/locks").read_text().splitlines()
            if "LEASE" in line and "BREAKING" in line and f":{inode} " in line]


async def test_a_writer_opening_the_file_while_the_daemon_holds_its_lease_loses_nothing(
        serve_app: Serve, settings: Settings, helpers: Any, leases: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer opening the file just as it is claimed breaks the lease: the daemon gets no signal (SIGIO would end
    it), gives the file back, and takes it with every row after the writer closed it."""
    first, rest = four_rows(helpers)
    rename, writers = os.rename, []

    def rename_while_a_writer_opens(src: Any, dst: Any) -> None:
        """The claim's rename, held up until a writer subprocess is waiting in open() for the lease."""
        if Path(src).name == "catalog.csv" and not writers:
            inode = os.lstat(src).st_ino
            writers.append(Writer(Path(src), b"", "stdin", rest, mode="ab"))  # opens: waits for the lease
            deadline = time.monotonic() + 10
            while not breaking_leases(inode):
                assert time.monotonic() < deadline, "the writer never waited for the daemon's lease"
                time.sleep(0.01)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_while_a_writer_opens)
    try:
        async with serve_app(settings) as served:
            (served.folder / "catalog.csv").write_bytes(first)
            await helpers.eventually(lambda: writers, "a writer to open the file during the claim")
            await writers[0].said("half")  # its open returned: the daemon let go of the lease
            assert (served.folder / "catalog.csv").exists()  # given back, not ingested half-written
            writers[0].go_on()
            await writers[0].said("written")
            await writers[0].closed()
            await assert_taken_whole(helpers, settings, served, first + rest)
    finally:
        for writer in writers:
            writer.kill()


def has_cap_lease() -> bool:
    status = Path("/proc/self/status").read_text()
    (effective,) = re.findall(r"^CapEff:\s*([0-9a-f]+)$", status, re.M)
    return bool(int(effective, 16) >> CAP_LEASE & 1)


async def test_a_file_of_another_user_is_taken_after_the_window(
        serve_app: Serve, settings: Settings, helpers: Any, leases: None, request: pytest.FixtureRequest,
        tmp_path: Path) -> None:
    """A file the daemon may not lease (another user's, without CAP_LEASE) is taken once it kept still for the
    window, and the log says so."""
    if os.geteuid() != 0:
        pytest.skip("only root can make a file of another user")
    if has_cap_lease():  # run again without CAP_LEASE, as a daemon not running as root would be
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("no setpriv to drop CAP_LEASE")
        result = subprocess.run(
            [setpriv, "--bounding-set", "-lease", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--basetemp", str(tmp_path / "no-lease"), request.node.nodeid],
            cwd=request.config.rootpath, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0 and re.search(r"^1 passed", result.stdout, re.M), result.stdout + result.stderr
        return
    data = helpers.sample_csv.read_bytes()
    inbox = settings.path("inbox")
    inbox.mkdir(parents=True)
    foreign = inbox / ".theirs.csv"
    foreign.write_bytes(data)
    os.chown(foreign, 4321, 4321)
    with capture_logs() as logs:
        async with serve_app(settings) as served:
            os.rename(foreign, inbox / "theirs.csv")
            await wait_archived(helpers, settings, "theirs.csv")
            await served.inbox.idle()
    assert [(e["file"], e["reason"], e["check"]) for e in logs if e["event"] == "inbox_lease_refused"] == [
        ("theirs.csv", "Permission denied", "window")]
    assert len(accepted_requests(helpers, settings)) == 1
