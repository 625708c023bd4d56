"""The inbox folder: real watchdog observers on temp folders, the daemon's app served on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.config import Settings, replace
from daemon.eventlog.store import open_store
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.ingest.inbox import ARCHIVE, CLAIMED, REJECTED, Inbox

Serve = Callable[[Settings], AbstractAsyncContextManager[Any]]

IGNORED_NAMES = (".batch.csv", "batch.csv.tmp", "~batch.csv", "batch.csv~", ".#x.csv", "#x.csv#", "notes.txt",
                 "batch.csv.part", "batch.csv.crdownload", "batch.CSV.swp")


def archived(settings: Settings, name: str) -> list[Path]:
    """Files in archive/ named `<request_id>--<name>`."""
    return sorted((settings.path("inbox") / ARCHIVE).glob(f"*--{name}"))


def request_id_of(path: Path) -> str:
    request_id, sep, _ = path.name.partition("--")
    assert sep and len(request_id) == 32, path.name
    return request_id


async def wait_archived(helpers: Any, settings: Settings, name: str) -> Path:
    """The archive copy of `name`, once there is one."""
    found = await helpers.eventually(lambda: archived(settings, name), f"{name} to be archived")
    assert len(found) == 1, found
    return found[0]


def accepted_requests(helpers: Any, settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """(stream, data) of every RequestAccepted in the log."""
    return [(stream, data) for _, stream, _, kind, data in helpers.stored_events(settings) if kind == "RequestAccepted"]


async def test_dropped_file_is_ingested_once_archived_and_has_a_status(serve_app: Serve, settings: Settings,
                                                                       helpers: Any) -> None:
    """A CSV dropped into the inbox is accepted once, moved to archive/<request_id>--name, and its status answers."""
    data = helpers.sample_csv.read_bytes()
    with capture_logs() as logs:
        async with serve_app(settings) as served:
            (served.folder / "batch.csv").write_bytes(data)
            path = await wait_archived(helpers, settings, "batch.csv")
            await served.inbox.idle()
            request_id = request_id_of(path)
            status = await served.status_when_ready(request_id)
    assert path.read_bytes() == data
    assert not (settings.path("inbox") / "batch.csv").exists()
    assert list((settings.path("inbox") / CLAIMED).iterdir()) == []
    assert list((settings.path("inbox") / REJECTED).iterdir()) == []
    assert [(stream, d["source"], d["source_name"]) for stream, d in accepted_requests(helpers, settings)] == [
        (request_id, "inbox", "batch.csv")]
    assert status["source"] == {"kind": "inbox", "name": "batch.csv"}
    assert status["progress"] == {"images": 6, "done": 0, "failed": 0, "pending": 6}
    assert [(e["request_id"], e["source"], e["source_name"], e["products"], e["images"])
            for e in logs if e["event"] == "csv_accepted"] == [(request_id, "inbox", "batch.csv", 2, 6)]


async def test_dropping_the_same_name_again_is_a_new_request(serve_app: Serve, settings: Settings,
                                                             helpers: Any) -> None:
    """A second file with the same name, dropped after the first was taken, is a second request."""
    async with serve_app(settings) as served:
        (served.folder / "daily.csv").write_bytes(helpers.csv_bytes(helpers.batch_rows(1)))
        first = await wait_archived(helpers, settings, "daily.csv")
        (served.folder / "daily.csv").write_bytes(helpers.csv_bytes(helpers.batch_rows(2)))
        both = await helpers.eventually(lambda: len(archived(settings, "daily.csv")) == 2 and
                                        archived(settings, "daily.csv"), "the second daily.csv to be archived")
        await served.inbox.idle()
    second = next(p for p in both if p != first)
    accepted = dict(accepted_requests(helpers, settings))
    assert set(accepted) == {request_id_of(first), request_id_of(second)}
    assert len(accepted[request_id_of(second)]["products"]) == 2


async def test_file_written_slowly_is_taken_only_when_complete(serve_app: Serve, settings: Settings,
                                                               helpers: Any) -> None:
    """A file written in chunks over longer than settle_seconds is ingested once, with every row."""
    rows = helpers.batch_rows(60)
    data = helpers.csv_bytes(rows)
    size = len(data) // 16 + 1
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    interval = helpers.settle_seconds / 6
    assert len(chunks) * interval > 2.5 * helpers.settle_seconds  # writing spans several settle periods
    async with serve_app(settings) as served:
        target = served.folder / "slow.csv"
        with open(target, "wb") as out:
            for chunk in chunks:  # chunk boundaries fall mid-line, so an early take would be visible
                out.write(chunk)
                out.flush()
                await asyncio.sleep(interval)
        path = await wait_archived(helpers, settings, "slow.csv")
        await served.inbox.idle()
    assert path.read_bytes() == data
    ((_, accepted),) = accepted_requests(helpers, settings)
    assert [p["serial"] for p in accepted["products"]] == [serial for serial, _, _ in rows]
    assert list((settings.path("inbox") / REJECTED).iterdir()) == []


async def test_file_present_before_start_up_is_picked_up(serve_app: Serve, settings: Settings,
                                                         helpers: Any) -> None:
    """A CSV already in the inbox when the daemon starts is ingested."""
    inbox = settings.path("inbox")
    inbox.mkdir(parents=True)
    (inbox / "waiting.csv").write_bytes(helpers.sample_csv.read_bytes())
    async with serve_app(settings) as served:
        path = await wait_archived(helpers, settings, "waiting.csv")
        await served.inbox.idle()
        status = await served.status_when_ready(request_id_of(path))
    assert status["source"] == {"kind": "inbox", "name": "waiting.csv"}


async def test_hidden_temporary_and_editor_files_are_never_taken(serve_app: Serve, settings: Settings,
                                                                 helpers: Any) -> None:
    """Hidden, temporary, editor and non-CSV files stay where they are, before and after start-up."""
    data = helpers.sample_csv.read_bytes()
    inbox = settings.path("inbox")
    inbox.mkdir(parents=True)
    for name in IGNORED_NAMES:
        (inbox / name).write_bytes(data)
    async with serve_app(settings) as served:
        for name in IGNORED_NAMES:  # touched again while watched
            with open(inbox / name, "ab") as out:
                out.write(b"3,SKU3,https://a.example/3.jpg\n")
        (inbox / "sentinel.csv").write_bytes(data)  # written last: its events come after theirs
        sentinel = await wait_archived(helpers, settings, "sentinel.csv")
        await served.inbox.idle()
    for name in IGNORED_NAMES:
        assert (inbox / name).read_bytes() == data + b"3,SKU3,https://a.example/3.jpg\n", name
    assert [stream for stream, _ in accepted_requests(helpers, settings)] == [request_id_of(sentinel)]
    assert [p.name for p in (inbox / ARCHIVE).iterdir()] == [sentinel.name]


async def test_symlinked_csv_is_not_followed(serve_app: Serve, settings: Settings, helpers: Any,
                                             tmp_path: Path) -> None:
    """A symlink named like a CSV is left alone: the daemon never reads what it points at."""
    secret = tmp_path / "secret.csv"
    secret.write_bytes(helpers.sample_csv.read_bytes())
    inbox = settings.path("inbox")
    inbox.mkdir(parents=True)
    (inbox / "link.csv").symlink_to(secret)
    async with serve_app(settings) as served:
        (inbox / "sentinel.csv").write_bytes(helpers.sample_csv.read_bytes())
        sentinel = await wait_archived(helpers, settings, "sentinel.csv")
        await served.inbox.idle()
    assert (inbox / "link.csv").is_symlink()
    assert [stream for stream, _ in accepted_requests(helpers, settings)] == [request_id_of(sentinel)]


async def test_temporary_file_renamed_to_csv_inside_the_inbox_is_taken(serve_app: Serve, settings: Settings,
                                                                       helpers: Any) -> None:
    """A file written as batch.csv.part and then renamed to batch.csv in the inbox is ingested."""
    async with serve_app(settings) as served:
        part = served.folder / "renamed.csv.part"
        part.write_bytes(helpers.sample_csv.read_bytes())
        os.rename(part, served.folder / "renamed.csv")
        await wait_archived(helpers, settings, "renamed.csv")
        await served.inbox.idle()
    assert len(accepted_requests(helpers, settings)) == 1


async def test_file_moved_in_atomically_is_taken(serve_app: Serve, settings: Settings, helpers: Any,
                                                 tmp_path: Path) -> None:
    """A CSV renamed into the inbox from a sibling folder (an atomic move) is ingested."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "moved.csv").write_bytes(helpers.sample_csv.read_bytes())
    async with serve_app(settings) as served:
        os.rename(staging / "moved.csv", served.folder / "moved.csv")
        path = await wait_archived(helpers, settings, "moved.csv")
        await served.inbox.idle()
        await served.status_when_ready(request_id_of(path))
    assert len(accepted_requests(helpers, settings)) == 1


