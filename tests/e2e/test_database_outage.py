"""PostgreSQL faults as an operator meets them: a server that is not there at start, and one lost mid-batch.

The loss is made with a TCP proxy between the daemon and the shared server (never by stopping the server): cutting
it ends every connection and refuses new ones, as a network cut or a server restart does.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from daemon.testing import Listener, Origin, free_port, jpeg_bytes, photo

IMAGES, FIRST = 24, 8  # the first 8 flow at once; the origin holds the other 16 until the database is cut
IMAGE_SIDE = 600
DEADLINE = 60.0


class GatedOrigin(Origin):
    """The loopback origin, holding each request for an image named in `held` until `gate` is set."""

    def __init__(self, files: dict[str, bytes], held: set[str]) -> None:
        super().__init__(files)
        self.held = held
        self.gate = asyncio.Event()

    async def _image(self, request: web.Request) -> web.Response:
        if request.match_info["name"] in self.held:
            await self.gate.wait()
        return await super()._image(request)


def events_named(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["event"] == name]


async def test_a_database_lost_mid_batch_pauses_the_work_which_completes_once_it_is_back(
        tmp_path: Path, both_backends: Callable[[str, Path], AbstractContextManager[str]], postgres_proxy: Any,
        launch_daemon: Any, read_db: Any, helpers: Any) -> None:
    """Cut off PostgreSQL mid-batch, the daemon logs it, stays up (/healthz degraded, 503 JSON for an upload) and,
    once reconnected, completes the batch with each image downloaded and compressed once and one webhook message."""
    body = jpeg_bytes(photo(IMAGE_SIDE, IMAGE_SIDE, seed=3))
    files = {f"p{n}.jpg": body for n in range(IMAGES)}
    held = {f"p{n}.jpg" for n in range(FIRST, IMAGES)}
    with both_backends("postgresql", tmp_path) as url:
        proxy = postgres_proxy(url)
        daemon_url = proxy.url(url, password="s3cret-outage")

        def count(event_type: str) -> int:
            return int(read_db(url, "SELECT COUNT(*) FROM events WHERE type = ?", event_type)[0][0])

        async with GatedOrigin(files, held) as origin, Listener([200]) as listener, \
                aiohttp.ClientSession() as session:
            with launch_daemon(tmp_path, daemon_url, IMGPIPE_WEBHOOKS_URLS=listener.url,
                               IMGPIPE_PATHS_WORK=str(tmp_path / "work")) as daemon:
                rows = "\n".join(f"{n},Product {n},{origin.url}/img/p{n}.jpg" for n in range(IMAGES))
                async with session.post(f"{daemon.base_url}/upload", headers={"Content-Type": "text/csv"},
                                        data=f"S. No.,Product Name,Input Image Urls\n{rows}\n".encode()) as response:
                    assert response.status == 202, await response.text()
                    request_id = (await response.json())["request_id"]

                async def some_compressed() -> bool:
                    return await asyncio.to_thread(count, "ImageCompressed") >= 3

                await helpers.eventually(some_compressed, "3 images compressed", DEADLINE, interval=0.01)
                proxy.cut()
                compressed_at_cut = await asyncio.to_thread(count, "ImageCompressed")
                assert compressed_at_cut < IMAGES

                await helpers.eventually(lambda: events_named(daemon.log_lines(), "database_connection_lost"),
                                 "database_connection_lost in the log", DEADLINE)
                async with session.get(f"{daemon.base_url}/healthz") as response:
                    assert response.status == 200
                    assert await response.json() == {"status": "degraded", "reasons": ["database unreachable"]}
                async with session.post(f"{daemon.base_url}/upload", headers={"Content-Type": "text/csv"},
                                        data=f"S. No.,Product Name,Input Image Urls\n1,Late,{origin.url}/img/p0.jpg\n"
                                        .encode()) as response:
                    assert response.status == 503
                    assert response.headers["Retry-After"] == "5"
                    assert (await response.json())["error"] == "database_unreachable"

                # The held downloads finish while the database is away (their bodies are on disk, and committing
                # them fails): the results must wait, not vanish nor fail the images.
                origin.gate.set()
                bodies = tmp_path / "work" / "bodies" / request_id
                await helpers.eventually(lambda: all((bodies / f"{n}-0").exists() for n in range(FIRST, IMAGES)),
                                         "every held image downloaded", DEADLINE)
                assert daemon.process.poll() is None
                assert await asyncio.to_thread(count, "ImageDownloaded") <= FIRST

                proxy.restore()

                async def completed() -> dict[str, Any] | None:
                    async with session.get(f"{daemon.base_url}/status/{request_id}") as response:
                        status: dict[str, Any] = await response.json()
                    return status if response.status == 200 and status["status"] == "completed" else None

                status = await helpers.eventually(completed, "the request to complete", DEADLINE, interval=0.05)
                await listener.wait_for(1, timeout=DEADLINE)
                await helpers.eventually(lambda: events_named(daemon.log_lines(), "database_connection_back"),
                                 "database_connection_back in the log", DEADLINE)
                async with session.get(f"{daemon.base_url}/healthz") as response:
                    assert await response.json() == {"status": "ok"}
                log_lines = daemon.log_lines()

            events = [(stream, type_, json.loads(data)) for stream, type_, data in await asyncio.to_thread(
                read_db, url, "SELECT stream, type, data FROM events ORDER BY position")]
    assert status["progress"] == {"images": IMAGES, "done": IMAGES, "failed": 0, "pending": 0}
    per_type = Counter(type_ for _, type_, _ in events)
    assert (per_type["RequestAccepted"], per_type["RequestCompleted"]) == (1, 1)  # the refused upload left nothing
    for image_event in ("ImageRequested", "ImageDownloaded", "ImageCompressed"):
        images = Counter((d["product"], d["index"]) for _, t, d in events if t == image_event)
        assert len(images) == IMAGES and set(images.values()) == {1}, (image_event, images)
    assert per_type["ImageFailed"] == 0
    repeated = Counter((s, t, json.dumps(d, sort_keys=True)) for s, t, d in events)
    assert [e for e, n in repeated.items() if n > 1] == []
    assert [d["outcome"] for _, t, d in events if t == "WebhookAttempted"] == ["delivered"]
    assert len(listener.received) == 1
    assert len([p for p in daemon.images.iterdir() if p.is_file()]) == IMAGES
    # One episode, logged as a warning and its end; no error and no traceback for it.
    assert len(events_named(log_lines, "database_connection_lost")) == len(
        events_named(log_lines, "database_connection_back")) >= 1
    errors = [e for e in log_lines if e.get("level") == "error"]
    assert errors == [], json.dumps(errors)
    password = urllib.parse.urlsplit(daemon_url).password
    assert password and password not in json.dumps(log_lines) + daemon.stderr()


def test_an_unreachable_postgresql_at_start_exits_1_with_one_line_and_no_password(
        tmp_path: Path, helpers: Any) -> None:
    """`imgpipe run` on a postgresql:// URL with a password, at a closed port, prints one stderr line naming the
    URL with *** for the password, logs no password, and exits 1 without a traceback."""
    port = free_port()
    url = f"postgresql://imgpipe:s3cret-pw@127.0.0.1:{port}/imgpipe"
    for command in ("run", "replay"):
        result = helpers.run_imgpipe(command, cwd=tmp_path, timeout=30, env={
            "IMGPIPE_PATHS_DATABASE": url, "IMGPIPE_SERVER_PORT": str(free_port()),
            "IMGPIPE_PATHS_INBOX": str(tmp_path / "inbox"), "IMGPIPE_PATHS_OUTBOX": str(tmp_path / "outbox"),
            "IMGPIPE_PATHS_IMAGES": str(tmp_path / "images")})
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.startswith(f"imgpipe: cannot connect to the database "
                                        f"postgresql://imgpipe:***@127.0.0.1:{port}/imgpipe: "), result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
        (event,) = [json.loads(line) for line in result.stdout.splitlines()]
        assert (event["event"], event["level"]) == ("database_unreachable", "error")
