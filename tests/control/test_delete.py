"""DELETE /requests/<id> and retention: a finished request's files go, and the views forget it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from daemon.app import FOLLOWERS
from daemon.config import Settings
from daemon.control.retention import DAY, Retention
from daemon.http_api import EVENTLOG
from daemon.ingest.inbox import ARCHIVE, REJECTED
from daemon.stages.compress import CompressStage
from daemon.stages.download import DownloadStage
from daemon.testing import Origin, eventually


async def test_delete_removes_the_requests_files_and_the_views_forget_it(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin, helpers: Any) -> None:
    """After DELETE, the images, outbox CSV and archived CSV are gone, /status is 404 and /export leaves it out."""
    settings = make_settings(inbox={"enabled": True, "settle_seconds": 0.1}, download={"total_timeout": 60.0})
    async with serve_daemon(settings) as daemon:
        kept = await daemon.upload([f"{origin.url}/img/other.jpg"])
        (settings.path("inbox") / "batch.csv").write_text(
            f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n")
        archived = await helpers.eventually(lambda: list((settings.path("inbox") / ARCHIVE).iterdir()),
                                            "the inbox file archived")
        request_id = archived[0].name.partition("--")[0]
        status = await daemon.finished(request_id)
        await daemon.finished(kept)
        image = settings.path("images") / status["products"][0]["images"][0]["output_url"].rsplit("/", 1)[1]
        outbox = settings.path("outbox") / f"{request_id}--batch.csv"
        assert image.exists() and outbox.exists() and archived[0].exists()

        response = await daemon.client.delete(f"/requests/{request_id}")
        answer = (response.status, await response.json())
        gone = await daemon.client.get(f"/status/{request_id}")
        served = await daemon.client.get(f"/images/{image.name}")
        export = await (await daemon.client.get("/export")).text()
        again = await daemon.client.delete(f"/requests/{request_id}")
        running = await daemon.upload([f"{origin.url}/stall"])
        refused = await daemon.client.delete(f"/requests/{running}")
        refusals = [(r.status, (await r.json())["error"]) for r in (gone, again, refused)]
        assert (await daemon.client.post(f"/cancel/{running}")).status == 200
    assert answer == (200, {"request_id": request_id, "deleted": True})
    assert refusals == [(404, "unknown_request"), (404, "unknown_request"), (409, "not_finished")]
    assert served.status == 404
    assert not image.exists() and not outbox.exists() and not archived[0].exists()
    assert "photo.jpg" not in export and "other.jpg" in export
    assert [kind for _, _, _, kind, _ in helpers.stored_events(settings, request_id)][-1] == "RequestDeleted"


async def test_retention_deletes_old_requests_and_old_inbox_files(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin, helpers: Any) -> None:
    """A sweep deletes requests finished more than requests_days ago and inbox files older than inbox_days; a later
    one removes the deleted request's events but the deletion."""
    settings = make_settings(retention={"requests_days": 1.0, "inbox_days": 2.0})
    now = time.time()
    old, young = settings.path("inbox") / REJECTED / "old.csv", settings.path("inbox") / ARCHIVE / "young.csv"
    async with serve_daemon(settings) as daemon:
        request_id = await daemon.upload([f"{origin.url}/img/photo.jpg"])
        await daemon.finished(request_id)
        stored = helpers.stored_events(settings, request_id)
        for path, age_days in ((old, 3.0), (young, 0.0)):
            path.parent.mkdir(parents=True, exist_ok=True)  # the inbox is off: nothing made its folders
            path.write_text("S. No.,Product Name,Input Image Urls\n")
            os.utime(path, (now - age_days * DAY, now - age_days * DAY))
        retention = Retention(daemon.app[EVENTLOG], settings.retention, settings.path("inbox"),
                              daemon.app[FOLLOWERS])
        not_yet = await retention.sweep(now)
        swept = await retention.sweep(now + 1.5 * DAY)
        for follower in daemon.app[FOLLOWERS]:
            await daemon.idle(type(follower))
        status = await daemon.client.get(f"/status/{request_id}")
        compacted = await retention.sweep(now + 1.5 * DAY)
    assert (not_yet.requests, not_yet.files) == (0, 1)
    assert (swept.requests, swept.files, swept.events) == (1, 0, 0)  # consumers had not passed the deletion yet
    assert compacted.events == len(stored)
    assert [kind for _, _, _, kind, _ in helpers.stored_events(settings, request_id)] == ["RequestDeleted"]
    assert status.status == 404
    assert not old.exists() and young.exists()
    assert not (settings.path("outbox") / f"{request_id}.csv").exists()



async def test_a_deleted_request_queued_behind_another_never_runs(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin) -> None:
    """A request cancelled and deleted while its downloads waited behind another batch's is never downloaded."""
    settings = make_settings(download={"total_timeout": 60.0, "concurrency": 2, "backlog": 4})
    async with serve_daemon(settings) as daemon:
        busy = await daemon.upload([f"{origin.url}/stall?n=1"], [f"{origin.url}/stall?n=2"])

        async def both_stalled() -> bool:
            return origin.hits["/stall"] == 2

        await eventually(both_stalled, "the first batch to take every download slot")
        queued = await daemon.upload([f"{origin.url}/img/photo.jpg"], [f"{origin.url}/img/other.jpg"])
        assert (await daemon.client.post(f"/cancel/{queued}")).status == 200
        assert (await daemon.client.delete(f"/requests/{queued}")).status == 200
        assert (await daemon.client.post(f"/cancel/{busy}")).status == 200  # the slots free up
        await daemon.idle(DownloadStage)
        await daemon.idle(CompressStage)
    assert origin.hits["/img/photo.jpg"] == origin.hits["/img/other.jpg"] == 0
    assert not list(settings.path("images").glob(f"{queued}_*"))


async def test_an_idempotency_key_of_a_deleted_request_is_refused_also_after_its_events_are_purged(
        make_settings: Callable[..., Settings], serve_daemon: Any, origin: Origin) -> None:
    """Re-uploading with the key of a deleted request answers 409 request_deleted, before and after the purge."""
    settings = make_settings()
    body = f"S. No.,Product Name,Input Image Urls\n1,Shoe,{origin.url}/img/photo.jpg\n".encode()
    headers = {"Content-Type": "text/csv", "Idempotency-Key": "batch-42"}
    async with serve_daemon(settings) as daemon:
        request_id = (await (await daemon.client.post("/upload", data=body, headers=headers)).json())["request_id"]
        await daemon.finished(request_id)
        assert (await daemon.client.delete(f"/requests/{request_id}")).status == 200
        answers = []
        for follower in daemon.app[FOLLOWERS]:
            await daemon.idle(type(follower))
        for purge in (False, True):
            if purge:
                retention = Retention(daemon.app[EVENTLOG], settings.retention, settings.path("inbox"),
                                      daemon.app[FOLLOWERS])
                assert (await retention.sweep(time.time())).events > 0
            again = await daemon.client.post("/upload", data=body, headers=headers)
            answers.append((again.status, (await again.json())["error"]))
    assert answers == [(409, "request_deleted"), (409, "request_deleted")]