async def test_rejected_file_goes_to_rejected_with_a_report(serve_app: Serve, settings: Settings,
                                                            helpers: Any) -> None:
    """An invalid CSV lands in rejected/ beside a .errors.txt listing every problem by line; nothing is recorded."""
    data = helpers.csv_bytes([("1", "SKU1", "ftp://a.example/1.jpg"), ("2", "", "https://a.example/2.jpg"),
                              ("1", "SKU3", "https://a.example/3.jpg")])
    with capture_logs() as logs:
        async with serve_app(settings) as served:
            (served.folder / "bad.csv").write_bytes(data)
            reports = await helpers.eventually(
                lambda: sorted((served.folder / REJECTED).glob("*--bad.csv.errors.txt")), "the rejection report")
            await served.inbox.idle()
    (report,) = reports
    moved = report.with_name(report.name.removesuffix(".errors.txt"))
    assert moved.read_bytes() == data
    assert not (settings.path("inbox") / "bad.csv").exists()
    assert list((settings.path("inbox") / ARCHIVE).iterdir()) == []
    assert report.read_text(encoding="utf-8").splitlines() == [
        "bad.csv was rejected: 3 problem(s). Nothing from it was accepted.",
        "",
        "line 2, column 'Input Image Urls': only http and https URLs are accepted, got 'ftp://a.example/1.jpg'",
        "line 3, column 'Product Name': missing product name",
        "line 4, column 'S. No.': duplicate serial number '1' (first on line 2)",
        "",
        "Fix the file and drop it into the inbox again.",
    ]
    assert helpers.query(settings, "SELECT count(*) FROM events") == [(0,)]
    rejected = [e for e in logs if e["event"] == "csv_rejected"]
    assert [(e["source"], e["source_name"], e["problems"]) for e in rejected] == [("inbox", "bad.csv", 3)]
    assert [e for e in logs if e["event"] == "csv_accepted"] == []


