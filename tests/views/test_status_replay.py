"""The status view: folding events into what GET /status shows, and `imgpipe replay` rebuilding it identically."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

from daemon.config import Settings
from daemon.eventlog.models import database
from daemon.events import (
    Event,
    ImageCompressed,
    ImageDownloaded,
    ImageDownloadRetried,
    ImageFailed,
    NotificationReceived,
    RequestCompleted,
    WebhookAttempted,
    WebhookQueued,
)
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.replay import replay
from daemon.testing import daemon_app
from daemon.views.status import StatusView, request_status
from daemon.web import EVENTLOG, STATUS_VIEW

Serve = Callable[[Settings], AbstractAsyncContextManager[Any]]


def dump_views(helpers: Any, settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table, in a fixed order."""
    tables = [name for (name,) in helpers.query(
        settings, "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'view\\_%' ESCAPE '\\' "
                  "ORDER BY name")]
    dump = {}
    for table in tables:
        columns = [row[1] for row in helpers.query(settings, f"PRAGMA table_info({table})")]
        order = ", ".join(f'"{c}"' for c in columns)
        dump[table] = helpers.query(settings, f"SELECT * FROM {table} ORDER BY {order}")
    return dump


def compressed(product: int, index: int, name: str, kept: bool = False) -> ImageCompressed:
    return ImageCompressed(product=product, index=index, name=name, format="JPEG", width=1200, height=800,
                           bytes_in=1000, bytes_out=1000 if kept else 400, kept_original=kept,
                           quality=None if kept else 50, note="already small" if kept else "")


def progress_of_a(a: str) -> list[Event]:
    """Request A: retried then compressed, one download failure, the rest kept as they were, then completed."""
    return [
        ImageDownloadRetried(product=0, index=0, attempt=1, error="HTTP 503 Service Unavailable", retry_in=0.5),
        ImageDownloaded(product=0, index=0, stem=f"{a}_1_0", bytes=1000, attempts=2),
        compressed(0, 0, f"{a}_1_0.jpg"),
        ImageFailed(product=0, index=1, stage="download", error="download failed: HTTP 404 Not Found"),
        *(compressed(p, i, f"{a}_{p + 1}_{i}.jpg", kept=True) for p, i in ((0, 2), (1, 0), (1, 1), (1, 2))),
        RequestCompleted(status="completed_with_errors", images=6, done=5, failed=1),
        WebhookQueued(message_id=f"msg_{a}_12", listener="https://hooks.example/a"),
        WebhookAttempted(message_id=f"msg_{a}_12", listener="https://hooks.example/a", round=0, attempt=1,
                         outcome="delivered", status_code=200, error="", latency_ms=12.5),
        NotificationReceived(webhook_id="wh_1", verified=True, kind="classic", status="completed",
                             payload={"image_id": a, "status": "completed"}),
    ]


