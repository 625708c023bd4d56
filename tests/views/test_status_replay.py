"""The status view: folding events into what GET /status shows, and `imgpipe replay` rebuilding it identically."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.config import Settings
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
from daemon.http_api import EVENTLOG, STATUS_VIEW
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.replay import replay
from daemon.testing import daemon_app
from daemon.views import status as status_module
from daemon.views.status import STATUS_TABLES, StatusView, request_status

Serve = Callable[[Settings], AbstractAsyncContextManager[Any]]


def dump_views(helpers: Any, settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table, in a fixed order."""
    dump = {}
    for model in STATUS_TABLES:
        columns = ", ".join(f'"{field.column_name}"' for field in model._meta.sorted_fields)  # type: ignore[attr-defined]
        table = model._meta.table_name  # type: ignore[attr-defined]
        dump[table] = helpers.query(settings, f"SELECT {columns} FROM {table} ORDER BY {columns}")
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
    # Damage the view: replay must rebuild it from the log.
    helpers.execute(settings, "UPDATE view_status_requests SET status = 'corrupt', done = 99")
    helpers.execute(settings, "DELETE FROM view_status_images WHERE product = 0")
    helpers.execute(settings, "DELETE FROM view_status_attempts")
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
        settings: Settings, helpers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /status reads the request, its images and its webhooks in one read transaction: an image finished by a
    commit that lands between those reads is not shown compressed beside progress that does not count it."""
    async with daemon_app(settings) as app:
        batch = parse_csv(b"S. No.,Product Name,Input Image Urls\n1,Mug,http://example.com/a.jpg\n", settings.limits)
        assert isinstance(batch, Batch)
        accepted = await accept(app[EVENTLOG], batch, "upload", "one.csv")
        await app[STATUS_VIEW].run_until_idle()
        landed: list[str] = []

        read_products = status_module.products

        def products_after_a_commit(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            """A commit by another connection lands after the request's row is read, before its images are."""
            landed.append(True)
            helpers.execute(settings, "UPDATE view_status_images SET status = 'compressed'")
            helpers.execute(settings, "UPDATE view_status_requests SET done = 1")
            return read_products(*args, **kwargs)

        monkeypatch.setattr(status_module, "products", products_after_a_commit)

        def read_while_a_commit_lands() -> dict[str, Any] | None:
            return request_status(accepted.request_id, settings.public_url)

        body = await app[EVENTLOG].query(read_while_a_commit_lands)
    assert landed and body is not None
    states = [image["status"] for product in body["products"] for image in product["images"]]
    assert (body["progress"]["done"], states) == (0, ["pending"])  # the moment before the commit
