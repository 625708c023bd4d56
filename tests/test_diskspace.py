"""A full disk on a real small filesystem: the work pauses, /healthz says degraded, and it all resumes with room.

Each test mounts a 2 MB tmpfs where one of the daemon's places lives, fills it with a filler file, runs a batch
through the real daemon (HTTP, stages, codec pool, SQLite), then removes the filler.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from daemon import diskspace
from daemon.app import build_app
from daemon.config import Settings
from daemon.diskspace import is_disk_full
from daemon.http_api import DISK_SPACE
from daemon.ingest import inbox
from daemon.stages.codec import EncodeSettings, compress_file
from daemon.stages.compress import CODEC_ATTEMPTS
from daemon.stages.pool import CodecPool
from daemon.testing import Origin, jpeg_bytes, photo, pipeline_settings

PHOTOS = 12
FILLER = "filler"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`small_disk(name)` mounts a 2 MB tmpfs at tmp_path/name; it fails instead of skipping under
    IMGPIPE_TEST_REQUIRE_MOUNT=1 (CI), so the tests always run there."""
    mounted: list[Path] = []

    def mount(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                  capture_output=True, text=True, check=False)
            error = done.stderr.strip() if done.returncode else ""
        except FileNotFoundError as exc:
            error = str(exc)
        if error:
            if os.environ.get("IMGPIPE_TEST_REQUIRE_MOUNT") == "1":
                pytest.fail(f"cannot mount a small filesystem: {error}")
            pytest.skip(f"cannot mount a small filesystem: {error}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """A filler file that leaves about `leave` bytes free on `folder`'s filesystem."""
    st = os.statvfs(folder)
    filler = folder / FILLER
    size = st.f_bavail * st.f_frsize - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin({f"p{n}.jpg": jpeg_bytes(photo(640, 480, seed=n)) for n in range(PHOTOS)}) as server:
        yield server


def batch_csv(origin: Origin) -> bytes:
    rows = [f'{n + 1},Product {n},{origin.url}/img/p{n}.jpg' for n in range(PHOTOS)]
    return ("S. No.,Product Name,Input Image Urls\n" + "\n".join(rows) + "\n").encode()


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(settings, follow=True))) as client:
        yield client


async def upload(client: TestClient[Any, Any], origin: Origin) -> str:
    response = await client.post("/upload", data=batch_csv(origin), headers={"Content-Type": "text/csv"})
    assert response.status == 202, await response.text()
    return str((await response.json())["request_id"])


async def progress(client: TestClient[Any, Any], request_id: str) -> dict[str, Any]:
    response = await client.get(f"/status/{request_id}")
    assert response.status == 200
    return dict(await response.json())


async def finished(client: TestClient[Any, Any], request_id: str, helpers: Any) -> dict[str, Any]:
    return dict(await helpers.finished(client, request_id))


async def degraded(client: TestClient[Any, Any], reason: str) -> bool:
    body = await (await client.get("/healthz")).json()
    return bool(body == {"status": "degraded", "reasons": [reason]})


async def paused_then_completed(client: TestClient[Any, Any], request_id: str, filler: Path, place: str, reason: str,
                                logs: list[dict[str, Any]], helpers: Any) -> dict[str, Any]:
    """Wait for the pause at `place` (degraded, logged once, tried again more often than an image's attempts
    allow, nothing failed), free the space, and return the request's status once it has completed."""

    await helpers.eventually(lambda: degraded(client, reason), f"/healthz to say degraded: {reason}")
    space = client.app[DISK_SPACE]
    await helpers.eventually(lambda: space.failed_writes(place) > 2 * CODEC_ATTEMPTS,
                             f"the paused work at {place} to try again more than its attempts allow")
    assert (await progress(client, request_id))["progress"]["failed"] == 0
    full = [e for e in logs if e["event"] == "disk_full"]
    assert [(e["place"], e["log_level"]) for e in full] == [(place, "warning")]
    assert full[0]["path"] and isinstance(full[0]["free_bytes"], int)
    filler.unlink()

    body = await finished(client, request_id, helpers)
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert [e["place"] for e in logs if e["event"] == "disk_space_back"] == [place]
    return body