async def test_a_file_whose_name_is_too_long_to_prefix_is_ingested_under_a_shortened_name(
        serve_app: Serve, settings: Settings, helpers: Any) -> None:
    """A 240-character name (or 120 two-byte characters) cannot take the 34-character request-id prefix within a
    file name's 255 bytes: it is accepted under a name shortened in the middle, and a bad one gets its report."""
    good, bad = "L" * 236 + ".csv", "\u00e9" * 116 + ".csv"
    async with serve_app(settings) as served:
        (served.folder / good).write_bytes(helpers.sample_csv.read_bytes())
        (served.folder / bad).write_bytes(helpers.csv_bytes([("1", "", "https://a.example/1.jpg")]))
        reports = await helpers.eventually(lambda: sorted((served.folder / REJECTED).glob("*.errors.txt")),
                                           "the rejection report")
        (archive,) = await helpers.eventually(lambda: sorted((served.folder / ARCHIVE).iterdir()), "the archive")
        await served.inbox.idle()
        status = await served.status_when_ready(request_id_of(archive))
    shortened = archive.name.partition("--")[2]
    assert shortened.startswith("L" * 100) and shortened.endswith("\u2026.csv")
    assert len(archive.name.encode()) <= 255 - 33 and status["source"] == {"kind": "inbox", "name": shortened}
    (report,) = reports
    assert len(report.name.encode()) <= 255 - 22
    assert report.read_text(encoding="utf-8").startswith("\u00e9" * 50)
    assert not (served.folder / good).exists() and not (served.folder / bad).exists()
    assert list((served.folder / CLAIMED).iterdir()) == []


async def test_files_named_in_latin1_are_taken_and_shown_with_replacement_characters(
        serve_app: Serve, settings: Settings, helpers: Any) -> None:
    """A file named in Latin-1 (as unzipped from a Windows archive) is ingested, and a bad one rejected with its
    report, under its name with U+FFFD for the byte that is not UTF-8; before, neither was ever taken."""
    good, bad = os.fsdecode("März.csv".encode("latin-1")), os.fsdecode("Juni-Lücke.csv".encode("latin-1"))
    async with serve_app(settings) as served:
        (served.folder / good).write_bytes(helpers.sample_csv.read_bytes())
        (served.folder / bad).write_bytes(helpers.csv_bytes([("1", "", "https://a.example/1.jpg")]))
        (report,) = await helpers.eventually(lambda: sorted((served.folder / REJECTED).glob("*.errors.txt")),
                                             "the rejection report")
        archive = await wait_archived(helpers, settings, "M\ufffdrz.csv")
        await served.inbox.idle()
        status = await served.status_when_ready(request_id_of(archive))
    assert status["source"] == {"kind": "inbox", "name": "M\ufffdrz.csv"}
    assert report.name.endswith("--Juni-L\ufffdcke.csv.errors.txt")
    assert report.read_text(encoding="utf-8").startswith("Juni-L\ufffdcke.csv was rejected")
    assert not (served.folder / good).exists() and not (served.folder / bad).exists()
    assert list((served.folder / CLAIMED).iterdir()) == []