async def test_status_fold_and_replay_rebuild_the_same_view(serve_app: Serve, settings: Settings,
                                                            helpers: Any, tmp_path: Path) -> None:
    """After several batches and progress events, `imgpipe replay` rebuilds identical view tables and statuses."""
    async with serve_app(settings) as served:
        form = aiohttp.FormData()
        form.add_field("file", helpers.sample_csv.read_bytes(), filename="sample.csv", content_type="text/csv")
        a = (await (await served.client.post("/upload", data=form)).json())["request_id"]
        b_response = await served.client.post("/upload", data=helpers.csv_bytes(helpers.batch_rows(3, 2)),
                                               headers={"Content-Type": "text/csv"})
        b = (await b_response.json())["request_id"]
        (served.folder / "c.csv").write_bytes(helpers.csv_bytes(helpers.batch_rows(2)))
        archived = await helpers.eventually(lambda: sorted((served.folder / "archive").glob("*--c.csv")),
                                            "c.csv to be archived")
        c = archived[0].name.partition("--")[0]
        await served.inbox.idle()
        eventlog = served.app[EVENTLOG]
        # Back to back, while the view is folding: the live fold must not depend on how appends interleave
        # with the view's reads (it once did: an event read twice was counted twice).
        await eventlog.append(a, progress_of_a(a))
        last = await eventlog.append(b, [compressed(1, 1, f"{b}_2_1.jpg")])
        assert await served.app[STATUS_VIEW].wait_for(last, timeout=10)
        before = {rid: (await served.status(rid))[1] for rid in (a, b, c)}

    status_a, status_b, status_c = before[a], before[b], before[c]
    assert (status_a["status"], status_b["status"], status_c["status"]) == (
        "completed_with_errors", "processing", "queued")
    assert status_a["progress"] == {"images": 6, "done": 5, "failed": 1, "pending": 0}
    assert status_a["completed_at"] == status_a["updated_at"] != status_a["created_at"]
    assert status_b["progress"] == {"images": 6, "done": 1, "failed": 0, "pending": 5}
    assert status_b["completed_at"] is None
    assert status_c["source"] == {"kind": "inbox", "name": "c.csv"}
    images_a = [image for product in status_a["products"] for image in product["images"]]
    assert [i["status"] for i in images_a] == ["compressed", "failed"] + ["kept_original"] * 4
    first = images_a[0]
    assert (first["attempts"], first["bytes_in"], first["bytes_out"], first["width"], first["format"]) == (
        2, 1000, 400, 1200, "JPEG")
    assert first["output_url"] == f"{settings.public_url}/images/{a}_1_0.jpg"
    assert first["error"] is None
    assert (images_a[1]["output_url"], images_a[1]["error"]) == (None, "download failed: HTTP 404 Not Found")
    assert images_a[2]["note"] == "already small"
    assert [(w["listener"], w["state"], len(w["attempts"])) for w in status_a["webhooks"]] == [
        ("https://hooks.example/a", "delivered", 1)]
    assert [(n["webhook_id"], n["kind"], n["verified"]) for n in status_a["notifications"]] == [
        ("wh_1", "classic", True)]

    views = dump_views(helpers, settings)
    assert len(views["view_status_requests"]) == 3
    assert len(views["view_status_images"]) == 6 + 6 + 2
    connection = sqlite3.connect(helpers.db_file(settings))  # damage the view: replay must rebuild it from the log
    with connection:
        connection.execute("UPDATE view_status_requests SET status = 'corrupt', done = 99")
        connection.execute("DELETE FROM view_status_images WHERE product = 0")
        connection.execute("DELETE FROM view_status_attempts")
    connection.close()
    assert dump_views(helpers, settings) != views

    result = helpers.run_imgpipe("--config", str(tmp_path / "config.toml"), "replay", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    folded = sum(1 for *_, kind, _ in helpers.stored_events(settings) if kind in StatusView.types)
    assert {"event": "replayed", "events": folded} in lines
    assert dump_views(helpers, settings) == views

    async with serve_app(settings) as served:
        after = {rid: (await served.status(rid))[1] for rid in (a, b, c)}
    assert after == before


async def test_replay_in_process_of_a_log_without_requests(settings: Settings, helpers: Any) -> None:
    """daemon.replay.replay on a fresh log creates empty view tables and folds nothing."""
    assert await replay(settings) == 0
    assert all(rows == [] for rows in dump_views(helpers, settings).values())
    assert "view_status_requests" in dump_views(helpers, settings)


async def test_a_status_read_sees_one_moment_even_when_a_commit_lands_between_its_queries(
        settings: Settings, helpers: Any) -> None:
    """GET /status reads the request, its images and its webhooks in one read transaction: an image finished by a
    commit that lands between those reads is not shown compressed beside progress that does not count it."""
    async with daemon_app(settings) as app:
        batch = parse_csv(b"S. No.,Product Name,Input Image Urls\n1,Mug,http://example.com/a.jpg\n", settings.limits)
        assert isinstance(batch, Batch)
        accepted = await accept(app[EVENTLOG], batch, "upload", "one.csv")
        await app[STATUS_VIEW].run_until_idle()
        landed: list[str] = []

        def read_while_a_commit_lands() -> dict[str, Any] | None:
            def commit_meanwhile(sql: str) -> None:
                if not landed and sql.lstrip().upper().startswith("SELECT") and "view_status_images" in sql:
                    landed.append(sql)  # a commit by another connection, just before the images are read
                    helpers.execute(settings, "UPDATE view_status_images SET status = 'compressed'")
                    helpers.execute(settings, "UPDATE view_status_requests SET done = 1")

            connection = database.connection()
            connection.set_trace_callback(commit_meanwhile)
            try:
                return request_status(accepted.request_id, settings.public_url)
            finally:
                connection.set_trace_callback(None)

        body = await app[EVENTLOG].query(read_while_a_commit_lands)
    assert landed and body is not None
    states = [image["status"] for product in body["products"] for image in product["images"]]
    assert (body["progress"]["done"], states) in ((0, ["pending"]), (1, ["compressed"]))