def assert_all_compressed(body: dict[str, Any]) -> None:
    assert body["status"] == "completed" and body["progress"]["done"] == PHOTOS and body["progress"]["failed"] == 0
    images = [image for product in body["products"] for image in product["images"]]
    assert [image["status"] for image in images] == ["compressed"] * PHOTOS


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused work tries again every 0.1 s, so a test sees many tries in a moment."""
    monkeypatch.setattr(diskspace, "RETRY_SECONDS", 0.1)
    monkeypatch.setattr(diskspace, "POLL_SECONDS", 0.05)


@pytest.mark.parametrize(("place", "leave", "reason"), [("images", 40_000, "disk full: compressed images"),
                                                     ("work", 8192, "disk full: working files")])
async def test_a_full_folder_pauses_the_images_that_write_there_until_there_is_room(
        tmp_path: Path, small_disk: Callable[[str], Path], origin: Origin, helpers: Any, place: str, leave: int,
        reason: str) -> None:
    """Outputs or downloads that cannot be written for lack of space wait, none fails (a download has one attempt),
    and every image is compressed once there is room."""
    folder = small_disk(place)
    settings = pipeline_settings(tmp_path, paths={place: str(folder)}, download={"attempts": 1})
    with capture_logs() as logs:
        async with running(settings) as client:
            filler = fill(folder, leave=leave)  # room for a few of the twelve images at most
            request_id = await upload(client, origin)
            body = await paused_then_completed(client, request_id, filler, place, reason, logs, helpers)
    assert_all_compressed(body)
    assert len(list(settings.path("images").glob("*.jpg"))) == PHOTOS


async def test_a_full_outbox_pauses_the_export_until_there_is_room(
        tmp_path: Path, small_disk: Callable[[str], Path], origin: Origin, helpers: Any) -> None:
    """The outbox CSV waits for room and is written once there is some."""
    outbox = small_disk("outbox")
    settings = pipeline_settings(tmp_path, paths={"outbox": str(outbox)})
    with capture_logs() as logs:
        async with running(settings) as client:
            filler = fill(outbox)
            request_id = await upload(client, origin)
            await helpers.eventually(lambda: degraded(client, "disk full: outbox"), "/healthz to say the outbox is full")
            assert [e["place"] for e in logs if e["event"] == "disk_full"] == ["outbox"]
            filler.unlink()
            written = await helpers.eventually(lambda: list(outbox.glob(f"{request_id}*.csv")), "the outbox CSV")
            assert len(written[0].read_text().splitlines()) == PHOTOS + 1
            await helpers.eventually(lambda: not client.app[DISK_SPACE].reasons(), "the outbox to be fine again")
            assert_all_compressed(await progress(client, request_id))


async def test_a_full_database_answers_uploads_503_and_pauses_the_pipeline_until_there_is_room(
        tmp_path: Path, small_disk: Callable[[str], Path], origin: Origin, helpers: Any) -> None:
    """With the SQLite file's disk full an upload gets 503 with Retry-After and the stages' commits wait; with room
    the upload is accepted and the batch completes."""
    data = small_disk("data")
    settings = pipeline_settings(tmp_path, paths={"database": f"sqlite:///{data / 'imgpipe.db'}",
                                                  "work": str(tmp_path / "work")})
    with capture_logs() as logs:
        async with running(settings) as client:
            filler = fill(data)
            refused = await client.post("/upload", data=batch_csv(origin), headers={"Content-Type": "text/csv"})
            assert refused.status == 503 and refused.headers["Retry-After"].isdigit()
            assert (await refused.json())["error"] == "disk_full"
            assert await (await client.get("/healthz")).json() == {"status": "degraded",
                                                                   "reasons": ["disk full: database"]}
            filler.unlink()
            request_id = await upload(client, origin)
            logs.clear()  # the upload's episode ended with it; the next one is the pipeline's
            filler = fill(data)  # the stages' commits now find the disk full
            body = await paused_then_completed(client, request_id, filler, "database", "disk full: database",
                                               logs, helpers)
    assert_all_compressed(body)


async def test_an_inbox_file_waits_for_room_in_the_database_without_spending_its_attempts(
        tmp_path: Path, small_disk: Callable[[str], Path], origin: Origin, helpers: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV dropped while the database's disk is full is accepted once there is room, however few attempts."""
    monkeypatch.setattr(inbox, "INGEST_ATTEMPTS", 1)
    data = small_disk("data")
    settings = pipeline_settings(tmp_path, paths={"database": f"sqlite:///{data / 'imgpipe.db'}",
                                                  "work": str(tmp_path / "work")},
                                 inbox={"enabled": True, "settle_seconds": 0.05})
    async with running(settings) as client:
        filler = fill(data)
        (settings.path("inbox") / "batch.csv").write_bytes(batch_csv(origin))
        space = client.app[DISK_SPACE]
        await helpers.eventually(lambda: space.failed_writes("database") > 2, "the inbox to try again while full")
        filler.unlink()
        archive = settings.path("inbox") / "archive"
        archived = await helpers.eventually(lambda: list(archive.glob("*--batch.csv")), "the CSV to be accepted")
        request_id = archived[0].name.partition("--")[0]
        assert_all_compressed(await finished(client, request_id, helpers))


async def test_a_full_disk_is_recognised_when_raised_by_a_pool_worker_or_sqlite(
        tmp_path: Path, small_disk: Callable[[str], Path]) -> None:
    """ENOSPC from the codec's worker process and SQLite's "database or disk is full" both count as a full disk."""
    images = small_disk("images")
    source = tmp_path / "body.jpg"
    source.write_bytes(jpeg_bytes(photo(640, 480, seed=1)))
    fill(images)
    pool = CodecPool(pipeline_settings(tmp_path).compress)
    await pool.start()
    try:
        with pytest.raises(OSError) as raised:
            await pool.run(compress_file, str(source), str(images), "out", EncodeSettings(quality=50))
    finally:
        await pool.shutdown()
    assert is_disk_full(raised.value)
    import sqlite3

    connection = sqlite3.connect(images / "x.db")
    with pytest.raises(sqlite3.OperationalError) as full:
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
        connection.commit()
    connection.close()
    assert is_disk_full(full.value) and not is_disk_full(sqlite3.OperationalError("no such table: t"))