async def accept_directly(settings: Settings, request_id: str, data: bytes, name: str) -> None:
    """Record a request as the inbox would have before a crash (then close, as the crashed daemon did)."""
    batch = parse_csv(data, settings.limits)
    assert isinstance(batch, Batch)
    eventlog = open_store(settings.database_url)
    await eventlog.open()
    try:
        await accept(eventlog, batch, "inbox", name, request_id=request_id)
    finally:
        await eventlog.close()


async def test_claimed_file_already_accepted_is_archived_not_ingested_again(serve_app: Serve, settings: Settings,
                                                                           helpers: Any) -> None:
    """After a crash between accepting and archiving, the claimed file is archived and not accepted twice."""
    request_id, data = "a" * 32, helpers.sample_csv.read_bytes()
    settings.path("inbox").mkdir(parents=True)
    await accept_directly(settings, request_id, data, "crashed.csv")
    claimed = settings.path("inbox") / CLAIMED / f"{request_id}--crashed.csv"
    claimed.parent.mkdir()
    claimed.write_bytes(data)
    events_before = helpers.stored_events(settings)
    with capture_logs() as logs:
        async with serve_app(settings) as served:
            path = await wait_archived(helpers, settings, "crashed.csv")
            await served.inbox.idle()
            status = await served.status_when_ready(request_id)
    assert path.name == f"{request_id}--crashed.csv"
    assert not claimed.exists()
    assert helpers.stored_events(settings) == events_before
    assert status["progress"]["images"] == 6
    assert [e["event"] for e in logs if e["event"] in {"csv_accepted", "inbox_claim_recovered"}] == [
        "inbox_claim_recovered"]


async def test_a_claim_accepted_before_a_crash_is_archived_even_if_it_no_longer_passes(
        serve_app: Serve, settings: Settings, helpers: Any) -> None:
    """A claim whose request was recorded before a crash is archived after a restart with stricter limits (and a
    file changed by hand since), never rejected with a report saying nothing was accepted."""
    request_id, data = "b" * 32, helpers.sample_csv.read_bytes()
    settings.path("inbox").mkdir(parents=True)
    await accept_directly(settings, request_id, data, "crashed.csv")
    claimed = settings.path("inbox") / CLAIMED / f"{request_id}--crashed.csv"
    claimed.parent.mkdir()
    claimed.write_bytes(data + b"not,a,row,of,this,file\n")
    events_before = helpers.stored_events(settings)
    async with serve_app(replace(settings, limits={"max_rows": 1})) as served:
        path = await wait_archived(helpers, settings, "crashed.csv")
        await served.inbox.idle()
    assert path.name == f"{request_id}--crashed.csv" and not claimed.exists()
    assert list((settings.path("inbox") / REJECTED).iterdir()) == []
    assert helpers.stored_events(settings) == events_before


async def test_claimed_file_not_yet_accepted_is_ingested_under_its_claim_id(serve_app: Serve, settings: Settings,
                                                                           helpers: Any) -> None:
    """After a crash between claiming and accepting, the claimed file is accepted under the id in its name."""
    request_id = "b" * 32
    claimed = settings.path("inbox") / CLAIMED / f"{request_id}--half.csv"
    claimed.parent.mkdir(parents=True)
    claimed.write_bytes(helpers.sample_csv.read_bytes())
    async with serve_app(settings) as served:
        path = await wait_archived(helpers, settings, "half.csv")
        await served.inbox.idle()
        status = await served.status_when_ready(request_id)
    assert path.name == f"{request_id}--half.csv"
    assert not claimed.exists()
    assert [(stream, d["source_name"]) for stream, d in accepted_requests(helpers, settings)] == [
        (request_id, "half.csv")]
    assert status["source"] == {"kind": "inbox", "name": "half.csv"}


async def test_a_claim_that_is_not_a_readable_file_is_rejected_and_start_up_goes_on(
        serve_app: Serve, settings: Settings, helpers: Any) -> None:
    """A claim found at start-up that is a folder, a pipe or a symlink is moved to rejected/ with a report, and the
    claims beside it are still ingested."""
    claims = settings.path("inbox") / CLAIMED
    claims.mkdir(parents=True)
    (claims / f"{'c' * 32}--folder.csv").mkdir()
    os.mkfifo(claims / f"{'d' * 32}--pipe.csv")  # never opened: reading it would wait for a writer forever
    outside = settings.path("inbox").parent / "elsewhere.csv"
    outside.write_bytes(helpers.sample_csv.read_bytes())
    (claims / f"{'e' * 32}--link.csv").symlink_to(outside)
    (claims / f"{'f' * 32}--good.csv").write_bytes(helpers.sample_csv.read_bytes())
    with capture_logs() as logs:
        async with serve_app(settings) as served:
            await served.inbox.idle()
            status = await served.status_when_ready("f" * 32)
    assert status["source"] == {"kind": "inbox", "name": "good.csv"}
    assert [stream for stream, _ in accepted_requests(helpers, settings)] == ["f" * 32]
    rejected = settings.path("inbox") / REJECTED
    for request_id, name in (("c", "folder.csv"), ("d", "pipe.csv"), ("e", "link.csv")):
        report = rejected / f"{request_id * 32}--{name}.errors.txt"
        assert report.read_text(encoding="utf-8").splitlines()[:3] == [
            f"{name} was rejected: 1 problem(s). Nothing from it was accepted.", "",
            "line 1: not a regular file (a folder, link, pipe or device)"]
        assert os.path.lexists(rejected / f"{request_id * 32}--{name}")
    assert (rejected / f"{'e' * 32}--link.csv").is_symlink() and outside.exists()
    assert list(claims.iterdir()) == []
    assert sorted(e["source_name"] for e in logs if e["event"] == "csv_rejected") == [
        "folder.csv", "link.csv", "pipe.csv"]


def rerun_without_root_override(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Run this test again in a new user namespace. There root's own files get no CAP_DAC_OVERRIDE (their
    owner is not mapped into it), so a file with mode 0 cannot be read, as for any other user; root can still
    traverse and write what it owns."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and no user namespace to drop root's override of file permissions")
    result = subprocess.run(
        [unshare, "--user", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "unprivileged"), request.node.nodeid],
        cwd=request.config.rootpath, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and re.search(r"^1 passed", result.stdout, re.M), result.stdout + result.stderr


async def test_an_unreadable_claim_is_rejected_and_start_up_goes_on(serve_app: Serve, settings: Settings,
                                                                     helpers: Any, request: pytest.FixtureRequest,
                                                                     tmp_path: Path) -> None:
    """A claim found at start-up that cannot be read is moved to rejected/ with a report saying so."""
    if os.geteuid() == 0:
        rerun_without_root_override(request, tmp_path)
        return
    claims = settings.path("inbox") / CLAIMED
    claims.mkdir(parents=True)
    unreadable = claims / f"{'c' * 32}--secret.csv"
    unreadable.write_bytes(helpers.sample_csv.read_bytes())
    unreadable.chmod(0)
    (claims / f"{'f' * 32}--good.csv").write_bytes(helpers.sample_csv.read_bytes())
    async with serve_app(settings) as served:
        await served.inbox.idle()
        await served.status_when_ready("f" * 32)
    report = settings.path("inbox") / REJECTED / f"{'c' * 32}--secret.csv.errors.txt"
    assert report.read_text(encoding="utf-8").splitlines()[2] == "line 1: the file cannot be read: Permission denied"
    assert list(claims.iterdir()) == []


async def test_stop_leaves_no_observer_thread_behind(settings: Settings, helpers: Any) -> None:
    """Inbox.stop() joins the watchdog observer: no thread it started is left running."""
    eventlog = open_store(settings.database_url)
    await eventlog.open()
    await asyncio.to_thread(lambda: None)  # the loop's default executor exists before the snapshot
    before = set(threading.enumerate())
    inbox = Inbox(settings.path("inbox"), eventlog, settings.limits, settings.inbox.settle_seconds)
    try:
        await inbox.start()
        started = [t for t in threading.enumerate() if t not in before]
        assert any(t.is_alive() and t is inbox._observer for t in started), started
        (inbox.folder / "one.csv").write_bytes(helpers.sample_csv.read_bytes())
        await helpers.eventually(lambda: archived(settings, "one.csv"), "one.csv to be archived")
        await inbox.idle()
    finally:
        await inbox.stop()
        await eventlog.close()
    leaked = [t for t in threading.enumerate()
              if t not in before and not t.name.startswith(("asyncio_", "eventlog-"))]
    assert leaked == []
